"""bench/result_json.py: the one writer of bench results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.bench.conftest import load_script, read_result


def test_a_result_holds_the_run_and_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result_json = load_script("result_json")
    monkeypatch.setenv("SNAP2CAPTION_ORT_PROVIDERS", "cpu")
    record = result_json.BenchRecord("demo")
    out = tmp_path / "deep" / "demo.json"
    figures = {"p50_ms": 12.5, "empty_level_p50_ms": math.nan, "by_batch": {1: 3.0}, "where": tmp_path}
    assert record.write(figures, config={"out": out, "levels": (1, 8)}, out=out) == out
    written = read_result(out, "demo")
    expected = {"p50_ms": 12.5, "empty_level_p50_ms": None, "by_batch": {"1": 3.0}, "where": str(tmp_path)}
    assert written == expected
    result = json.loads(out.read_text())
    assert result["config"]["levels"] == [1, 8]
    assert result["environment"]["SNAP2CAPTION_ORT_PROVIDERS"] == "cpu"
    assert set(result["versions"]) >= {"python", "torch", "onnxruntime", "snap2caption", "git"}
    assert set(result["versions"]["git"]) == {"commit", "dirty"}


def test_results_are_named_by_script_and_utc_start() -> None:
    result_json = load_script("result_json")
    path = result_json.BenchRecord("serving").default_path()
    assert path.parent == result_json.RESULTS and path.parent.name == "results"
    assert path.name.startswith("serving-") and path.name.endswith("Z.json")
