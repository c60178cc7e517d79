"""Data and a running ETL service shared by the ETL tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snap2caption.data.synth import SynthConfig, write_synth
from tests.helpers import ServiceProcess
from tests.services.etl.etl_helpers import BIG_IMAGES, CORRUPT, SMALL_IMAGES, etl_env


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small/`` (one image truncated), ``big/``, and traps: a symlink out of the root, a file outside."""
    root = tmp_path_factory.mktemp("etl") / "data"
    write_synth(root / "small", SynthConfig(images=SMALL_IMAGES, seed=1), progress=False)
    corrupt = root / "small" / "images" / CORRUPT
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    write_synth(root / "big", SynthConfig(images=BIG_IMAGES, seed=0), progress=False)
    outside = root.parent / "outside"
    (outside / "images").mkdir(parents=True)
    (outside / "captions.json").write_text("{}")
    os.symlink(outside, root / "escape")
    return root


@pytest.fixture(scope="module")
def etl(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One ETL service for the tests that do not restart it."""
    scratch = tmp_path_factory.mktemp("etl-service")
    service = ServiceProcess(
        "etl", scratch / "etl.log", env=etl_env(data_root, scratch / "jobs.sqlite"), cwd=scratch
    )
    service.start()
    yield service
    service.stop()
