"""ONNX export helpers shared by the model packages: torch -> ONNX, int8 quantization, TensorRT engines.

Each model's own export (``snap2caption.models.{caption,detector,tagger}.export``) is built from these; the
files they write are read back through :mod:`snap2caption.models.onnx_io`.

- :func:`export_onnx`: TorchScript-based ``torch.onnx.export`` (``dynamo=False``), batch axis dynamic,
  metadata written into ``metadata_props``.
- :func:`quantize_int8`: ONNX Runtime static quantization (QDQ, int8 weights per channel, uint8 activations,
  MinMax calibration on real inputs). Convolution networks gain nothing from dynamic quantization, which
  only covers MatMul/Gemm, so static it is; the nodes named in ``exclude_prefixes`` stay float (the YOLO
  box decoding, whose pixel coordinates do not survive an 8-bit range).
- :func:`quantize_dynamic_int8`: ONNX Runtime dynamic quantization of MatMul / Gemm weights (a transformer
  decoder on CPU: no calibration data needed).
- :func:`build_tensorrt_engine`: a serialized TensorRT engine from an ONNX file, where TensorRT is installed;
  it is imported lazily and its absence is an :class:`ExportError` that says so.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snap2caption.errors import Snap2CaptionError
from snap2caption.models.onnx_io import set_metadata

logger = logging.getLogger(__name__)

OPSET = 17


class ExportError(Snap2CaptionError):
    """An export that cannot be done here (missing runtime, bad input); the message says what to do."""

    code = "export_error"
    status = 500


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: torch.Tensor,
    *,
    input_name: str,
    output_name: str | Sequence[str],
    metadata: Mapping[str, Any],
    opset: int = OPSET,
) -> Path:
    """Export ``model`` (eval mode, one tensor in; one out, or a tuple) to ONNX with a dynamic batch axis.

    Args:
        model: The module; it is traced with ``example``.
        path: Output file.
        example: An input of the right shape (batch 1 is enough).
        input_name: Graph input name.
        output_name: Graph output name, or one name per output when the module returns a tuple (each
            output's first axis is the batch).
        metadata: Written into ``metadata_props`` (see ``snap2caption.models.onnx_io``).
        opset: ONNX opset.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in (input_name, *outputs)},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    set_metadata(path, metadata)
    logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


class _Batches:
    """``CalibrationDataReader`` over a list of input batches (ONNX Runtime's protocol: ``get_next``)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self._items = iter([{input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[np.ndarray],
    *,
    input_name: str,
    metadata: Mapping[str, Any],
    exclude_prefixes: Sequence[str] = (),
) -> Path:
    """Static int8 quantization (QDQ) of an ONNX file, calibrated on ``calibration`` input batches.

    Args:
        src: The float32 ONNX file.
        dst: Output file.
        calibration: Input batches (float32, the model's input shape) that look like real traffic.
        input_name: Graph input name.
        metadata: ``metadata_props`` for the output (``quantization`` is added).
        exclude_prefixes: Nodes whose name starts with one of these stay float32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = list(calibration)
    if not batches:
        raise ExportError("int8 quantization needs at least one calibration batch")
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        excluded = [
            n.name for n in onnx.load(str(prepared)).graph.node if n.name.startswith(tuple(exclude_prefixes))
        ]
        quantize_static(
            str(prepared),
            str(dst),
            _Batches(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,  # asymmetric: ReLU6 / SiLU outputs are (mostly) >= 0
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
        )
    set_metadata(
        dst,
        {
            **metadata,
            "quantization": {
                "type": "int8 static (onnxruntime QDQ, per-channel int8 weights, uint8 activations, MinMax)",
                "calibration_images": int(sum(len(b) for b in batches)),
                "float_nodes": len(excluded),
            },
        },
    )
    logger.info("int8 model %s (%.1f MB), %d nodes left float", dst, dst.stat().st_size / 1e6, len(excluded))
    return dst


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, imported on first use.

    Raises:
        ExportError: TensorRT is not installed (the message says so and what to do instead).
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise ExportError(
            "TensorRT is not installed in this environment, so no engine was built. Install it on a machine "
            "with an NVIDIA GPU and CUDA (`pip install tensorrt`), or serve the ONNX file with ONNX Runtime."
        ) from exc
    return tensorrt


def build_tensorrt_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    input_name: str,
    input_shape: Sequence[int],
    max_batch: int = 32,
    opt_batch: int = 8,
    fp16: bool = True,
    workspace_gb: float = 2.0,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file (dynamic batch 1..``max_batch``).

    Args:
        onnx_path: The ONNX file.
        engine_path: Where the engine goes (``.engine``).
        input_name: Graph input name.
        input_shape: Input shape without the batch axis, e.g. ``(3, 160, 160)``.
        max_batch: Largest batch of the optimisation profile.
        opt_batch: Batch the kernels are tuned for.
        fp16: Allow fp16 kernels where the GPU has fast fp16.
        workspace_gb: Builder workspace limit.

    Raises:
        ExportError: TensorRT is not installed, or it could not parse or build the network.
    """
    trt = require_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = tuple(input_shape)
    profile.set_shape(input_name, (1, *shape), (min(opt_batch, max_batch), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    logger.info("TensorRT engine %s (%.1f MB, fp16=%s)", engine_path, engine_path.stat().st_size / 1e6, fp16)
    return engine_path


def quantize_dynamic_int8(src: str | Path, dst: str | Path, *, metadata: Mapping[str, Any]) -> Path:
    """Dynamic int8 quantization of an ONNX file's MatMul / Gemm weights (activations quantized per call).

    What a transformer decoder wants on CPU: its time is in weight-heavy MatMuls at batch sizes where
    static activation ranges buy nothing, and it needs no calibration data.

    Args:
        src: The float32 ONNX file.
        dst: Output file.
        metadata: ``metadata_props`` for the output (``quantization`` is added).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    set_metadata(dst, {**metadata, "quantization": "dynamic int8 (MatMul/Gemm weights, per tensor)"})
    return dst
