"""Model folders and registry copies for the registry tests (and the CLI's ``registry push`` tests).

MLflow's first database migration takes seconds, so the tests copy the migrated template database of
``tests/conftest.py`` (``mlflow_template_db``) for every registry they need.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from snap2caption.manifest import write_manifest
from snap2caption.registry import Registry


def copy_db(template: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copyfile(template, db)
    return db


def make_model(folder: Path, seed: str = "a") -> Path:
    """A small model folder in the project's shape, with its manifest."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 32, "seed": seed}))
    (folder / "model.safetensors").write_bytes(seed.encode() * 1000)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text(f"# model {seed}\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\x08\x07" + seed.encode() * 10)
    write_manifest(folder)
    return folder


def register(registry: Registry, name: str, tmp_path: Path, cider: float, seed: str | None = None) -> int:
    seed = seed or f"{cider}"
    folder = make_model(tmp_path / f"{name}-{seed}", seed)
    return registry.register(name, folder, metrics={"test_cider_d": cider, "test_bleu4": 0.5}).version


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
