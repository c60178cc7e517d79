"""Fixtures for the caption training tests: a small synthetic dataset through the real ETL, made once per
session, and MLflow registries in SQLite files under pytest's temporary folders.

Everything runs the ``tiny`` preset (a 3-conv encoder at 64 px and a 2-layer 32-wide GPT-2) on one thread.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snap2caption.config import Override
from snap2caption.registry import Registry
from tests.helpers import torch_threads
from training.caption.config import CaptionRunConfig

# 72 scenes -> about 58 train / 7 val / 7 test images after the ETL's hash split, 5 captions each.
N_IMAGES = 72


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors, and OpenMP barriers stall when other processes share the cores."""
    with torch_threads(1):  # tiny tensors; processes share the cores
        yield


def synthetic_etl(root: Path, *, boxes: bool) -> Path:
    """The ETL output (manifests, resized images) of N_IMAGES synthetic scenes written under ``root``; with
    ``boxes`` the manifests also hold each image's boxes (the instances file)."""
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth

    write_synth(
        root / "synth", SynthConfig(images=N_IMAGES, seed=3, image_size=96, workers=1), progress=False
    )
    annotations = root / "synth" / "annotations"
    out = root / "processed"
    run_etl(
        EtlConfig(
            source="coco",
            images=root / "synth" / "images",
            annotations=[annotations / "captions.json"] + ([annotations / "instances.json"] if boxes else []),
            out=out,
            workers=1,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ETL output of a small synthetic shapes benchmark, captions only."""
    return synthetic_etl(tmp_path_factory.mktemp("caption_data"), boxes=False)


def new_registry(template: Path, folder: Path) -> Registry:
    """A registry on a fresh copy of the template database, artifacts beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return Registry(f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture()
def registry(mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A registry of this test's own; ``MLFLOW_TRACKING_URI`` points at it too (for the CLI)."""
    reg = new_registry(mlflow_template_db, tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.tracking_uri)
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(tmp_path / "home"))
    return reg


def tiny(*overrides: Override) -> CaptionRunConfig:
    """The tiny preset with overrides."""
    return CaptionRunConfig.load("tiny", overrides)


def tiny_run(data: Path, out: Path, *overrides: Override) -> CaptionRunConfig:
    """The tiny preset training on ``data`` into ``out``, with overrides."""
    return tiny(("run.data", str(data)), ("run.out", str(out)), *overrides)
