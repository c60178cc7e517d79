"""The compose stack for real, on podman: images built, ``docker-compose.yml`` up, used, torn down.

One scenario, in order (each step needs the one before):

1. ``scripts/images.sh`` builds the serving, ETL, MLflow, Postgres and Prometheus images (tag ``test``; the
   mmdebstrap base is reused while its recipe is unchanged, the layers while their inputs are).
2. podman-compose starts every service but two, under a project name of its own, its ports published on
   free loopback ports: ``bootstrap`` (the training image: `make images` builds it; training starter
   models takes ~10 min) and ``grafana`` (its image cannot be fetched here).
3. Tiny models built here (captioner with its ONNX export, detector, tagger; seconds) are pushed into the
   stack's MLflow server with ``snap2caption registry push``, as a user pushes the models of ``make up``;
   the services, polling their alias, load them. Every container's own HEALTHCHECK passes.
4. A real photo (scikit-image's) through the gateway container: caption, alt text, tags, objects, from
   the versions pushed, with no torch in the serving image; the analysis is in the inference log (Postgres).
   Prometheus scrapes every service by container name with the project's rules.
5. A second captioner is pushed as candidate and promoted on the MLflow server: the gateway's answers
   switch to it (its caption, its version).
6. The captioner container is stopped: the gateway still answers 200, with tags and objects and a
   caption error.
7. ``down -v``: no container, network or volume of the project is left.

Measured times and image sizes go to ``var/test-artifacts/containers.json``; on failure, every
container's log goes next to it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_port, image_bytes, wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "var" / "test-artifacts"
TAG = "test"
BUILT = ["serving", "etl", "mlflow", "postgres", "prometheus"]
STARTED = ["postgres", "mlflow", "captioner", "detector", "gateway", "etl", "prometheus"]
PUBLISHED = {"gateway": 8000, "etl": 8003, "mlflow": 5000, "prometheus": 9090, "grafana": 3000}
READY_TIMEOUT_S = 240  # first start on 2 shared cores: Postgres init, MLflow's migrations, seven imports

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman not installed (`make test` installs it: scripts/setup.sh with SETUP_CONTAINERS=1)",
    ),
]


@dataclass
class Compose:
    """podman-compose on the repository's docker-compose.yml, under one project name."""

    project: str
    env: dict[str, str]
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)

    def __call__(self, *args: str, timeout_s: float = 300, check: bool = True) -> str:
        command = [sys.executable, "-m", "podman_compose", "-p", self.project, "-f", "docker-compose.yml"]
        result = subprocess.run(
            [*command, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if check:
            assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result.stdout

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def save_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for service in STARTED:
            logs = podman("logs", self.container(service), check=False)
            (folder / f"{service}.log").write_text(logs.stdout + logs.stderr)


def podman(*args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def snap2caption(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "snap2caption", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"snap2caption {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


# ------------------------------------------------------------------------------------------- models


@dataclass
class HostModels:
    """Tiny models in a registry on the host, and what the captioners say for a solid red image."""

    uri: str
    red_caption: dict[int, str]  # host registry version -> caption


def build_models(workdir: Path, template_db: Path) -> HostModels:
    """Captioner (with its ONNX export: the serving image has no torch), detector and tagger, registered
    and promoted in a host SQLite registry; a second captioner registered as candidate."""
    import torch

    from snap2caption.imaging import decode_image
    from snap2caption.models.caption.artifact import save_caption_model
    from snap2caption.models.caption.export import export_for_serving
    from snap2caption.registry import Registry
    from tests.gateway_stack import CAPTIONS
    from tests.helpers import torch_threads
    from tests.services.captioner.conftest import IMAGE_MAX_SIDE, train_tiny
    from tests.services.detector.conftest import random_detector, tiny_tagger

    shutil.copyfile(template_db, workdir / "mlflow.db")
    registry = Registry(f"sqlite:///{workdir / 'mlflow.db'}")
    red = decode_image(image_bytes("red")).image
    captions: dict[int, str] = {}
    with torch_threads(1):
        for i, (targets, seed) in enumerate([(CAPTIONS, 3), (CAPTIONS[::-1], 5)], start=1):
            model, tokenizer = train_tiny(targets, seed=seed, steps=120)
            folder = save_caption_model(
                model, tokenizer, workdir / f"captioner-{i}", extra={"image_max_side": IMAGE_MAX_SIDE}
            )
            export_for_serving(folder, int8=False)
            version = registry.register("captioner", folder, metrics={"test_cider_d": 1.0}).version
            with torch.inference_mode():
                [caption] = model.generate(torch.from_numpy(model.preprocess.batch([red])))
            captions[version] = caption.text
            if i == 1:
                registry.promote("captioner")
        detector = random_detector(workdir / "detector")
        tagger, tagger_metrics = tiny_tagger(workdir / "tagger")
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})
    registry.register("tagger", tagger, metrics=tagger_metrics)
    for name in ("detector", "tagger"):
        registry.promote(name)
    assert captions[1] != captions[2], captions  # otherwise the swap could not be seen in the answers
    return HostModels(registry.tracking_uri, captions)


def photo_jpeg() -> bytes:
    """scikit-image's cat photo (a real photo, 451 x 300), as JPEG."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- fixture


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Compose]:
    """A compose project unique to this test, its ports free loopback ports; taken down whatever happens."""
    project = f"s2ctest{uuid.uuid4().hex[:8]}"
    ports = {service: free_port() for service in PUBLISHED}
    env = {
        **os.environ,
        "SNAP2CAPTION_IMAGE_TAG": TAG,
        "SNAP2CAPTION_POLL_INTERVAL_S": "1",
        **{f"SNAP2CAPTION_{service.upper()}_HOST_PORT": str(port) for service, port in ports.items()},
    }
    stack = Compose(project, env, tmp_path, ports)
    try:
        yield stack
    finally:
        # The test takes the stack down itself and checks; this is for a test that failed half-way.
        stack("down", "-v", timeout_s=180, check=False)
        for leftover in containers_of(project):
            podman("rm", "--force", "--volumes", leftover, check=False)


def containers_of(project: str) -> list[str]:
    label = f"label=io.podman.compose.project={project}"
    return podman("ps", "--all", "--filter", label, "--format", "{{.Names}}").stdout.split()


def volumes_of(project: str) -> list[str]:
    label = f"label=io.podman.compose.project={project}"
    return podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").stdout.split()


# ------------------------------------------------------------------------------------------- the test


@pytest.mark.timeout(2400)  # a cold first run builds every image (~10 min on 2 shared cores)
def test_compose_stack_end_to_end(compose: Compose, mlflow_template_db: Path) -> None:
    timings: dict[str, Any] = {}
    started = time.monotonic()
    try:
        _scenario(compose, mlflow_template_db, timings)
    except BaseException:
        compose.save_logs(ARTIFACTS / "containers")
        raise
    finally:
        timings["test_s"] = round(time.monotonic() - started, 1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "containers.json").write_text(json.dumps(timings, indent=2) + "\n")

    compose("down", "-v", timeout_s=180)
    assert containers_of(compose.project) == []
    assert volumes_of(compose.project) == []
    networks = podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [n for n in networks if n.startswith(compose.project)], networks


def _scenario(compose: Compose, template_db: Path, timings: dict[str, Any]) -> None:
    # 1. images
    t = time.monotonic()
    build = subprocess.run(
        ["bash", "scripts/images.sh", *BUILT], cwd=ROOT, env=compose.env, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr[-5000:]
    timings["build_s"] = round(time.monotonic() - t, 1)
    timings["images_mb"] = {
        image: round(int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6)
        for image in (f"snap2caption-{target}:{TAG}" for target in BUILT)
    }
    models = build_models(compose.workdir, template_db)

    # 2. the stack
    t = time.monotonic()
    compose("up", "-d", *STARTED)
    gateway = httpx.Client(base_url=compose.url("gateway"), timeout=30)
    wait_for(lambda: _status(f"{compose.url('mlflow')}/health") == 200, READY_TIMEOUT_S, "MLflow", 1)
    timings["mlflow_up_s"] = round(time.monotonic() - t, 1)

    # 3. models in, services ready, every container healthy by its own HEALTHCHECK
    pushed = snap2caption("registry", "--tracking-uri", models.uri, "push", "--to", compose.url("mlflow"))
    assert pushed.count("promoted v1") == 3, pushed
    wait_for(lambda: _status(f"{compose.url('gateway')}/readyz") == 200, READY_TIMEOUT_S, "gateway ready", 1)
    wait_for(lambda: _status(f"{compose.url('etl')}/readyz") == 200, 60, "ETL ready", 1)
    timings["stack_ready_s"] = round(time.monotonic() - t, 1)
    for service in STARTED:
        check = podman("healthcheck", "run", compose.container(service), check=False)
        assert check.returncode == 0, f"{service}: {check.stdout}{check.stderr}"
    for service in ("gateway", "captioner", "detector", "etl"):
        [info] = json.loads(podman("inspect", compose.container(service)).stdout)
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["Config"]["User"] == "app"
    no_torch = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
    podman("exec", compose.container("captioner"), "python", "-c", no_torch)

    # 4. a real photo through the gateway container
    photo = gateway.post("/v1/analyze", files={"file": ("chelsea.jpg", photo_jpeg(), "image/jpeg")})
    assert photo.status_code == 200, photo.text
    body = photo.json()
    assert body["errors"] == [] and body["image"] == {"width": 451, "height": 300, "format": "jpeg"}
    assert body["caption"]["text"] and body["alt_text"]["text"] and body["tags"] and body["objects"]
    versions = {feature: (m["name"], m["version"], m["backend"]) for feature, m in body["models"].items()}
    assert versions == {
        "caption": ("captioner", 1, "onnx"),
        "tags": ("tagger", 1, "onnx"),
        "objects": ("detector", 1, "onnx"),
    }
    assert _red_caption(gateway) == ("captioner", 1, models.red_caption[1])
    feedback = gateway.post("/v1/feedback", json={"inference_id": body["inference_id"], "rating": 5})
    assert feedback.status_code == 201, feedback.text  # the analysis is in the log, in Postgres
    assert feedback.json()["inference_id"] == body["inference_id"]
    wait_for(lambda: _targets_up(compose.url("prometheus")), 120, "Prometheus scraping every service", 1)
    rules = httpx.get(f"{compose.url('prometheus')}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert rules and all(g["rules"] for g in rules)
    ui_file = "/classic/static/moment-timezone/moment-timezone-with-data.min.js"  # kept when the image pruned
    assert httpx.get(f"{compose.url('prometheus')}{ui_file}", timeout=10).status_code == 200

    # 5. a promotion on the MLflow server reaches the services
    snap2caption(
        "registry", "--tracking-uri", models.uri, "push", "captioner", "--alias", "candidate",
        "--no-promote", "--to", compose.url("mlflow"),
    )  # fmt: skip
    snap2caption("registry", "--tracking-uri", compose.url("mlflow"), "promote", "captioner")
    swapped = ("captioner", 2, models.red_caption[2])
    wait_for(lambda: _red_caption(gateway) == swapped, 120, "the captioner to serve v2", 1)

    # 6. one model container down: a partial answer
    compose("stop", "captioner", timeout_s=120)
    partial = gateway.post("/v1/analyze", content=image_bytes("red"), headers={"content-type": "image/png"})
    assert partial.status_code == 200, partial.text
    answer = partial.json()
    assert answer["caption"] is None and answer["tags"] and answer["objects"] is not None
    assert [e["feature"] for e in answer["errors"]] == ["caption"], answer["errors"]
    gateway.close()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def _red_caption(gateway: httpx.Client) -> tuple[str, int, str]:
    response = gateway.post(
        "/v1/analyze?features=caption", content=image_bytes("red"), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return body["models"]["caption"]["name"], body["models"]["caption"]["version"], body["caption"]["text"]


def _targets_up(prometheus: str) -> bool:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    up = {t["labels"]["job"] for t in targets if t["health"] == "up"}
    return up == {"gateway", "captioner", "detector", "etl", "prometheus"}
