"""bench/serving.py end to end on the tiny caption config: baseline, ONNX export, a real captioner process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import ROOT, load_script, read_result

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_smoke_run_writes_its_result(tmp_path: Path, mlflow_template_db: Path, one_thread: None) -> None:
    out = tmp_path / "serving.json"
    args = [
        "--config", str(ROOT / "training/configs/caption/tiny.yaml"), "--tokens", "4", "--runtime", "onnx",
        "--concurrency", "1,2", "--duration-s", "1", "--warmup-s", "0.5", "--baseline-images", "2",
        "--registry-template", str(mlflow_template_db), "--out", str(out),
    ]  # fmt: skip
    returned = load_script("serving").main(args)
    figures = read_result(out, "serving")
    assert figures == returned
    assert figures["baseline"]["requests"] == 2 and figures["baseline"]["p50_ms"] > 0
    assert [level["concurrency"] for level in figures["levels"]] == [1, 2]
    for level in figures["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0, level
        assert level["p50_ms"] > 0 and level["images_per_s"] > 0 and level["mean_batch"] >= 1
    assert figures["peak_rss_mb"] > 0
    assert [r["concurrency"] for r in figures["ratios"]] == [1, 2]
    assert all(r["p50_latency"] > 0 and r["throughput"] > 0 for r in figures["ratios"])
