"""The whole serving stack for the gateway tests: real captioner, detector and gateway processes on loopback.

One session-scoped :class:`Stack` shares one temporary MLflow registry with three tiny models:

- ``captioner``: the tiny caption model overfitted to say a known caption per solid colour (the trick of
  ``tests/services/captioner/conftest.py``), with gendered words in some captions so the gender-neutral
  option has something to change;
- ``detector`` (random YOLOv8n at 64 px that finds many varied boxes) and ``tagger`` (the tiny encoder
  with a six-class ImageNet head), built as in ``tests/services/detector/conftest.py``.

Each backend runs one process with one thread; the gateway in front of them has small caps (2 MB body,
1.5 MB image, 4 MP) so the refusal tests stay cheap. ``stack.start_gateway(...)`` starts an extra
gateway with other settings (auth on, a tiny rate limit, a dead backend URL) and
``stack.start_captioner(...)`` an extra captioner (one a test may kill); both stop at session end.
Other test folders (web page, client, CLI) use this fixture too: `tests/conftest.py` registers the two
session fixtures here (`stack`, `image_server`) for the whole suite, so one stack serves every folder.
"""

from __future__ import annotations

import http.server
import io
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import COLOURS, ServiceProcess, torch_threads
from tests.helpers import image_bytes as colour_png

# CAPTIONS[i] is what the tiny captioner learns to say for the i-th colour of COLOURS (tests.helpers).
CAPTIONS = [
    "a man riding a red bike",
    "two women on a blue bench",
    "a girl flying a green kite",
    "a yellow star",
    "a white cloud",
    "a black cat",
]
GATEWAY_CAPS = {
    "max_body_bytes": "2000000",
    "max_image_bytes": "1500000",
    "max_image_pixels": "4000000",
}
BACKEND_MAX_SIDE = 256  # the gateway shrinks images to this before the backends see them


def noise_png(width: int, height: int, seed: int) -> bytes:
    """Random RGB noise as PNG: the random detector finds many boxes all over it."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class LiveProcess(ServiceProcess):
    """A service process counted as started once ``/healthz`` answers (for gateways whose backends are
    dead on purpose, which never become ready)."""

    ready_path = "/healthz"


@dataclass
class Stack:
    """The running processes, and helpers to talk to them."""

    captioner: ServiceProcess
    detector: ServiceProcess
    gateway: ServiceProcess
    workdir: Path
    registry_uri: str
    extra: list[ServiceProcess] = field(default_factory=list)

    def gateway_env(self, **settings: str) -> dict[str, str]:
        """Environment of a gateway in front of this stack's backends, with ``settings`` overriding."""
        n = uuid.uuid4().hex[
            :8
        ]  # each gateway its own log database, however many env() calls precede its start
        values = {
            "captioner_url": self.captioner.url,
            "detector_url": self.detector.url,
            "database_url": f"sqlite:///{self.workdir / f'gateway-{n}.db'}",
            "backend_max_side": str(BACKEND_MAX_SIDE),
            "ready_poll_interval_s": "0.3",
            **GATEWAY_CAPS,
            **settings,
        }
        return {
            "SNAP2CAPTION_HOME": str(self.workdir / "home"),
            **{f"SNAP2CAPTION_GATEWAY_{k.upper()}": v for k, v in values.items()},
        }

    def start_gateway(self, wait: str = "ready", **settings: str) -> ServiceProcess:
        """Start another gateway (``settings`` as lower-case names of ``SNAP2CAPTION_GATEWAY_*``).

        Args:
            wait: ``ready`` (``/readyz`` 200) or ``live`` (``/healthz`` 200, for dead backends).
            settings: Gateway settings, e.g. ``auth_enabled="true"``, ``captioner_url=...``.
        """
        cls = ServiceProcess if wait == "ready" else LiveProcess
        log = self.workdir / f"gateway-extra-{len(self.extra)}.log"
        service = cls("gateway", log, env=self.gateway_env(**settings), cwd=self.workdir)
        self.extra.append(service)
        return service.start(ready_timeout_s=60)

    def start_captioner(self, **settings: str) -> ServiceProcess:
        """Start another captioner on the same registry (one a test may kill)."""
        name = f"captioner-extra-{len(self.extra)}"
        service = ServiceProcess(
            "captioner",
            self.workdir / f"{name}.log",
            env=_captioner_env(self, name, **settings),
            cwd=self.workdir,
        )
        self.extra.append(service)
        return service.start(ready_timeout_s=120)

    def analyze(self, body: bytes | None = None, **kwargs: Any) -> httpx.Response:
        """``POST /v1/analyze`` on the session gateway (raw body by default, or multipart ``files=``)."""
        return post_analyze(self.gateway.url, body, **kwargs)


def post_analyze(
    base_url: str, body: bytes | None = None, path: str = "/v1/analyze", **kwargs: Any
) -> httpx.Response:
    """POST to a gateway: ``body`` as a raw image, or pass httpx keywords (``files=``, ``json=``)."""
    if body is not None:
        kwargs["content"] = body
        kwargs.setdefault("headers", {"content-type": "application/octet-stream"})
    with httpx.Client(base_url=base_url, timeout=60) as client:
        return client.post(path, **kwargs)


def metric(base_url: str, name: str, **labels: str) -> float | None:
    """One sample from a service's ``/metrics``, or None when absent."""
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return None


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the one error envelope with ``status`` and ``code``, and no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "request_id"} <= set(error) <= {"code", "message", "request_id", "details"}
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return dict(error)


# ------------------------------------------------------------------------------------------ building


def _captioner_env(
    stack_or_uri: Stack | str, name: str, workdir: Path | None = None, **settings: str
) -> dict[str, str]:
    uri = stack_or_uri.registry_uri if isinstance(stack_or_uri, Stack) else stack_or_uri
    folder = stack_or_uri.workdir if isinstance(stack_or_uri, Stack) else workdir
    assert folder is not None
    values = {
        "model_cache_dir": str(folder / f"cache-{name}"),
        "poll_interval_s": "0",
        "max_wait_ms": "2",
        **settings,
    }
    return {
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(folder / f"home-{name}"),
        **{f"SNAP2CAPTION_CAPTIONER_{k.upper()}": v for k, v in values.items()},
    }


def _register_models(workdir: Path, template_db: Path) -> str:
    """Train/build the three tiny models, register and promote them; return the registry URI."""
    from snap2caption.imaging import decode_image
    from snap2caption.models.caption.artifact import save_caption_model
    from snap2caption.registry import Registry
    from tests.services.captioner.conftest import IMAGE_MAX_SIDE, train_tiny
    from tests.services.detector.conftest import random_detector, tiny_tagger

    db = workdir / "mlflow.db"
    shutil.copyfile(template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    with torch_threads(1):  # tiny tensors; the processes share the cores
        model, tokenizer = _train_captioner(train_tiny, decode_image)
        caption_folder = save_caption_model(
            model, tokenizer, workdir / "caption-artifact", extra={"image_max_side": IMAGE_MAX_SIDE}
        )
        detector = random_detector(workdir / "detector-artifact")
        tagger, tagger_metrics = tiny_tagger(workdir / "tagger-artifact")
    registry.register("captioner", caption_folder, metrics={"test_cider_d": 1.0})
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})
    registry.register("tagger", tagger, metrics=tagger_metrics)
    for name in ("captioner", "detector", "tagger"):
        assert registry.promote(name).status == "promoted"
    return uri


def _train_captioner(train_tiny: Callable[..., Any], decode_image: Callable[..., Any]) -> Any:
    """The tiny captioner, trained until it says every colour's caption (a few seconds at most)."""
    import torch

    for steps in (120, 240):
        model, tokenizer = train_tiny(CAPTIONS, seed=3, steps=steps)
        images = [decode_image(colour_png(c)).image for c in COLOURS]
        pixels = torch.from_numpy(model.preprocess.batch(images))
        if [c.text for c in model.generate(pixels)] == CAPTIONS:
            break
    return model, tokenizer


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` as ``(content_type, bytes)``; 404 otherwise."""

    def do_GET(self) -> None:
        files: Mapping[str, tuple[str, bytes]] = self.server.files  # type: ignore[attr-defined]
        if self.path not in files:
            self.send_error(404)
            return
        content_type, data = files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return


@dataclass
class ImageServer:
    """A loopback HTTP server for URL requests: ``files["/cat.png"] = ("image/png", data)``."""

    url: str
    files: dict[str, tuple[str, bytes]]


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """A threaded HTTP server on a free loopback port, serving the files the tests put in it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)  # the OS picks the port
    files: dict[str, tuple[str, bytes]] = {}
    server.files = files  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ImageServer(f"http://127.0.0.1:{server.server_address[1]}", files)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[Stack]:
    """Captioner + detector + gateway processes, ready, shared by every gateway test of the session."""
    workdir = tmp_path_factory.mktemp("gateway-stack")
    # Ultralytics' settings in a private folder, not ~/.config (inherited by the detector process).
    os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "yolo-config"))
    uri = _register_models(workdir, mlflow_template_db)
    captioner = ServiceProcess(
        "captioner", workdir / "captioner.log", env=_captioner_env(uri, "main", workdir), cwd=workdir
    )
    detector_env = {
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(workdir / "home-detector"),
        "SNAP2CAPTION_DETECTOR_MODEL_CACHE_DIR": str(workdir / "cache-detector"),
        "SNAP2CAPTION_DETECTOR_POLL_INTERVAL_S": "0",
        "SNAP2CAPTION_DETECTOR_MAX_WAIT_MS": "2",
    }
    detector = ServiceProcess("detector", workdir / "detector.log", env=detector_env, cwd=workdir)
    gateway = ServiceProcess("gateway", workdir / "gateway.log", cwd=workdir)
    stack = Stack(captioner, detector, gateway, workdir, uri)
    started: list[ServiceProcess] = []
    try:
        with ThreadPoolExecutor(2) as pool:  # each spends most of its start importing torch
            for future in [pool.submit(s.start, 120) for s in (captioner, detector)]:
                started.append(future.result())
        # Only now: a backend whose port was taken while it started runs on another one.
        gateway.env.update(stack.gateway_env(database_url=f"sqlite:///{workdir / 'gateway-main.db'}"))
        started.append(gateway.start(ready_timeout_s=60))
        yield stack
    finally:
        for service in [*reversed(stack.extra), gateway, detector, captioner]:
            try:
                service.stop(timeout_s=10)
            except Exception:
                service.kill()
