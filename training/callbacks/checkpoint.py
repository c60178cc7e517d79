"""Resumable checkpoints every N steps: weights as safetensors, the rest with ``torch.save`` of plain data.

A checkpoint folder ``<root>/step-<step>/`` holds::

    model.safetensors   every weight of the model now
    best.safetensors    the best-scoring weights so far (when there was a validation)
    tokenizer.json      the tokenizer (a resumed run must not retrain it)
    state.pt            optimizer, grad scaler, RNG state, counters, callback state, the run config:
                        tensors and plain Python data only, read back with ``torch.load(weights_only=True)``

It is written to a temporary folder and renamed into place, so a crash never leaves half a checkpoint
that looks whole.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor

from snap2caption.models.caption.tokenizer import CaptionTokenizer
from training.callbacks.base import Callback

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, BEST_FILE, STATE_FILE = "model.safetensors", "best.safetensors", "state.pt"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest step first."""
    folder = Path(root)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(trainer: Any, root: str | Path) -> Path:
    """Write the trainer's checkpoint for its current step under ``root``; returns the folder."""
    target = Path(root) / f"step-{trainer.state.step:07d}"
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(
        trainer.model, str(staging / MODEL_FILE)
    )  # drops GPT-2's tied duplicate, load_model restores it
    if trainer.best_weights is not None:
        save_file(trainer.best_weights, str(staging / BEST_FILE))
    trainer.tokenizer.save(staging)
    torch.save(trainer.state_dict(), staging / STATE_FILE)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


@dataclass
class Checkpoint:
    """A checkpoint read back.

    Attributes:
        path: Its folder.
        state: What ``trainer.state_dict()`` returned (``config`` included).
        tokenizer: The run's tokenizer.
        best_weights: The best weights so far, or None.
    """

    path: Path
    state: dict[str, Any]
    tokenizer: CaptionTokenizer
    best_weights: dict[str, Tensor] | None

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.state["config"]
        return config

    def load_weights(self, model: torch.nn.Module) -> None:
        """Load the checkpoint's current weights into ``model`` (strict)."""
        missing, unexpected = load_model(model, str(self.path / MODEL_FILE), strict=True)
        if missing or unexpected:
            raise RuntimeError(f"{self.path}: weights do not fit: missing {missing}, unexpected {unexpected}")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder; no object is unpickled (``weights_only=True``).

    Raises:
        FileNotFoundError: Not a complete checkpoint folder.
    """
    folder = Path(path)
    if not (folder / STATE_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_FILE} and {MODEL_FILE})")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    best = load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).is_file() else None
    return Checkpoint(folder, state, CaptionTokenizer.load(folder), best)


class CheckpointCallback(Callback):
    """Save a checkpoint every ``every`` steps and when training ends; keep the newest ``keep``.

    Args:
        root: Folder of the checkpoints (``<run>/checkpoints``).
        every: Steps between checkpoints (0: only the last one).
        keep: How many to keep.
    """

    def __init__(self, root: str | Path, every: int, keep: int = 2) -> None:
        self.root = Path(root)
        self.every = every
        self.keep = keep
        self.last_saved: Path | None = None

    def _save(self, trainer: Any) -> None:
        self.last_saved = save_checkpoint(trainer, self.root)
        for old in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", self.last_saved)

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: Any) -> None:
        if self.last_saved is None or self.last_saved.name != f"step-{trainer.state.step:07d}":
            self._save(trainer)
