"""The production serving path end to end: trained models, `make up`'s runtimes, a hot swap under load.

Every other service test serves an artifact built in the test process (no ONNX export, so the captioner's
``auto`` runtime picks PyTorch). Here the models come out of the real training commands, as
``snap2caption bootstrap`` makes them: ``train caption --config tiny`` (which exports to ONNX) and
``train detector --config tiny --promote``, in subprocesses, into an MLflow SQLite registry laid out as
`make up` lays it out (``$SNAP2CAPTION_HOME/mlflow``). The tagger is the tiny test tagger packaged as the
real one is (``package_tagger``: safetensors + ONNX): packaging the real ImageNet tagger takes a minute
and is not what this file tests. Captioner, detector and gateway run as `make up` runs them: default settings
(``auto`` runtimes, one thread per model service), except a half-second alias poll instead of 30 s.

What must hold: ``auto`` serves ONNX Runtime for all three models, the caption a client gets is the ONNX
model's own answer for the image the gateway sends, and a promotion of a new captioner version, then of a
new detector version, made while clients keep calling ``/v1/analyze``, fails no request, never moves any
client back to an older version, and ends with every client on the new versions. The new versions are
the trained artifacts registered again (training once keeps the file to a few minutes on 2 cores; the swap
path, download -> verify -> load -> warm up -> swap, is the same for any version).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.helpers import ServiceProcess, wait_for

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 4  # closed-loop /v1/analyze clients during the swaps: load, on 2 cores shared with 3 services
TRAIN_TIMEOUT_S = 600


def photo() -> bytes:
    """A real photo (scikit-image's cat), as a JPEG upload."""
    import skimage.data

    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class Trained:
    """The registry the training commands filled, and where their artifacts are."""

    home: Path
    tracking_uri: str
    caption_artifact: Path
    detector_artifact: Path

    def env(self) -> dict[str, str]:
        """What every process of this deployment gets (the registry is the home's default one)."""
        return {"SNAP2CAPTION_HOME": str(self.home), "MLFLOW_TRACKING_URI": self.tracking_uri}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``snap2caption <args>`` in a subprocess on this deployment's home and registry."""
        return subprocess.run(
            [sys.executable, "-m", "snap2caption", *args],
            env={**os.environ, **self.env()},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=TRAIN_TIMEOUT_S,
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Trained:
    """Synthetic data through the real ETL, then both training commands side by side (as bootstrap runs
    them), registered and promoted; the tiny tagger registered beside them."""
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth
    from snap2caption.registry import Registry
    from tests.services.detector.conftest import tiny_tagger

    work = tmp_path_factory.mktemp("serving-path")
    write_synth(work / "synth", SynthConfig(images=24, seed=3, image_size=64, workers=1), progress=False)
    data = work / "processed"
    etl = EtlConfig(
        source="coco",
        images=work / "synth" / "images",
        annotations=[work / "synth" / "annotations" / n for n in ("captions.json", "instances.json")],
        out=data,
        val_fraction=0.25,
        test_fraction=0.25,
        workers=1,
    )
    run_etl(etl, progress=False)
    home = work / "home"
    (home / "mlflow").mkdir(parents=True)
    shutil.copyfile(mlflow_template_db, home / "mlflow" / "mlflow.db")  # migrated already: saves seconds
    deployment = Trained(
        home, f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", work / "caption" / "model", work / "detector"
    )

    caption = ("train", "caption", "--config", "tiny", "--data", str(data), "--out", str(work / "caption"))
    detector = ("train", "detector", "--config", "tiny", "--out", str(work / "detector"), "--promote")
    with ThreadPoolExecutor(2) as pool:
        commands = [(*caption, "--no-progress"), (*detector, f"data={data}")]
        runs = list(pool.map(lambda args: deployment.cli(*args), commands))
    for run in runs:
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    promoted = deployment.cli("registry", "promote", "captioner")
    assert promoted.returncode == 0, promoted.stderr
    assert (deployment.caption_artifact / "onnx" / "decoder.onnx").is_file()  # training exported it

    registry = Registry(deployment.tracking_uri)
    tagger, metrics = tiny_tagger(work / "tagger")
    registry.register("tagger", tagger, metrics=metrics)
    assert registry.promote("tagger").promoted
    return deployment


@dataclass
class Served:
    """The three running services and the deployment behind them."""

    trained: Trained
    captioner: ServiceProcess
    detector: ServiceProcess
    gateway: ServiceProcess

    def ready(self, service: ServiceProcess) -> dict[str, Any]:
        """``/readyz``'s checks."""
        checks: dict[str, Any] = httpx.get(f"{service.url}/readyz", timeout=10).json()["checks"]
        return checks

    def analyze(self, client: httpx.Client, data: bytes) -> httpx.Response:
        return client.post("/v1/analyze", content=data, headers={"content-type": "image/jpeg"})


@pytest.fixture(scope="module")
def served(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Captioner, detector and gateway with `make up`'s settings, but polling the aliases every 0.5 s."""
    logs = tmp_path_factory.mktemp("serving-path-logs")
    env = trained.env()
    captioner = ServiceProcess(
        "captioner",
        logs / "captioner.log",
        env={**env, "SNAP2CAPTION_CAPTIONER_POLL_INTERVAL_S": "0.5"},
        cwd=trained.home,
    )
    detector = ServiceProcess(
        "detector",
        logs / "detector.log",
        env={**env, "SNAP2CAPTION_DETECTOR_POLL_INTERVAL_S": "0.5"},
        cwd=trained.home,
    )
    started: list[ServiceProcess] = []
    try:
        with ThreadPoolExecutor(2) as pool:  # each spends most of its start importing
            started += pool.map(lambda s: s.start(180), (captioner, detector))
        gateway = ServiceProcess(
            "gateway",
            logs / "gateway.log",
            env={
                **env,
                "SNAP2CAPTION_GATEWAY_CAPTIONER_URL": captioner.url,
                "SNAP2CAPTION_GATEWAY_DETECTOR_URL": detector.url,
            },
            cwd=trained.home,
        )
        started.append(gateway.start(60))
        yield Served(trained, captioner, detector, gateway)
    finally:
        for service in reversed(started):
            try:
                service.stop(timeout_s=15)
            except Exception:
                service.kill()


def test_auto_serves_onnx_runtime_and_the_answer_is_the_onnx_models(served: Served) -> None:
    from services.captioner.engine import input_spec, prepare_image
    from services.gateway.config import Settings as GatewaySettings
    from services.gateway.images import normalise_image
    from snap2caption.imaging import DEFAULT_LIMITS, DecodeLimits
    from snap2caption.models import caption

    captioner = served.ready(served.captioner)
    assert (captioner["backend"], captioner["runtime"]) == ("auto", "onnx")
    detector = served.ready(served.detector)
    for name in ("detector", "tagger"):
        assert (detector[name]["backend"], detector[name]["runtime"]) == ("auto", "onnx"), detector[name]

    data = photo()
    with served.gateway.client(timeout_s=60) as client:
        response = served.analyze(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"] == []
    assert body["caption"]["text"] and body["alt_text"]["text"] and body["tags"]
    assert isinstance(body["objects"], list)
    models = body["models"]
    assert {name: m["backend"] for name, m in models.items()} == {
        "caption": "onnx",
        "tags": "onnx",
        "objects": "onnx",
    }
    assert models["caption"]["version"] == captioner["version"]
    assert models["objects"]["version"] == detector["detector"]["version"]

    # The caption is the ONNX model's answer for the image the gateway sends (its defaults: at most 1,024 px,
    # PNG up to 512 x 512 pixels and JPEG above).
    settings = GatewaySettings()
    limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    sent = normalise_image(
        data,
        limits,
        settings.backend_max_side,
        settings.backend_image_format,
        settings.backend_png_max_pixels,
    )
    captioner = caption.load(served.trained.caption_artifact, "onnx")
    pixels = prepare_image(sent.data, input_spec(captioner, None), DEFAULT_LIMITS)[None]  # (1, 3, H, W)
    [expected] = captioner.generate(pixels)
    assert body["caption"]["text"] == expected.text


def test_promotions_under_load_swap_captioner_and_detector_without_a_failed_request(served: Served) -> None:
    from snap2caption.registry import Registry

    registry = Registry(served.trained.tracking_uri)
    before = {
        "caption": served.ready(served.captioner)["version"],
        "objects": served.ready(served.detector)["detector"]["version"],
    }
    tags_version = served.ready(served.detector)["tagger"]["version"]
    data = photo()
    stop = threading.Event()
    answers: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(CLIENTS)]

    def client_loop(mine: list[tuple[int, dict[str, Any]]]) -> None:
        with served.gateway.client(timeout_s=60) as client:
            while not stop.is_set():
                try:
                    response = served.analyze(client, data)
                    mine.append((response.status_code, response.json()))
                except (httpx.HTTPError, ValueError) as exc:  # recorded as a failed request, not lost
                    mine.append((0, {"exception": repr(exc)}))

    def every_client_saw(feature: str, version: int) -> bool:
        return all(
            any(status == 200 and body["models"][feature]["version"] == version for status, body in mine)
            for mine in answers
        )

    def promote(name: str, artifact: Path, feature: str) -> int:
        """Register the trained artifact again and move ``production`` to it, while the clients run."""
        production = registry.resolve(name, "production")
        version = registry.register(name, artifact, metrics=production.metrics).version
        assert registry.promote(name).status == "promoted"  # the gate passes: the same metrics
        wait_for(lambda: every_client_saw(feature, version), 120, f"every client on {name} v{version}")
        return version

    threads = [threading.Thread(target=client_loop, args=(mine,)) for mine in answers]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(answers), 60, "every client's first answer")
        after = {
            "caption": promote("captioner", served.trained.caption_artifact, "caption"),
            "objects": promote("detector", served.trained.detector_artifact, "objects"),
        }
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    for mine in answers:
        for status, body in mine:
            assert status == 200 and body["errors"] == [], body
            assert body["models"]["tags"]["version"] == tags_version
        for feature in ("caption", "objects"):
            versions = [body["models"][feature]["version"] for _, body in mine]
            assert versions == sorted(versions), (feature, versions)  # old ... old, new ... new: never back
            assert (versions[0], versions[-1]) == (before[feature], after[feature])
    assert served.ready(served.captioner)["version"] == after["caption"]
    assert served.ready(served.detector)["detector"]["version"] == after["objects"]
    assert served.ready(served.captioner)["runtime"] == "onnx"  # the new version on the same runtime
    logger.info("answers per client during the swaps: %s", [len(mine) for mine in answers])
