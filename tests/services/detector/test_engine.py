"""The detector engine in-process: backend choice, settings checks, readiness with one model missing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.detector.config import Settings
from services.detector.engine import DetectOptions, DetectorEngine, resolve_backend
from snap2caption.errors import NotReady
from tests.services.detector.conftest import Artifacts


def test_auto_backend_prefers_onnx_when_the_artifact_has_it(tmp_path: Path) -> None:
    assert resolve_backend("auto", tmp_path, "model.onnx") == "torch"
    (tmp_path / "model.onnx").write_bytes(b"")
    assert resolve_backend("auto", tmp_path, "model.onnx") == "onnx"
    assert resolve_backend("torch", tmp_path, "model.onnx") == "torch"
    assert resolve_backend("onnx", tmp_path / "missing", "model.onnx") == "onnx"


def test_settings_defaults_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.port, settings.detector_model, settings.tagger_model) == (8002, "detector", "tagger")
    assert (settings.detector_alias, settings.detector_backend) == ("production", "auto")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_TAGGER_ALIAS", "candidate")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_MAX_QUEUE", "64")
    settings = Settings()
    assert (settings.tagger_alias, settings.max_queue) == ("candidate", 64)
    with pytest.raises(ValidationError, match="max_det must be <= max_det_limit"):
        Settings(max_det=500, max_det_limit=300)
    with pytest.raises(ValidationError, match="top_k must be <= top_k_limit"):
        Settings(top_k=10, top_k_limit=5)
    with pytest.raises(ValidationError, match="max_images_per_request must be <= max_batch_size"):
        Settings(max_images_per_request=16, max_batch_size=8)
    with pytest.raises(ValidationError):
        Settings(detector_backend="tensorrt")


def test_ready_only_when_both_models_are_loaded(artifacts: Artifacts, tmp_path: Path) -> None:
    """The tagger's alias names nothing: the detector serves, the tagger answers 503, /readyz says why."""
    settings = Settings(
        tracking_uri=artifacts.uri, model_cache_dir=tmp_path, tagger_alias="staging", poll_interval_s=0
    )

    async def scenario() -> None:
        engine = DetectorEngine(settings)
        engine.start()
        try:
            deadline = time.monotonic() + 30
            while (
                engine.detector.store.current is None or not engine.tagger.store.status()["last_poll_error"]
            ):
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            readiness = engine.readiness()
            assert not readiness.ready
            assert readiness.reason.startswith("tagger not loaded yet") and "staging" in readiness.reason
            assert readiness.checks["detector"]["version"] == 1
            assert readiness.checks["detector"]["runtime"] == "onnx"
            assert readiness.checks["tagger"]["version"] is None
            assert engine.detect_options(None, None, None) == DetectOptions(0.25, 0.45, 100)
            with pytest.raises(NotReady, match="tagger@staging"):
                engine.tag_options(None, None)
        finally:
            await engine.close(1)

    asyncio.run(scenario())
