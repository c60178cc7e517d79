"""Real ``snap2caption serve detector`` processes for the folder, serving tiny models from a temp registry.

The detector is YOLOv8n at 64 px with random weights, shaped so that it finds many boxes of varied sizes
all over an image (the trick of ``tests/snap2caption/models/test_detector.py``); the tagger is the tiny
test encoder with a six-class head and ImageNet labels, packaged as the real tagger is
(``training.tagger.package.package_tagger``: safetensors, ONNX, card, manifest). Neither says anything
true about an image; what the tests check is that the service gives exactly what a direct ``Detector`` /
``Tagger`` call (``detector.load`` / ``tagger.load``, same runtime) gives on the same decoded image, for
every client, under load. Neither detector artifact the processes serve has a domain model (as older
artifacts): a copy with one, fitted on synthetic scenes, is registered as ``detector-domain`` for the
in-process domain tests (``test_domain.py``).

Two processes, started side by side:

- ``deployment``: the default setup (ONNX Runtime, roomy queue);
- ``tight``: PyTorch for both models, a queue of one image and batches that wait a second to fill,
  so the second request in flight is refused with 503 every time.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from snap2caption.imaging import decode_image
from snap2caption.manifest import write_manifest
from snap2caption.models import detector as detector_model
from snap2caption.models import tagger as tagger_model
from snap2caption.models.detector import Detection, Detector
from snap2caption.models.detector.config import DetectorConfig
from snap2caption.models.tagger import Tag, Tagger
from snap2caption.registry import Registry
from tests.helpers import ServiceProcess, torch_threads

CLASS_NAMES = ["circle", "square", "star"]
TAG_LABELS = ["tabby, tabby cat", "tiger cat", "Great Dane", "espresso", "cup", "coffee mug"]
TAG_NAMES = ["cat", "cat", "dog", "espresso", "cup", "mug"]
IMGSZ = 64
DOMAIN_DETECTOR = "detector-domain"
# Service vs direct call, both ONNX Runtime on the CPU: a batch of several images may round differently
# from a batch of one, so compare with tolerances far below anything a mix-up would produce.
SCORE_ATOL, BOX_ATOL = 1e-4, 1e-2


def noise_image(width: int, height: int, seed: int, fmt: str = "PNG", exif_orientation: int = 1) -> bytes:
    """Random RGB noise of the given stored size, encoded as ``fmt`` (with an EXIF orientation for JPEG)."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    if exif_orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, format=fmt, exif=exif.tobytes(), quality=95)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def random_detector(folder: Path) -> Path:
    """A registrable YOLOv8n artifact (64 px, 3 classes) whose random weights give many varied boxes."""
    from snap2caption.models.detector import yolo
    from snap2caption.models.detector.artifact import write_artifact

    torch.manual_seed(0)
    cfg = yolo.model_yaml("yolov8n.yaml")
    model = yolo.build_detection_model(cfg, nc=len(CLASS_NAMES))
    head = yolo.detect_head(model)
    with torch.no_grad():
        for branch in head.cv3:  # class scores spread over (0, 1)
            branch[-1].bias.normal_(0.0, 2.0)
        for branch in head.cv2:  # box sides peaked at one DFL bin: boxes of a stride or so
            branch[-1].weight.mul_(0.1)
            bias = torch.full((4, head.reg_max), -3.0)
            bias[:, 1] = 3.0
            branch[-1].bias.copy_(bias.flatten())
    config = DetectorConfig(names=CLASS_NAMES, imgsz=IMGSZ, stride=32, model="yolov8n.yaml")
    write_artifact(folder, model.eval(), cfg, config)
    write_manifest(folder)
    return folder


def tiny_tagger(folder: Path) -> tuple[Path, dict[str, float]]:
    """The tiny test encoder with a six-class head, packaged and measured as the real tagger is."""
    from snap2caption.models.backbones import build_encoder
    from snap2caption.models.tagger.net import TaggerNet
    from training.tagger.package import package_tagger

    torch.manual_seed(0)
    net = TaggerNet(build_encoder("tiny", num_classes=len(TAG_LABELS)), TAG_LABELS, TAG_NAMES)
    return package_tagger(folder, net)


def synthetic_scenes(count: int, seed: int) -> list[bytes]:
    """Synthetic-shapes scenes (what the project's detectors are trained on), 64 px JPEG, as the ETL
    stores them."""
    from snap2caption.data.synth.render import render_scene
    from snap2caption.data.synth.scene import SynthConfig, generate_scene

    config = SynthConfig(images=count, seed=seed, image_size=64)
    out = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        buffer = io.BytesIO()
        render_scene(generate_scene(rng, config), rng).save(buffer, "JPEG", quality=config.jpeg_quality)
        out.append(buffer.getvalue())
    return out


def photo_bytes(image: Image.Image) -> bytes:
    """A real photo as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def with_domain(detector: Path, folder: Path) -> Path:
    """A copy of a detector artifact with a training domain: fitted on 200 synthetic scenes, calibrated on
    200 others, by the code training uses (``training.detector.domain``)."""
    from snap2caption.models.detector.config import FEATURE_NAME
    from snap2caption.models.domain import fit_domain
    from training.detector.domain import image_features

    shutil.copytree(detector, folder)
    model = detector_model.load(folder, "onnx", verify=False)
    fit, calibration = (
        image_features(model, [decode_image(data).image for data in synthetic_scenes(200, seed)])
        for seed in (21, 22)
    )
    fit_domain(fit, calibration, feature=FEATURE_NAME).save(folder)
    write_manifest(folder)
    return folder


@dataclass
class Deployment:
    """A running detector service and the artifacts it serves, for expectations from direct calls."""

    service: ServiceProcess
    detector: Detector  # on the runtime the service uses
    tagger: Tagger  # likewise
    _objects: dict[tuple[bytes, float, float, int], list[Detection]] = field(default_factory=dict)

    def expected_objects(
        self, data: bytes, conf: float = 0.25, iou: float = 0.45, max_det: int = 100
    ) -> list[Detection]:
        """What a direct ``Detector.detect`` call gives on the decoded (upright) image."""
        key = (data, conf, iou, max_det)
        if key not in self._objects:
            image = decode_image(data).image
            self._objects[key] = self.detector.detect([image], conf=conf, iou=iou, max_det=max_det)[0]
        return self._objects[key]

    def expected_tags(self, data: bytes, top_k: int = 5, min_score: float = 0.0) -> list[Tag]:
        """What a direct ``tag`` call gives on the decoded image."""
        tags: list[Tag] = self.tagger.tag([decode_image(data).image], top_k=top_k, min_score=min_score)[0]
        return tags

    def post(self, path: str, body: bytes | None = None, **kwargs: Any) -> httpx.Response:
        with self.service.client(timeout_s=30) as client:
            if body is not None:
                kwargs.setdefault("headers", {"content-type": "image/png"})
                kwargs["content"] = body
            return client.post(path, **kwargs)

    def ready(self) -> dict[str, Any]:
        """``/readyz``'s checks (whatever the status)."""
        body = httpx.get(f"{self.service.url}/readyz", timeout=5).json()
        checks: dict[str, Any] = body.get("checks") or body["error"]["details"]["checks"]
        return checks

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from ``/metrics``, or None when absent."""
        for line in httpx.get(f"{self.service.url}/metrics", timeout=5).text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
        return None


def assert_same_objects(got: Sequence[dict[str, Any]], expected: Sequence[Detection]) -> None:
    """The service's objects are the direct call's (matched, not zipped: equal scores may swap places)."""
    assert len(got) == len(expected), (len(got), len(expected))
    unmatched = list(got)
    for det in expected:
        match = next(
            (
                obj
                for obj in unmatched
                if obj["label"] == det.class_name
                and obj["class_id"] == det.class_id
                and obj["score"] == pytest.approx(det.score, abs=SCORE_ATOL)
                and [obj["box"][k] for k in ("x1", "y1", "x2", "y2")]
                == pytest.approx(list(det.box_xyxy), abs=BOX_ATOL)
            ),
            None,
        )
        assert match is not None, f"no object like {det} in the response"
        unmatched.remove(match)


def assert_same_tags(got: Sequence[dict[str, Any]], expected: Sequence[Tag]) -> None:
    """The service's tags are the direct call's, in order."""
    assert [(t["name"], t["label"], t["hashtag"], t["class_index"]) for t in got] == [
        (t.name, t.label, t.hashtag, t.class_index) for t in expected
    ]
    assert [t["score"] for t in got] == pytest.approx([t.score for t in expected], abs=SCORE_ATOL)


@pytest.fixture(scope="session")
def _detector_threads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Ultralytics' settings and fonts in a private folder, not ~/.config (prepare_ultralytics reads it).
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
    with torch_threads(1):  # tiny tensors; processes share the cores
        yield


@dataclass
class Artifacts:
    detector: Path
    tagger: Path
    uri: str
    workdir: Path
    domain_detector: Path  # registered as DOMAIN_DETECTOR: the random detector with a training domain


@pytest.fixture(scope="session")
def artifacts(
    tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path, _detector_threads: None
) -> Artifacts:
    """Both tiny models, registered and promoted to ``production`` in a fresh SQLite registry."""
    workdir = tmp_path_factory.mktemp("detector-service")
    db = workdir / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    detector = random_detector(workdir / "detector-artifact")
    tagger, metrics = tiny_tagger(workdir / "tagger-artifact")
    domain_detector = with_domain(detector, workdir / "domain-detector-artifact")
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})
    registry.register("tagger", tagger, metrics=metrics)
    registry.register(DOMAIN_DETECTOR, domain_detector, metrics={"test_map50_95": 0.5})
    for name in ("detector", "tagger", DOMAIN_DETECTOR):
        assert registry.promote(name).status == "promoted"
    return Artifacts(detector, tagger, uri, workdir, domain_detector)


def _env(artifacts: Artifacts, name: str, **settings: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": artifacts.uri,
        "SNAP2CAPTION_HOME": str(artifacts.workdir / f"home-{name}"),
        "SNAP2CAPTION_DETECTOR_MODEL_CACHE_DIR": str(artifacts.workdir / f"cache-{name}"),
        "SNAP2CAPTION_DETECTOR_POLL_INTERVAL_S": "0",  # load once: these tests never move the aliases
        **{f"SNAP2CAPTION_DETECTOR_{key.upper()}": value for key, value in settings.items()},
    }


@pytest.fixture(scope="session")
def _services(artifacts: Artifacts) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """Both service processes, started at once (each spends most of its start importing)."""
    default = ServiceProcess(
        "detector",
        artifacts.workdir / "detector.log",
        env=_env(
            artifacts, "default", max_wait_ms="10", max_body_bytes="2000000", max_image_pixels="1000000"
        ),
        cwd=artifacts.workdir,
    )
    tight = ServiceProcess(
        "detector",
        artifacts.workdir / "detector-tight.log",
        env=_env(
            artifacts,
            "tight",
            detector_runtime="torch",
            tagger_backend="torch",  # the setting's older name, still read
            max_queue="1",
            max_images_per_request="1",
            max_batch_size="2",
            max_wait_ms="1000",
            retry_after_s="2",
        ),
        cwd=artifacts.workdir,
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(s.start, 120) for s in (default, tight)]:
                future.result()
        yield default, tight
    finally:
        for service in (default, tight):
            try:
                service.stop()
            except Exception:
                service.kill()


@pytest.fixture(scope="session")
def deployment(artifacts: Artifacts, _services: tuple[ServiceProcess, ServiceProcess]) -> Deployment:
    """The default service (ONNX Runtime), with ONNX Runtime models for the expectations."""
    return Deployment(
        _services[0],
        detector_model.load(artifacts.detector, "onnx"),
        tagger_model.load(artifacts.tagger, "onnx"),
    )


@pytest.fixture(scope="session")
def tight(artifacts: Artifacts, _services: tuple[ServiceProcess, ServiceProcess]) -> Deployment:
    """The PyTorch service with a queue of one image, with PyTorch models for the expectations."""
    return Deployment(
        _services[1],
        detector_model.load(artifacts.detector, "torch"),
        tagger_model.load(artifacts.tagger, "torch"),
    )
