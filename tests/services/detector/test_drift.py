"""The detector engine feeds its drift monitor: every image prepared for /v1/detect, the reference from the
detector artifact, the state in ``/readyz``'s detector check (in-process; the captioner's process-level test
covers the HTTP and ``/metrics`` side)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from services.detector.config import Settings
from services.detector.engine import DetectorEngine
from snap2caption.imaging import decode_image
from snap2caption.manifest import write_manifest
from snap2caption.monitoring.reference import ALERT_THRESHOLD, build_reference, write_reference
from snap2caption.monitoring.stats import decoded_stats
from snap2caption.registry import Registry
from tests.services.detector.conftest import Artifacts, noise_image


def test_detect_images_feed_the_monitor_against_the_artifacts_reference(
    artifacts: Artifacts, mlflow_template_db: Path, tmp_path: Path
) -> None:
    # The session's detector artifact, plus a reference of 64 x 48 PNGs, in a registry of its own.
    folder = tmp_path / "detector"
    shutil.copytree(artifacts.detector, folder)
    reference_images = [noise_image(64, 48, seed=s) for s in range(200)]
    stats = [decoded_stats(decode_image(data)).to_dict() for data in reference_images]
    write_reference(build_reference(stats, dataset_version="test"), folder)
    write_manifest(folder)
    shutil.copyfile(mlflow_template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = Registry(uri)
    registry.register("detector", folder, metrics={"test_map50_95": 0.5})
    assert registry.promote("detector").status == "promoted"
    settings = Settings(
        tracking_uri=uri,
        model_cache_dir=tmp_path / "cache",
        tagger_alias="none",  # only the detector matters here
        poll_interval_s=0,
        drift_window=50,
        drift_min_samples=50,
        drift_every=10,
    )

    async def scenario() -> None:
        engine = DetectorEngine(settings)
        engine.start()
        try:
            deadline = time.monotonic() + 60
            while engine.detector.store.current is None:
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            drift = engine.readiness().checks["detector"]["drift"]
            assert drift["enabled"] is True and drift["samples"] == 0, drift
            options = engine.detect_options(None, None, None)
            same = [noise_image(64, 48, seed=1000 + s) for s in range(50)]
            await engine.prepare(same, objects=options)
            psi = engine.drift.monitor.psi_values()
            assert psi["width"] < 0.1 and psi["aspect"] < 0.1 and psi["format"] < 0.1, psi
            wide = [noise_image(160, 40, seed=2000 + s, fmt="JPEG") for s in range(50)]  # another shape
            await engine.prepare(wide, objects=options)
            drift = engine.readiness().checks["detector"]["drift"]
            assert drift["samples"] == 50
            assert {"width", "aspect", "format"} <= set(drift["drifting"]), drift
            assert drift["psi"]["height"] > ALERT_THRESHOLD  # 40 px, never seen in the reference
        finally:
            await engine.close(1)

    asyncio.run(scenario())
