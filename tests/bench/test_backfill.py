"""bench/backfill.py end to end on the session stack's registry: the gateway one by one, then local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.conftest import load_script, read_result
from tests.gateway_stack import Stack

pytest.importorskip("ray")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]


def test_smoke_run_writes_its_result(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    # The script sets these for itself and what it starts; the test process gets them back.
    for name in ("MLFLOW_TRACKING_URI", "SNAP2CAPTION_HOME", "SNAP2CAPTION_LOG_LEVEL"):
        # setenv first: a plain delenv of an unset variable records nothing to restore, so what the
        # script sets would leak into every later test (SNAP2CAPTION_LOG_LEVEL=WARNING did: a later test
        # reading a service's INFO log failed).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "backfill.json"
    args = ["--tracking-uri", stack.registry_uri, "--images", "4", "--warmup", "1", "--batch-size", "2"]
    returned = load_script("backfill").main([*args, "--out", str(out)])
    figures = read_result(out, "backfill")
    assert figures == returned
    assert figures["gateway"] == {
        "images_per_s": figures["gateway"]["images_per_s"],
        "failed": {},  # no failed answer, no feature left out
        "images": 4,
    }
    assert figures["gateway"]["images_per_s"] > 0
    backfill = figures["backfill"]
    assert (backfill["done"], backfill["quarantined"]) == (4, 0)
    assert backfill["images_per_s"] > 0 and backfill["seconds"] > 0
    assert backfill["models"] == {"caption": "captioner/1", "tags": "tagger/1", "objects": "detector/1"}
    assert figures["ratio"]["whole_run"] == pytest.approx(
        backfill["images_per_s"] / figures["gateway"]["images_per_s"]
    )
