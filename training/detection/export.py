"""Detector artifacts and exports: safetensors + model YAML + config + ONNX (+ int8, + TensorRT).

``write_artifact`` turns a trained Ultralytics network into the folder ``snap2caption.models.detector``
loads; ``export_detector`` re-exports an existing artifact (local folder or registry download) into a new,
self-contained folder with a fresh ONNX file and, on request, ``model.int8.onnx`` or ``model.engine``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from snap2caption.imaging import decode_file
from snap2caption.models import yolo
from snap2caption.models.detector import (
    CONFIG_FILE,
    INPUT_NAME,
    INT8_ONNX_FILE,
    MODEL_YAML_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    Detector,
    DetectorConfig,
    load_torch_model,
)
from snap2caption.registry import MANIFEST_NAME, write_manifest
from training.onnx_tools import (
    ExportError,
    build_tensorrt_engine,
    export_onnx,
    quantize_int8,
    require_tensorrt,
)

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
CARD_FILE = "README.md"
CALIBRATION_IMAGES = 64


def write_artifact(
    out_dir: str | Path, model: nn.Module, model_cfg: dict[str, Any], config: DetectorConfig
) -> Path:
    """Write weights, model YAML, ``config.json`` and ``model.onnx`` (no manifest yet: the card comes later).

    Args:
        out_dir: Target folder (created; files of the same names replaced).
        model: The trained ``DetectionModel`` (unfused; it is not modified).
        model_cfg: Its model dict (``yolo.model_yaml``), ``nc`` is set from the config.
        config: Names, input size and extra facts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a half-written folder must not verify
    save_file(yolo.state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": config.format})
    cfg = {**model_cfg, "nc": config.num_classes}
    (out / MODEL_YAML_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    export_detector_onnx(copy.deepcopy(model), out / ONNX_FILE, config)
    return out


def export_detector_onnx(model: nn.Module, path: str | Path, config: DetectorConfig) -> Path:
    """ONNX export of a ``DetectionModel`` (fused, raw ``(B, 4 + nc, anchors)`` output, dynamic batch)."""
    net = yolo.inference_model(model)
    example = torch.zeros(1, 3, config.imgsz, config.imgsz)
    return export_onnx(
        net,
        path,
        example,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        metadata=config.onnx_metadata(),
    )


def calibration_batches(
    data_dir: str | Path, config: DetectorConfig, count: int = CALIBRATION_IMAGES, batch: int = 8
) -> list[np.ndarray]:
    """Letterboxed training images for int8 calibration (the first ``count`` of the train split)."""
    from training.detection.evaluate import load_split

    root = Path(data_dir)
    rows = load_split(root, "train", count)
    if not rows:
        raise ExportError(f"no training images under {root} to calibrate int8 with")
    detector = Detector(config, lambda x: x, "calibration")  # only its preprocessing is used
    images = [decode_file(root / row["path"]).image for row in rows]
    return [detector.preprocess(images[i : i + batch])[0] for i in range(0, len(images), batch)]


def head_prefixes(model_cfg: dict[str, Any]) -> list[str]:
    """ONNX node-name prefixes of the Detect head's box decoding, kept float32 in the int8 model.

    The box branch ends in pixel coordinates (0..imgsz) that one 8-bit range per tensor cannot hold
    precisely; the class branch and the backbone quantize well.
    """
    head = len(model_cfg["backbone"]) + len(model_cfg["head"]) - 1
    return [f"/model.{head}/dfl", f"/model.{head}/Sub", f"/model.{head}/Add", f"/model.{head}/Div",
            f"/model.{head}/Mul", f"/model.{head}/Concat", f"/model.{head}/Sigmoid"]  # fmt: skip


def export_detector(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: Literal["onnx", "tensorrt"] = "onnx",
    int8: bool = False,
    calibration_data: str | Path | None = None,
) -> Path:
    """Re-export an artifact folder into ``out_dir``: a copy of its files, a fresh ``model.onnx`` with
    metadata, plus ``model.int8.onnx`` (``int8``) or ``model.engine`` (``fmt="tensorrt"``); new manifest.

    Args:
        model_dir: A detector artifact folder (verified against its manifest).
        out_dir: Target folder (replaced).
        fmt: ``onnx``, or ``tensorrt`` (ONNX first, then an engine; needs TensorRT).
        int8: Also write the int8 model, calibrated on ``calibration_data``'s training images.
        calibration_data: ETL output folder for int8 calibration; default the training data recorded in
            the artifact.

    Raises:
        ExportError: TensorRT missing, or no calibration data for int8.
    """
    from snap2caption.registry import verify_manifest

    src, out = Path(model_dir), Path(out_dir)
    verify_manifest(src)
    if fmt == "tensorrt":
        require_tensorrt()  # fail before writing anything
    if out.resolve() == src.resolve():
        raise ExportError("export into a new folder, not the artifact itself")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(MANIFEST_NAME, INT8_ONNX_FILE, ENGINE_FILE))
    config = DetectorConfig.from_dict(json.loads((out / CONFIG_FILE).read_text()))
    model = load_torch_model(out)
    (out / ONNX_FILE).unlink()
    export_onnx(
        model,
        out / ONNX_FILE,
        torch.zeros(1, 3, config.imgsz, config.imgsz),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        metadata=config.onnx_metadata(),
    )
    if int8:
        data = calibration_data or config.extra.get("train", {}).get("data")
        if not data or not Path(data).is_dir():
            raise ExportError(f"int8 calibration needs the training data folder; got {data!r} (--calib-data)")
        cfg = yaml.safe_load((out / MODEL_YAML_FILE).read_text())
        quantize_int8(
            out / ONNX_FILE,
            out / INT8_ONNX_FILE,
            calibration_batches(data, config),
            input_name=INPUT_NAME,
            metadata=config.onnx_metadata(),
            exclude_prefixes=head_prefixes(cfg),
        )
    if fmt == "tensorrt":
        build_tensorrt_engine(
            out / ONNX_FILE,
            out / ENGINE_FILE,
            input_name=INPUT_NAME,
            input_shape=(3, config.imgsz, config.imgsz),
        )
    write_manifest(out)
    return out
