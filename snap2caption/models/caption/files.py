"""The files of a caption artifact, read without torch: names, ``config.json`` and what the folder offers.

A caption artifact folder::

    model.safetensors       every tensor of the model (encoder, mapping, decoder), float as trained
    config.json             {"format", "format_version", "model": resolved CaptionConfig, "preprocess",
                             "tokenizer": special ids and size, "lora_merged", "extra"}
    tokenizer.json          the CaptionTokenizer
    reference_stats.json    optional: the drift reference (training images' statistics, caption confidence)
    domain.json, domain.npz optional: the training domain in ``prefix.pooled`` space (``caption.domain``)
    calibration.json        optional: the confidence calibration (``calibration.py``; without it the raw
                            confidence is served)
    onnx/encoder.onnx       optional: pixels (B, 3, H, W) -> prefix (B, P, D)  (``export.py``)
    onnx/decoder.onnx       optional: one KV-cached GPT-2 step                  (``export.py``)
    onnx/decoder.int8.onnx  optional: the same step, dynamically quantized      (``export.py``)
    MANIFEST.json           sha256 and size of every other file (``snap2caption.manifest``)

Written by :mod:`~snap2caption.models.caption.artifact` (torch) and
:mod:`~snap2caption.models.caption.export`; read here by both runtimes, the ONNX Runtime one without torch
in the process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from snap2caption.errors import ArtifactError
from snap2caption.models.caption.tokenizer import TOKENIZER_FILE

FORMAT = "snap2caption.caption_model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)

ONNX_FORMAT = "snap2caption.caption_model.onnx"
ENCODER_FILE = "onnx/encoder.onnx"
DECODER_FILE = "onnx/decoder.onnx"
DECODER_INT8_FILE = "onnx/decoder.int8.onnx"

# In config.json's "extra", when training records it: the longest side of the images it read.
IMAGE_MAX_SIDE_KEY = "image_max_side"


# Architecture settings added to ``config.json``'s ``model`` after format version 1 was first written, with
# the value that rebuilds what an artifact written before them holds (their defaults today may differ).
_ADDED_SETTINGS: dict[tuple[str, str], Any] = {
    ("encoder", "colour_cells"): 0,
    ("encoder", "detail_stride"): 0,
    ("mapping", "coords"): 0,
    ("mapping", "order"): "rows",
    ("decoder", "activation"): "gelu_pytorch_tanh",
}


def read_artifact_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.json`` of an artifact, its format checked (no verification of hashes).

    Settings added to the architecture since the format was first written are filled in, when missing,
    with the value an older artifact was built with.

    Raises:
        ArtifactError: Unreadable, or not a caption artifact of this format version.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} artifact")
    if info.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {info.get('format_version')} is not {FORMAT_VERSION}")
    model = info.get("model")
    for (section, key), value in _ADDED_SETTINGS.items():
        if isinstance(model, dict) and isinstance(model.get(section), dict):
            model[section].setdefault(key, value)
    return info


def image_max_side(info: dict[str, Any]) -> int | None:
    """The longest image side training recorded in ``config.json``'s ``extra`` (None when it did not)."""
    value = info.get("extra", {}).get(IMAGE_MAX_SIDE_KEY)
    return int(value) if value else None


def has_onnx(folder: str | os.PathLike[str]) -> bool:
    """Whether an artifact folder carries the ONNX export."""
    return all((Path(folder) / name).is_file() for name in (ENCODER_FILE, DECODER_FILE))
