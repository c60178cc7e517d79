"""The tagger's export: ``model.onnx`` (self-describing), its static int8 variant, a TensorRT engine.

The files land in an artifact folder written by :func:`~snap2caption.models.tagger.artifact.save_tagger`;
``training.tagger.package`` measures them and writes the card and the manifest.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snap2caption.models.onnx_export import build_tensorrt_engine, quantize_int8
from snap2caption.models.onnx_export import export_onnx as export_module
from snap2caption.models.tagger.config import (
    INPUT_NAME,
    INT8_ONNX_FILE,
    ONNX_FILE,
    ONNX_FORMAT,
    OUTPUT_NAME,
    TaggerConfig,
    read_config,
)
from snap2caption.models.tagger.net import TaggerNet

ENGINE_FILE = "model.engine"


def onnx_metadata(config: TaggerConfig) -> dict[str, Any]:
    """``metadata_props`` of a tagger ONNX file (JSON values), so the file describes itself."""
    size = config.preprocess["crop"]
    return {
        "snap2caption.format": ONNX_FORMAT,
        "task": "classify",
        "backbone": config.backbone,
        "num_classes": config.num_classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "layout": "NCHW RGB"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", config.num_classes], "kind": "logits"},
        "preprocess": config.preprocess,
        "labels": config.labels,
        "names": config.names,
    }


def export_onnx(net: TaggerNet, folder: str | Path) -> Path:
    """Export ``net`` to ``folder/model.onnx`` (dynamic batch, metadata from its config)."""
    config = net.config()
    size = config.preprocess["crop"]
    return export_module(
        net.eval(),
        Path(folder) / ONNX_FILE,
        torch.zeros(1, 3, size, size),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        metadata=onnx_metadata(config),
    )


def export_int8(folder: str | Path, calibration: Iterable[np.ndarray]) -> Path:
    """``folder/model.int8.onnx``: ``model.onnx`` statically quantized, calibrated on preprocessed batches."""
    folder = Path(folder)
    return quantize_int8(
        folder / ONNX_FILE,
        folder / INT8_ONNX_FILE,
        calibration,
        input_name=INPUT_NAME,
        metadata=onnx_metadata(read_config(folder)),
    )


def export_tensorrt(folder: str | Path) -> Path:
    """``folder/model.engine`` from ``model.onnx`` (needs TensorRT)."""
    folder = Path(folder)
    size = read_config(folder).preprocess["crop"]
    return build_tensorrt_engine(
        folder / ONNX_FILE, folder / ENGINE_FILE, input_name=INPUT_NAME, input_shape=(3, size, size)
    )
