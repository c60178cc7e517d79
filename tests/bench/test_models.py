"""bench/models.py on the tiny detector and tagger of the detector service's tests: every runtime timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import load_script, read_result

pytestmark = pytest.mark.slow


def test_smoke_run_writes_its_result(tmp_path: Path, one_thread: None) -> None:
    from tests.services.detector.conftest import random_detector, tiny_tagger

    detector = random_detector(tmp_path / "detector")
    tagger, _ = tiny_tagger(tmp_path / "tagger")
    out = tmp_path / "models.json"
    args = ["--detector", str(detector), "--tagger", str(tagger), "--data", str(tmp_path / "no-data")]
    returned = load_script("models").main([*args, "--batches", "1,2", "--repeats", "1", "--out", str(out)])
    figures = read_result(out, "models")
    assert figures == returned  # floats survive JSON exactly
    for model in ("detector", "tagger"):
        ms = figures[model]["ms_per_image"]
        assert set(ms) >= {"pytorch", "ort-fp32"}  # int8 only where the artifact has its int8 export
        assert all(ms[runtime][batch] > 0 for runtime in ms for batch in ("1", "2"))
        assert figures[model]["vs_pytorch"]["pytorch"] == {"1": 1.0, "2": 1.0}
