"""bench/system.py end to end on the session stack's registry: its own captioner, detector and gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import load_script, read_result
from tests.gateway_stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_smoke_run_writes_its_result(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    # The script sets these for itself and the services it starts; the test process gets them back.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.registry_uri)
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAP2CAPTION_LOG_LEVEL", "WARNING")
    out = tmp_path / "system.json"
    args = [
        "--home", str(tmp_path / "home"), "--endpoints", "captioner,analyze", "--concurrency", "1,2",
        "--duration-s", "1", "--warmup-s", "0.5", "--baseline-images", "2", "--out", str(out),
        "--rate", "4", "--rate-s", "2",
    ]  # fmt: skip
    returned = load_script("system").main(args)
    figures = read_result(out, "system")
    assert figures == returned
    assert figures["captioner_version"] >= 1
    assert figures["baseline"]["requests"] == 2 and figures["baseline"]["p50_ms"] > 0
    levels = [(level["name"], level["concurrency"]) for level in figures["levels"]]
    closed = [(path, c) for path in ("/v1/caption", "/v1/analyze") for c in (1, 2)]
    assert levels[:-1] == closed
    poisson = figures["levels"][-1]  # the open loop: seeded Poisson arrivals, 4/s for 2 s
    assert poisson["name"] == "/v1/analyze poisson 4/s" and poisson["rate_per_s"] == 4
    assert poisson["concurrency"] >= 1  # the most in flight at once
    for level in figures["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0, level
        assert level["p95_ms"] >= level["p50_ms"] > 0 and level["images_per_s"] > 0
    assert [r["concurrency"] for r in figures["captioner_ratios"]] == [1, 2]
    rss = figures["peak_rss_mb"]
    assert set(rss) == {"captioner", "detector", "gateway", "etl", "total"}  # the whole starter system
    services = ("captioner", "detector", "gateway", "etl")
    assert rss["total"] == pytest.approx(sum(rss[name] for name in services))
    assert (tmp_path / "home" / "models").is_dir()  # the services' model cache, under --home
