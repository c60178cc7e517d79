"""The detector's artifact, read without torch: file names and :class:`DetectorConfig`.

A detector artifact folder::

    model.safetensors   DetectionModel state dict (float32, unfused)
    model.yaml          the Ultralytics model definition (dict, ``nc`` and ``scale`` included)
    model.onnx          images (B, 3, S, S) float32 -> output0 (B, 4 + nc, anchors) and features (B, C)
                        (``FEATURE_NAME``; artifacts exported before it have output0 alone); metadata_props
                        hold the class names, input size, letterbox and normalisation (``DetectorConfig``)
    model.int8.onnx     optional: the same graph, int8 (``snap2caption export detector --int8``)
    config.json         ``DetectorConfig`` plus ``extra`` (training config, metrics, data)
    domain.json         optional: the training domain in ``FEATURE_NAME`` space
    domain.npz          (``snap2caption.models.domain``), written by training; older artifacts have none
    int8/domain.*       optional: the same, fitted on ``model.int8.onnx``'s own features (quantized
                        activations shift them), written by ``snap2caption export detector --int8``
    README.md           model card
    MANIFEST.json       sha256 of every other file (``snap2caption.manifest``)

Written by :mod:`~snap2caption.models.detector.artifact` and :mod:`~snap2caption.models.detector.export`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from snap2caption.config import from_dict

FORMAT = "snap2caption.detector"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_YAML_FILE = "model.yaml"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
INT8_DOMAIN_DIR = "int8"  # the int8 model's own domain model (its features differ from the float model's)
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
FEATURES_OUTPUT_NAME = "features"
# The detector's own image features: the global average pools of backbone layers 2 and 4 (strides 4 and 8),
# concatenated, (B, C2 + C4); computed in the same forward pass as the boxes (``yolo.with_features``, which
# says why these layers). The domain model is fitted on them.
FEATURE_LAYERS = (2, 4)
FEATURE_NAME = "backbone.layers2+4.pooled"
REQUIRED_FILES = (CONFIG_FILE,)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything besides the weights that a runtime needs; ``config.json`` and the ONNX metadata.

    Attributes:
        names: Class names in output order.
        imgsz: Side of the square network input.
        stride: Largest stride of the network (``imgsz`` is a multiple of it).
        model: The Ultralytics model YAML it was built from (``yolov8n.yaml``).
        pad_value: Letterbox padding grey level (0..255).
        resample: PIL filter of the letterbox resize.
        scale: Pixel scale: input = RGB pixel * ``scale``.
        format: Artifact format name.
        format_version: Bumped when the layout changes.
        extra: Facts kept with the model (training config, metrics, data); not used at run time.
    """

    names: list[str]
    imgsz: int
    stride: int
    model: str
    pad_value: int = 114
    resample: Literal["bilinear"] = "bilinear"
    scale: float = 1.0 / 255.0
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} config: {self.format} v{self.format_version}")
        if not self.names:
            raise ValueError("a detector needs at least one class name")
        if self.imgsz < self.stride or self.imgsz % self.stride:
            raise ValueError(f"imgsz {self.imgsz} must be a positive multiple of the stride {self.stride}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """Build from a dict; unknown keys are refused with the nearest known one."""
        extra = data.get("extra", {})
        config = from_dict(cls, {k: v for k, v in data.items() if k != "extra"})
        return DetectorConfig(**{**asdict(config), "extra": dict(extra)})

    def onnx_metadata(self) -> dict[str, Any]:
        """What goes into the ONNX file's ``metadata_props`` (JSON values), so the file describes itself."""
        return {
            "snap2caption.format": self.format,
            "format_version": self.format_version,
            "task": "detect",
            "names": self.names,
            "imgsz": self.imgsz,
            "stride": self.stride,
            "model": self.model,
            "input": {
                "name": INPUT_NAME,
                "shape": ["batch", 3, self.imgsz, self.imgsz],
                "layout": "NCHW RGB",
            },
            "output": {
                "name": OUTPUT_NAME,
                "shape": ["batch", 4 + self.num_classes, "anchors"],
                "rows": "cx, cy, w, h (input pixels), then one sigmoid score per class; NMS not included",
            },
            "features": {
                "name": FEATURES_OUTPUT_NAME,
                "shape": ["batch", "channels"],
                "feature": FEATURE_NAME,
                "rows": "global average pools of backbone layers 2 and 4, concatenated (the domain's input)",
            },
            "letterbox": {
                "resize": f"keep aspect, longer side = imgsz, PIL {self.resample}",
                "pad_value": self.pad_value,
                "center": True,
            },
            "normalize": {"scale": self.scale, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        }

    def check_onnx_metadata(self, metadata: dict[str, str]) -> None:
        """Raise ``ValueError`` unless an ONNX file's metadata matches this config (names, size, format)."""
        for key in ("snap2caption.format", "names", "imgsz"):
            if key not in metadata:
                raise ValueError(
                    f"ONNX metadata has no {key!r}; export it with `snap2caption export detector`"
                )
        got = (metadata["snap2caption.format"], json.loads(metadata["names"]), json.loads(metadata["imgsz"]))
        if got != (self.format, self.names, self.imgsz):
            raise ValueError(
                f"ONNX metadata {got} does not match config.json {(self.format, self.names, self.imgsz)}"
            )


def config_from_metadata(metadata: dict[str, str]) -> DetectorConfig:
    """Rebuild a ``DetectorConfig`` from ONNX ``metadata_props`` written by ``onnx_metadata``."""
    try:
        return DetectorConfig(
            names=list(json.loads(metadata["names"])),
            imgsz=int(json.loads(metadata["imgsz"])),
            stride=int(json.loads(metadata["stride"])),
            model=metadata.get("model", ""),
            pad_value=int(json.loads(metadata["letterbox"])["pad_value"]),
            scale=float(json.loads(metadata["normalize"])["scale"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"ONNX metadata does not describe a detector: {exc}") from exc


def read_config(directory: str | os.PathLike[str]) -> DetectorConfig:
    """The ``config.json`` of a detector artifact.

    Raises:
        FileNotFoundError: No ``config.json``.
        ValueError: An invalid config.
    """
    return DetectorConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))
