"""Data drift end to end: reference in the caption artifact -> a real captioner process -> ``/metrics``.

The reference is what the pipeline makes (the ETL's part is tested in
``tests/snap2caption/monitoring/test_reference.py``): the shared statistics of synthetic training scenes,
decoded as the ETL decodes them, plus the served model's caption confidence on held-out scenes. The
service gets new scenes from the same generator (PSI stays under 0.1 on every feature), then very dark
versions of them (brightness PSI crosses the 0.25 alert threshold; the untouched size features stay put).
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from snap2caption.data.synth import SynthConfig, generate_scene, render_scene
from snap2caption.imaging import decode_image
from snap2caption.imaging.decode import probe_image
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.monitoring.reference import ALERT_THRESHOLD, build_reference, numeric_reference
from snap2caption.monitoring.stats import decoded_stats
from snap2caption.registry import Registry
from tests.helpers import ServiceProcess
from tests.services.captioner.conftest import Deployment, image_bytes

pytestmark = pytest.mark.integration

SIDE = 64  # synthetic scenes this small keep the test fast; the artifact serves at this max side
WINDOW = 400  # images per window; the reference holds twice as many
BATCH = 16
METRICS = ("snap2caption_drift_psi", "snap2caption_drift_window_samples")


def scenes(seed: int, n: int) -> list[Image.Image]:
    """``n`` synthetic scenes, drawn as ``write_synth`` draws them (another seed: other scenes)."""
    cfg = SynthConfig(image_size=SIDE)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(render_scene(generate_scene(rng, cfg), rng))
    return out


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)  # as write_synth stores its scenes
    return buffer.getvalue()


def served_confidences(model: CaptionModel, images: list[Image.Image]) -> list[float]:
    """What the captioner serves as ``confidence`` for each image (greedy, the model's defaults)."""
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(images), 100):
            pixels = torch.from_numpy(model.preprocess.batch(images[start : start + 100]))  # (B, 3, H, W)
            out += [math.exp(c.confidence) for c in model.generate(pixels)]
    return out


@dataclass
class DriftService:
    service: ServiceProcess

    def caption_all(self, images: list[bytes]) -> None:
        with self.service.client(timeout_s=30) as client:
            for start in range(0, len(images), BATCH):
                files = [
                    ("files", (f"{i}.jpg", data, "image/jpeg"))
                    for i, data in enumerate(images[start:][:BATCH])
                ]
                response = client.post("/v1/caption", files=files)
                assert response.status_code == 200, response.text

    def drift(self) -> tuple[dict[str, float], float]:
        """``/metrics``: PSI per feature and the window fill, for this service."""
        psi: dict[str, float] = {}
        samples = math.nan
        for line in httpx.get(f"{self.service.url}/metrics", timeout=5).text.splitlines():
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0]
            if name not in METRICS or 'service="captioner"' not in series:
                continue
            if name == "snap2caption_drift_window_samples":
                samples = float(value)
            else:
                psi[series.split('feature="')[1].split('"')[0]] = float(value)
        return psi, samples

    def readyz_drift(self) -> dict[str, object]:
        return httpx.get(f"{self.service.url}/readyz", timeout=5).json()["checks"]["drift"]


@pytest.fixture(scope="module")
def drift_service(
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_template_db: Path,
    v1_model: tuple[CaptionModel, CaptionTokenizer],
) -> Iterator[DriftService]:
    work = tmp_path_factory.mktemp("captioner-drift")
    # The reference, as the ETL makes it: each training scene decoded as the ETL does (max side 512,
    # the original size from the header), through the shared statistics function.
    train = [jpeg(im) for im in scenes(seed=21, n=2 * WINDOW)]
    stats = [decoded_stats(decode_image(data, max_side=512), probe_image(data)).to_dict() for data in train]
    reference = build_reference(stats, dataset_version="synthetic-test", split="train")
    # Output side, as training records it: the model's confidence on held-out scenes, decoded as served.
    model, tokenizer = v1_model
    held_out = [decode_image(jpeg(im), max_side=SIDE).image for im in scenes(seed=22, n=WINDOW)]
    confidence = numeric_reference(served_confidences(model, held_out))
    reference = reference.with_features({"caption_confidence": confidence})
    artifact = save_caption_model(
        model, tokenizer, work / "artifact", extra={"image_max_side": SIDE}, drift_reference=reference
    )

    db = work / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    registry.register("captioner", artifact, metrics={"test_cider_d": 1.0})
    assert registry.promote("captioner").status == "promoted"
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(work / "home"),
        "SNAP2CAPTION_CAPTIONER_MODEL_CACHE_DIR": str(work / "cache"),
        "SNAP2CAPTION_CAPTIONER_MAX_WAIT_MS": "5",
        "SNAP2CAPTION_CAPTIONER_DRIFT_WINDOW": str(WINDOW),
        "SNAP2CAPTION_CAPTIONER_DRIFT_MIN_SAMPLES": "200",
        "SNAP2CAPTION_CAPTIONER_DRIFT_EVERY": "10",
    }
    service = ServiceProcess("captioner", work / "captioner.log", env=env, cwd=work)
    service.start(ready_timeout_s=120)
    yield DriftService(service)
    service.stop()


def test_psi_stays_low_in_distribution_and_crosses_the_alert_threshold_on_dark_images(
    drift_service: DriftService,
) -> None:
    ready = drift_service.readyz_drift()
    assert ready["enabled"] is True and ready["samples"] == 0, ready
    fresh = scenes(seed=23, n=WINDOW)

    drift_service.caption_all([jpeg(im) for im in fresh])
    psi, samples = drift_service.drift()
    assert samples == WINDOW
    expected = {"width", "height", "aspect", "brightness", "colourfulness", "format", "caption_confidence"}
    assert set(psi) == expected
    assert all(v < 0.1 for v in psi.values()), psi
    assert drift_service.readyz_drift()["drifting"] == []

    dark = [ImageEnhance.Brightness(im).enhance(0.25) for im in fresh]  # same scenes, under-exposed
    drift_service.caption_all([jpeg(im) for im in dark])
    psi, samples = drift_service.drift()
    assert samples == WINDOW
    assert psi["brightness"] > ALERT_THRESHOLD, psi
    assert psi["width"] < 0.1 and psi["height"] < 0.1 and psi["aspect"] < 0.1 and psi["format"] < 0.1
    ready = drift_service.readyz_drift()
    assert "brightness" in ready["drifting"], ready  # type: ignore[operator]


def test_an_artifact_without_a_reference_serves_with_drift_off(deployment: Deployment) -> None:
    """The folder's shared deployment serves artifacts saved without a reference (older training code)."""
    response = httpx.post(
        f"{deployment.service.url}/v1/caption",
        content=image_bytes("red"),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    drift = deployment.ready()["drift"]
    assert drift == {"enabled": False, "reason": "the serving model's artifact has no reference statistics"}
