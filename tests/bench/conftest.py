"""Smoke runs of the ``bench/`` scripts: each through its own ``main([...])`` on tiny models and a few
requests, so that a script cannot rot unnoticed. They check that a run writes its JSON result with its
figures, never the figures' values: these runs are too small to measure anything."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import torch_threads

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def load_script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (each script puts ``bench/`` on ``sys.path`` to import its siblings,
    for as long as its own imports take)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # the scripts' own imports are done: bench/ leaves the test process's path
    return module


def read_result(path: Path, script: str) -> dict[str, Any]:
    """The JSON result a run wrote, checked for what every result holds; its ``figures``."""
    result = json.loads(path.read_text())  # strict JSON: NaN would not parse back the same
    assert result["script"] == script
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["cpu_model"]
    assert len(result["load_average"]["start"]) == len(result["load_average"]["end"]) == 3
    assert result["versions"]["python"] and result["versions"]["onnxruntime"]
    assert result["wall_s"] >= 0 and result["started_at"] <= result["finished_at"]
    assert result["config"]["out"] == str(path)
    figures: dict[str, Any] = result["figures"]
    return figures


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """The scripts set torch's threads for the process; the test process gets its setting back."""
    with torch_threads(1):
        yield
