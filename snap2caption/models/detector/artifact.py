"""A detector as an artifact folder (layout: :mod:`~snap2caption.models.detector.config`): write a trained
Ultralytics network into one, rebuild the network from one (YAML + safetensors, no pickle)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from snap2caption.manifest import MANIFEST_NAME
from snap2caption.models.detector import yolo
from snap2caption.models.detector.config import (
    CONFIG_FILE,
    MODEL_YAML_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    DetectorConfig,
)
from snap2caption.models.detector.export import export_onnx


def write_artifact(
    out_dir: str | Path, model: nn.Module, model_cfg: dict[str, Any], config: DetectorConfig
) -> Path:
    """Write weights, model YAML, ``config.json`` and ``model.onnx`` (with its ``features`` output; no
    manifest yet: the domain model and the card come later).

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
    export_onnx(yolo.with_features(yolo.inference_model(copy.deepcopy(model))), out / ONNX_FILE, config)
    return out


def load_torch_model(directory: str | Path) -> nn.Module:
    """The Ultralytics network of an artifact folder, rebuilt from YAML + safetensors, ready for inference:
    its forward returns ``(raw, features)`` (``yolo.with_features``)."""
    folder = Path(directory)
    cfg = yaml.safe_load((folder / MODEL_YAML_FILE).read_text())
    model = yolo.build_detection_model(cfg, nc=int(cfg["nc"]))
    yolo.load_state(model, load_file(str(folder / WEIGHTS_FILE)))
    return yolo.with_features(yolo.inference_model(model))
