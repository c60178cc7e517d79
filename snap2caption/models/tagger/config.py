"""The tagger's artifact, read without torch: file names, :class:`TaggerConfig` and the ONNX file's names.

A tagger artifact folder::

    model.safetensors  the encoder's state dict (``artifact.save_tagger``)
    config.json        :class:`TaggerConfig`: backbone, class count, preprocessing, labels, readable names,
                       the default minimum tag score (calibrated by ``training.tagger``)
    model.onnx         pixels (B, 3, 224, 224) float32 -> logits (B, 1000); ``metadata_props`` carry the
                       format, backbone, class count, preprocessing and labels (``export.export_onnx``)
    model.int8.onnx    optional int8 variant (``export.export_int8``)
    README.md          model card, and eval.json, the labelled-photo evaluation (``training.tagger``)
    MANIFEST.json      sha256 of every other file (``snap2caption.manifest``)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
ONNX_FORMAT = "snap2caption.tagger"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)


@dataclass(frozen=True)
class TaggerConfig:
    """Everything besides the weights needed to rebuild a tagger; saved as ``config.json``.

    Attributes:
        backbone: encoder name for :func:`~snap2caption.models.backbones.build_encoder`.
        num_classes: classifier size; ``labels`` and ``names`` have this many entries.
        preprocess: ``Preprocess.to_dict()`` of the preprocessing the weights expect.
        labels: class labels in output order.
        names: readable word per class, in output order.
        format_version: bumped when the artifact layout changes.
        min_score: the default minimum tag probability: tags scored below it are not returned unless a
            caller asks for another minimum. Packaging calibrates it on labelled photos
            (``training.tagger.package``, recorded in ``eval.json``); 0 (every tag) in an artifact
            packaged before that, or when the photos could not calibrate it.
    """

    backbone: str
    num_classes: int
    preprocess: dict[str, Any]
    labels: list[str]
    names: list[str]
    format_version: int = FORMAT_VERSION
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"tagger format_version {self.format_version} is not {FORMAT_VERSION}")
        if isinstance(self.min_score, bool) or not isinstance(self.min_score, int | float):
            raise ValueError(f"tagger min_score must be a number, got {self.min_score!r}")
        if not 0.0 <= self.min_score < 1.0:
            raise ValueError(f"tagger min_score must be in [0, 1), got {self.min_score}")
        if not len(self.labels) == len(self.names) == self.num_classes:
            raise ValueError(
                f"tagger config: {len(self.labels)} labels and {len(self.names)} names "
                f"for {self.num_classes} classes"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaggerConfig:
        """Build from a dict, refusing unknown keys (with the nearest known key as a hint)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(
                    f"unknown tagger config key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)


def read_config(directory: str | os.PathLike[str]) -> TaggerConfig:
    """The ``config.json`` of a tagger artifact.

    Raises:
        FileNotFoundError: No ``config.json``.
        ValueError: An invalid config.
    """
    return TaggerConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def write_config(config: TaggerConfig, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` into an artifact folder (rewrite its manifest afterwards)."""
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path
