"""Fixtures of the search tests: the caption and detector tests' synthetic data and registries, and a short
folder of Ray's own per test that must hold no Ray process once the test is over."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.training.caption.conftest import _one_thread, caption_data, registry  # noqa: F401
from tests.training.detector.conftest import _yolo_home, tiny_data  # noqa: F401


def ray_processes(folder: Path) -> list[dict[str, object]]:
    """The processes whose command line names ``folder`` (every Ray process of a session under it)."""
    return [
        p.info
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(folder) in " ".join(p.info["cmdline"] or [])
    ]


@pytest.fixture()
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short ``RAY_TMPDIR`` (Ray's socket paths must stay under 107 bytes); afterwards, no Ray process
    of it may be left."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    yield folder
    left = ray_processes(folder)
    assert not left, f"Ray processes left behind: {left}"
