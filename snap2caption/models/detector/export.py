"""The detector's export: ``model.onnx`` (self-describing, dynamic batch), its static int8 variant, and a
TensorRT engine; :func:`reexport` rebuilds them for an existing artifact in a new folder.

int8 calibration batches come from the caller (``training.detector.export`` reads the training images).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn

from snap2caption.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from snap2caption.models.detector.config import (
    FEATURES_OUTPUT_NAME,
    INPUT_NAME,
    INT8_DOMAIN_DIR,
    INT8_ONNX_FILE,
    MODEL_YAML_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    DetectorConfig,
    read_config,
)
from snap2caption.models.onnx_export import (
    ExportError,
    build_tensorrt_engine,
    quantize_int8,
    require_tensorrt,
)
from snap2caption.models.onnx_export import (
    export_onnx as export_module,
)

ENGINE_FILE = "model.engine"


def export_onnx(net: nn.Module, path: str | Path, config: DetectorConfig) -> Path:
    """ONNX export of a network made ready by ``yolo.inference_model`` and ``yolo.with_features`` (fused;
    outputs ``output0`` raw ``(B, 4 + nc, anchors)`` and ``features`` ``(B, C)``), dynamic batch, with the
    config's metadata."""
    example = torch.zeros(1, 3, config.imgsz, config.imgsz)
    return export_module(
        net,
        path,
        example,
        input_name=INPUT_NAME,
        output_name=[OUTPUT_NAME, FEATURES_OUTPUT_NAME],
        metadata=config.onnx_metadata(),
    )


def head_prefixes(model_cfg: dict[str, Any]) -> list[str]:
    """ONNX node-name prefixes of the Detect head's box decoding, kept float32 in the int8 model.

    The box branch ends in pixel coordinates (0..imgsz) that one 8-bit range per tensor cannot hold
    precisely; the class branch and the backbone quantize well.
    """
    head = len(model_cfg["backbone"]) + len(model_cfg["head"]) - 1
    return [f"/model.{head}/dfl", f"/model.{head}/Sub", f"/model.{head}/Add", f"/model.{head}/Div",
            f"/model.{head}/Mul", f"/model.{head}/Concat", f"/model.{head}/Sigmoid"]  # fmt: skip


def export_int8(folder: str | Path, calibration: Sequence[np.ndarray]) -> Path:
    """``folder/model.int8.onnx``: ``model.onnx`` statically quantized, the box decoding left float.

    Args:
        folder: A detector artifact folder with ``model.onnx``.
        calibration: Letterboxed (B, 3, S, S) batches that look like real traffic (training images).
    """
    folder = Path(folder)
    return quantize_int8(
        folder / ONNX_FILE,
        folder / INT8_ONNX_FILE,
        calibration,
        input_name=INPUT_NAME,
        metadata=read_config(folder).onnx_metadata(),
        exclude_prefixes=head_prefixes(yaml.safe_load((folder / MODEL_YAML_FILE).read_text())),
    )


def reexport(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: Literal["onnx", "tensorrt"] = "onnx",
    calibration: Sequence[np.ndarray] | None = None,
) -> Path:
    """Re-export an artifact folder into ``out_dir``: a copy of its files, a fresh ``model.onnx`` with
    metadata, plus ``model.int8.onnx`` (with ``calibration``) or ``model.engine`` (``fmt="tensorrt"``);
    new manifest.

    Args:
        model_dir: A detector artifact folder (verified against its manifest).
        out_dir: Target folder (replaced).
        fmt: ``onnx``, or ``tensorrt`` (ONNX first, then an engine; needs TensorRT).
        calibration: Batches to calibrate an int8 model on; None writes none.

    Raises:
        ExportError: TensorRT missing, or ``out_dir`` is the artifact itself.
    """
    from snap2caption.models.detector.artifact import load_torch_model

    src, out = Path(model_dir), Path(out_dir)
    verify_manifest(src)
    if fmt == "tensorrt":
        require_tensorrt()  # fail before writing anything
    if out.resolve() == src.resolve():
        raise ExportError("export into a new folder, not the artifact itself")
    if out.exists():
        shutil.rmtree(out)
    # An int8 model and its domain model are rebuilt from the new float export, or not at all.
    ignore = shutil.ignore_patterns(MANIFEST_NAME, INT8_ONNX_FILE, INT8_DOMAIN_DIR, ENGINE_FILE)
    shutil.copytree(src, out, ignore=ignore)
    config = read_config(out)
    (out / ONNX_FILE).unlink()
    export_onnx(load_torch_model(out), out / ONNX_FILE, config)  # an older artifact gains `features`
    if calibration is not None:
        export_int8(out, calibration)
    if fmt == "tensorrt":
        build_tensorrt_engine(
            out / ONNX_FILE,
            out / ENGINE_FILE,
            input_name=INPUT_NAME,
            input_shape=(3, config.imgsz, config.imgsz),
        )
    write_manifest(out)
    return out
