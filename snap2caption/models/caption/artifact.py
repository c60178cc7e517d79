"""A caption model as a self-contained folder: save it, and rebuild it in PyTorch from the folder alone.

The folder's layout and ``config.json`` are described (and read without torch) in
:mod:`~snap2caption.models.caption.files`.

LoRA adapters are always merged into the decoder before saving, so the weights are a plain GPT-2 and
serving needs neither peft nor the base checkpoint; ``config.json``'s ``lora`` section records how the model
was trained and ``lora_merged`` whether adapters were folded in. Loading rebuilds the architecture from
``config.json`` alone with random init (no hub, no torchvision download, even for a ``paper`` config whose
weights first came from the hub) and then fills every tensor from ``model.safetensors``. Nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from snap2caption.errors import ArtifactError
from snap2caption.imaging.transforms import Preprocess
from snap2caption.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from snap2caption.models.caption.calibration import CALIBRATION_FILE, Calibration, write_calibration
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.files import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    REQUIRED_FILES,
    WEIGHTS_FILE,
    read_artifact_info,
)
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.models.domain import DOMAIN_ARRAYS_FILE, DOMAIN_FILE
from snap2caption.monitoring.reference import REFERENCE_FILE, DriftReference, read_reference, write_reference

# GPT-2 ties its output projection to the token embedding: stored once, as the embedding.
_TIED_KEY = "decoder.lm_head.weight"
_TIED_TO = "decoder.transformer.wte.weight"


def save_caption_model(
    model: CaptionModel,
    tokenizer: CaptionTokenizer,
    directory: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    drift_reference: DriftReference | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """Write a model, its tokenizer and resolved config as an artifact folder.

    The model is not modified: with LoRA active, a merged copy of the decoder is what gets saved.

    Args:
        model: The model.
        tokenizer: Its tokenizer (must match ``model.tokenizer``).
        directory: Target folder, created if needed; files of the same names are replaced.
        extra: JSON-serialisable facts to keep with the model (data version, metrics, git commit).
        drift_reference: The training data's drift reference, written as ``reference_stats.json``.
        calibration: The confidence calibration training fitted, written as ``calibration.json``.

    Returns:
        The folder.

    Raises:
        ValueError: The tokenizer does not match the model's.
    """
    if tokenizer.describe() != model.tokenizer.describe():
        raise ValueError(f"tokenizer {tokenizer.describe()} is not the model's {model.tokenizer.describe()}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a half-written folder must not verify
    save_file(export_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    tokenizer.save(out)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "tokenizer": tokenizer.describe(),
        "lora_merged": model.lora_active,
        "extra": extra or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if drift_reference is not None:
        write_reference(drift_reference, out)
    else:
        (out / REFERENCE_FILE).unlink(missing_ok=True)  # a replaced model must not keep another's reference
    for name in (DOMAIN_FILE, DOMAIN_ARRAYS_FILE):  # nor its domain: training writes the new one after this
        (out / name).unlink(missing_ok=True)
    if calibration is not None:
        write_calibration(calibration, out)
    else:
        (out / CALIBRATION_FILE).unlink(missing_ok=True)  # nor another model's calibration
    write_manifest(out)
    return out


def load_caption_model(
    directory: str | os.PathLike[str], *, verify: bool = True, device: str | torch.device = "cpu"
) -> tuple[CaptionModel, CaptionTokenizer]:
    """Rebuild a model from its artifact folder alone, offline.

    Args:
        directory: A folder written by :func:`save_caption_model`.
        verify: Check every file against ``MANIFEST.json`` first.
        device: Where to put the weights.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with the saved preprocessing.

    Raises:
        ArtifactIntegrityError: ``verify`` and the files do not match ``MANIFEST.json``.
        ArtifactError: An unknown format, or weights that do not fit the config.
    """
    folder = Path(directory)
    if verify:
        verify_manifest(folder, required=REQUIRED_FILES)
    info = read_artifact_info(folder)
    config = CaptionConfig.from_dict(info["model"])
    tokenizer = CaptionTokenizer.load(folder)
    if tokenizer.describe() != info["tokenizer"]:
        raise ArtifactError(
            f"{folder}: tokenizer {tokenizer.describe()} does not match config {info['tokenizer']}"
        )
    # Saved weights are always merged, so the architecture is built without adapters.
    model = CaptionModel(config, tokenizer, load_pretrained=False, apply_lora=False)
    state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    if _TIED_KEY not in state and _TIED_TO in state:
        state[_TIED_KEY] = state[_TIED_TO]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{folder}: weights do not fit the config: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]}"
        )
    model.preprocess = Preprocess.from_dict(info["preprocess"])
    return model.to(device).eval(), tokenizer


def read_drift_reference(directory: str | os.PathLike[str]) -> DriftReference | None:
    """The artifact's drift reference, or ``None`` for an artifact saved without one."""
    return read_reference(directory)


def export_state_dict(model: CaptionModel) -> dict[str, Tensor]:
    """Every tensor of the model on CPU, LoRA merged (in a copy), the tied output projection stored once."""
    decoder = copy.deepcopy(model.decoder).merge_and_unload() if model.lora_active else model.decoder
    state: dict[str, Tensor] = {}
    for prefix, module in (("encoder", model.encoder), ("mapping", model.mapping), ("decoder", decoder)):
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    if _TIED_KEY in state and state[_TIED_KEY].data_ptr() == state[_TIED_TO].data_ptr():
        del state[_TIED_KEY]
    return state
