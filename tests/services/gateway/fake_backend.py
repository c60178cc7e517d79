"""A scripted captioner/detector for the gateway's deadline, overload and slow-client tests.

A fake of a remote service, on purpose: the gateway under test is the real one (its own process, HTTP
client, middleware, breaker and database), and only the backend behind it is scripted, because what these
tests need from a backend is a behaviour on demand (answer after 30 s, shed load with 503 + Retry-After,
fail with 500) that the real model services show only under load nobody can schedule. It runs as its own
uvicorn process on a loopback port and speaks the real backends' wire format (what
``services.gateway.engine`` parses).

Model routes: the captioner's ``/v1/caption``, and the detector's ``/v1/analyze`` (tags and objects from
one call: ``{"tags": <a /v1/tags answer>, "objects": <a /v1/detect answer>}``, the parts ``features=``
names, default both). ``PUT /_fake`` sets the behaviour of every model route (``delay_s``, ``status``,
``code``, ``retry_after``) and forgets what was seen; ``GET /_fake`` returns what was seen: calls per route,
the ``timeout_ms`` each call carried and each call's query. ``GET /image.png`` serves an image after
``delay_s`` too (a slow host for URL requests).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.helpers import ServiceProcess, free_port, image_bytes, wait_for

ROOT = Path(__file__).resolve().parents[3]
MODEL = {"name": "fake", "version": 1, "alias": "production", "backend": "torch"}
HEALTHY = {"delay_s": 0.0, "status": 200, "code": None, "retry_after": None}

app = FastAPI()
app.state.behaviour = dict(HEALTHY)
TAGS = [{"name": "tabby", "score": 0.8, "hashtag": "#tabby"}]
OBJECTS = [{"label": "cat", "score": 0.7, "box": {"x1": 1.0, "y1": 1.0, "x2": 5.0, "y2": 5.0}}]


def _nothing_seen() -> dict[str, Any]:
    return {"calls": {}, "timeout_ms": [], "queries": []}


app.state.seen = _nothing_seen()


@app.put("/_fake")
async def set_behaviour(request: Request) -> dict[str, Any]:
    app.state.behaviour = {**HEALTHY, **(await request.json())}
    app.state.seen = _nothing_seen()
    return dict(app.state.behaviour)


@app.get("/_fake")
async def seen() -> dict[str, Any]:
    return dict(app.state.seen)


@app.get("/healthz")
@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ok"}


def _answer_of(result: dict[str, Any]) -> dict[str, Any]:
    """A model route's answer for one image."""
    return {"model": MODEL, "results": [{"index": 0, **result}]}


async def _answer(route: str, request: Request, answer: dict[str, Any]) -> Any:
    await request.body()
    seen = app.state.seen
    seen["calls"][route] = seen["calls"].get(route, 0) + 1
    seen["timeout_ms"].append(int(request.query_params.get("timeout_ms", "0")))
    seen["queries"].append(dict(request.query_params))
    behaviour = app.state.behaviour
    await asyncio.sleep(behaviour["delay_s"])
    if behaviour["status"] != 200:
        headers = {} if behaviour["retry_after"] is None else {"Retry-After": str(behaviour["retry_after"])}
        error = {"code": behaviour["code"] or "backend_error", "message": "scripted", "request_id": "-"}
        return JSONResponse({"error": error}, status_code=behaviour["status"], headers=headers)
    return answer


@app.get("/image.png")
async def image() -> Response:
    """An image to fetch by URL, after the scripted delay (a slow image host)."""
    await asyncio.sleep(app.state.behaviour["delay_s"])
    return Response(image_bytes("red"), media_type="image/png")


@app.post("/v1/caption")
async def caption(request: Request) -> Any:
    return await _answer(
        "caption", request, _answer_of({"caption": "a fake cat on a mat", "confidence": 0.9})
    )


@app.post("/v1/analyze")
async def analyze(request: Request) -> Any:
    parts = {"tags": _answer_of({"tags": TAGS}), "objects": _answer_of({"objects": OBJECTS})}
    asked = request.query_params.get("features", "tags,objects").split(",")
    return await _answer("analyze", request, {part: parts[part] for part in asked})


# ------------------------------------------------------------------------------------------ processes


class FakeBackend:
    """One fake backend process on a free loopback port."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeBackend:
        command = [
            sys.executable, "-m", "uvicorn", "tests.services.gateway.fake_backend:app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
            "--timeout-graceful-shutdown", "1",  # calls still sleeping are abandoned at the end
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for(self._up, 30, f"fake {self.name} on {self.url}", interval_s=0.1)
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"fake {self.name} exited; log:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def behave(self, **behaviour: Any) -> None:
        """Set the behaviour (``delay_s``, ``status``, ``code``, ``retry_after``); unset keys are healthy."""
        httpx.put(f"{self.url}/_fake", json=behaviour, timeout=5).raise_for_status()

    def seen(self) -> dict[str, Any]:
        """``{"calls": {route: n}, "timeout_ms": [...], "queries": [{param: value}, ...]}`` since the last
        :meth:`behave`, calls in the order they arrived."""
        answer: dict[str, Any] = httpx.get(f"{self.url}/_fake", timeout=5).json()
        return answer

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Fakes:
    """The fake captioner and detector, and gateways started in front of them."""

    captioner: FakeBackend
    detector: FakeBackend
    workdir: Path

    def gateway(self, wait: str = "ready", **settings: str) -> ServiceProcess:
        """Start a real gateway process in front of the fakes (``settings``: lower-case names of
        ``SNAP2CAPTION_GATEWAY_*``); the caller stops it. ``wait="live"`` for a dead backend URL."""
        n = len(list(self.workdir.glob("gateway-*.log")))
        values = {
            "captioner_url": self.captioner.url,
            "detector_url": self.detector.url,
            "database_url": f"sqlite:///{self.workdir / f'gateway-{n}.db'}",
            "ready_poll_interval_s": "0.3",
            **settings,
        }
        env = {
            "SNAP2CAPTION_HOME": str(self.workdir / "home"),
            **{f"SNAP2CAPTION_GATEWAY_{k.upper()}": v for k, v in values.items()},
        }
        service = ServiceProcess("gateway", self.workdir / f"gateway-{n}.log", env=env, cwd=self.workdir)
        if wait == "live":
            service.ready_path = "/healthz"
        return service.start(ready_timeout_s=60)


@pytest.fixture(scope="session")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fakes]:
    """A fake captioner and detector for the session; see the module docstring."""
    workdir = tmp_path_factory.mktemp("fake-backends")
    started = [FakeBackend(name, workdir / f"fake-{name}.log") for name in ("captioner", "detector")]
    try:
        for backend in started:
            backend.start()
        yield Fakes(started[0], started[1], workdir)
    finally:
        for backend in started:
            backend.stop()


@pytest.fixture()
def healthy(fakes: Fakes) -> Fakes:
    """The fakes, both answering at once (each test scripts what it needs from there)."""
    fakes.captioner.behave()
    fakes.detector.behave()
    return fakes
