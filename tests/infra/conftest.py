"""One monitored stack for the monitoring tests: the four services and a real Prometheus scraping them.

- The tiny models of the service tests (captioner, detector, tagger), registered in a temporary MLflow
  registry; the detector artifact also carries drift reference statistics of small noise images, and the
  detector computes PSI over tiny windows, so the drift panels have data.
- The captioner has a one-image queue whose batches wait 200 ms to fill: of two concurrent requests the
  second is refused with 503 ``overloaded`` (the server errors the 5xx panels and alerts need).
- The gateway runs two uvicorn workers (prometheus-client multiprocess mode, its folder known to the
  tests), as a deployment would: the dashboards are proven on summed metrics, and
  ``test_metrics_multiprocess.py`` checks the sums.
- Prometheus scrapes every second with the real rule files (``infra_helpers.config_for_targets``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServiceProcess
from tests.infra.infra_helpers import PrometheusProcess

GATEWAY_WORKERS = 2


@dataclass
class MonitoredStack:
    """The running services (by Prometheus job name), the Prometheus scraping them, and where the gateway's
    workers keep their metric files."""

    services: dict[str, ServiceProcess]
    prometheus: PrometheusProcess
    gateway_metrics_dir: Path


def encode(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 72), fmt: str = "PNG") -> bytes:
    """A solid-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _register_models(workdir: Path, template_db: Path) -> str:
    """The tiny captioner, detector (with a drift reference) and tagger, registered and promoted."""
    from snap2caption.imaging import decode_image
    from snap2caption.manifest import write_manifest
    from snap2caption.models.caption.artifact import save_caption_model
    from snap2caption.monitoring.reference import build_reference, write_reference
    from snap2caption.monitoring.stats import decoded_stats
    from snap2caption.registry import Registry
    from tests.helpers import torch_threads
    from tests.services.captioner.conftest import CAPTIONS, IMAGE_MAX_SIDE, train_tiny
    from tests.services.detector.conftest import random_detector, tiny_tagger

    db = workdir / "mlflow.db"
    shutil.copyfile(template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    with torch_threads(1):  # tiny tensors; the service processes share the cores
        model, tokenizer = train_tiny(CAPTIONS, seed=1)
        caption = save_caption_model(
            model, tokenizer, workdir / "caption-artifact", extra={"image_max_side": IMAGE_MAX_SIDE}
        )
        detector = random_detector(workdir / "detector-artifact")
        tagger, tagger_metrics = tiny_tagger(workdir / "tagger-artifact")
    reference = [decoded_stats(decode_image(_noise(64, 48, seed))).to_dict() for seed in range(30)]
    write_reference(build_reference(reference, dataset_version="monitoring-test"), detector)
    write_manifest(detector)
    registry.register("captioner", caption, metrics={"test_cider_d": 1.0})
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})
    registry.register("tagger", tagger, metrics=tagger_metrics)
    for name in ("captioner", "detector", "tagger"):
        assert registry.promote(name).status == "promoted"
    return uri


def _prefixed(prefix: str, **settings: str) -> dict[str, str]:
    return {f"SNAP2CAPTION_{prefix}_{key.upper()}": value for key, value in settings.items()}


@pytest.fixture(scope="session")
def monitored_stack(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path
) -> Iterator[MonitoredStack]:
    from snap2caption.data.synth import SynthConfig, write_synth

    workdir = tmp_path_factory.mktemp("monitoring")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "yolo-config"))  # inherited by the detector
    uri = _register_models(workdir, mlflow_template_db)
    write_synth(workdir / "data" / "small", SynthConfig(images=8, seed=1), progress=False)
    home = {"SNAP2CAPTION_HOME": str(workdir / "home")}
    models = {"MLFLOW_TRACKING_URI": uri, **home}
    captioner = ServiceProcess(
        "captioner",
        workdir / "captioner.log",
        cwd=workdir,
        env={
            **models,
            **_prefixed(
                "CAPTIONER",
                model_cache_dir=str(workdir / "cache-captioner"),
                poll_interval_s="0",
                max_queue="1",
                max_images_per_request="1",
                max_batch_size="2",
                max_wait_ms="200",
            ),
        },
    )
    detector = ServiceProcess(
        "detector",
        workdir / "detector.log",
        cwd=workdir,
        env={
            **models,
            **_prefixed(
                "DETECTOR",
                model_cache_dir=str(workdir / "cache-detector"),
                poll_interval_s="0",
                max_wait_ms="2",
                drift_window="10",
                drift_min_samples="4",
                drift_every="2",
            ),
        },
    )
    etl = ServiceProcess(
        "etl",
        workdir / "etl.log",
        cwd=workdir,
        env={
            **home,
            **_prefixed(
                "ETL",
                data_root=str(workdir / "data"),
                db_url=f"sqlite:///{workdir / 'etl.sqlite'}",
                job_workers="1",
            ),
        },
    )
    gateway_metrics = workdir / "gateway-metrics"
    services = {"captioner": captioner, "detector": detector, "etl": etl}
    prometheus: PrometheusProcess | None = None
    try:
        # Generous timeouts: each start is mostly imports, and the cores are shared with other jobs.
        with ThreadPoolExecutor(3) as pool:
            for future in [pool.submit(s.start, 240) for s in (captioner, detector, etl)]:
                future.result()
        # Made once the backends run: a port taken while one started is replaced (ServiceProcess.start).
        services["gateway"] = ServiceProcess(
            "gateway",
            workdir / "gateway.log",
            cwd=workdir,
            env={
                **home,
                "PROMETHEUS_MULTIPROC_DIR": str(gateway_metrics),
                **_prefixed(
                    "GATEWAY",
                    workers=str(GATEWAY_WORKERS),
                    captioner_url=captioner.url,
                    detector_url=detector.url,
                    database_url=f"sqlite:///{workdir / 'gateway.db'}",
                    ready_poll_interval_s="0.3",
                ),
            },
        ).start(ready_timeout_s=120)
        scrape = {job: [service.url.removeprefix("http://")] for job, service in services.items()}
        prometheus = PrometheusProcess(workdir / "prometheus", scrape, interval_s=1.0).start()
        yield MonitoredStack(services, prometheus, gateway_metrics)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for service in services.values():
            try:
                service.stop(timeout_s=10)
            except Exception:
                service.kill()
