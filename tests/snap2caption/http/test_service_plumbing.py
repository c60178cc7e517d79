"""The shared plumbing, through a tiny app built with the factory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from snap2caption.errors import BadRequest, CorruptImage, NotFound, Overloaded, Timeout
from snap2caption.http import Readiness, create_app, error_responses
from tests.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parents[3]

router = APIRouter()


class Echo(BaseModel):
    name: str
    count: int


class Pong(BaseModel):
    ok: bool = True


@router.post("/v1/echo", response_model=Echo, responses=error_responses(400))
async def echo(body: Echo) -> Echo:
    return body


@router.get("/v1/items/{item_id}", response_model=Pong, responses=error_responses(404))
async def get_item(item_id: str) -> Pong:
    return Pong()


@router.get("/v1/boom", response_model=Pong)
async def boom() -> Pong:
    raise RuntimeError("secret internal detail /etc/passwd")


@router.get("/v1/boom-sync", response_model=Pong)
def boom_sync() -> Pong:
    raise KeyError("another secret")


ERRORS = {
    "bad": BadRequest("that is wrong"),
    "missing": NotFound("no such thing"),
    "corrupt": CorruptImage("truncated JPEG"),
    "busy": Overloaded("queue full", retry_after=2.5),
    "slow": Timeout("took too long"),
}


@router.get("/v1/raise/{kind}", response_model=Pong, responses=error_responses(400, 404, 422, 503, 504))
async def raise_kind(kind: str) -> Pong:
    raise ERRORS[kind]


@router.get("/v1/tracked/{track}", response_model=Pong, responses=error_responses(400))
async def tracked(track: str, request: Request, fail: bool = False) -> Pong:
    """As the gateway does: the route decides its request's release track, then may fail."""
    request.state.track = track
    if fail:
        raise BadRequest("failed after routing")
    return Pong()


STATE = {"ready": True}


def ready_check(app: FastAPI) -> Readiness:
    if STATE["ready"]:
        return Readiness(ready=True, checks={"model": "loaded"})
    return Readiness(ready=False, checks={"model": "missing"}, reason="model not loaded")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.loaded = True
    yield


@pytest.fixture()
def client() -> Iterator[TestClient]:
    STATE["ready"] = True
    app = create_app("tiny", "9.9.9", lifespan=lifespan, ready_check=ready_check, routers=[router])
    with TestClient(app) as test_client:
        yield test_client


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/echo", content=b'{"name": "a",', headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, "bad_request")
    assert "malformed JSON" in error["message"]


def test_empty_body_is_400(client: TestClient) -> None:
    response = client.post("/v1/echo", headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, "bad_request")
    assert "body" in error["message"]


def test_missing_and_mistyped_fields_are_named(client: TestClient) -> None:
    error = assert_envelope(client.post("/v1/echo", json={"name": "a"}), 400, "bad_request")
    assert "body.count" in error["message"]
    error = assert_envelope(client.post("/v1/echo", json={"name": "a", "count": "many"}), 400, "bad_request")
    assert "body.count" in error["message"]


def test_valid_request_passes(client: TestClient) -> None:
    response = client.post("/v1/echo", json={"name": "a", "count": 2})
    assert response.status_code == 200
    assert response.json() == {"name": "a", "count": 2}
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_unknown_route_is_404(client: TestClient) -> None:
    assert_envelope(client.get("/v1/nowhere"), 404, "not_found")


def test_wrong_method_is_405(client: TestClient) -> None:
    response = client.delete("/v1/echo")
    assert_envelope(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize("path", ["/v1/boom", "/v1/boom-sync"])
def test_unhandled_exception_is_500_without_traceback(
    client: TestClient, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = client.get(path)
    error = assert_envelope(response, 500, "internal_error")
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert "internal server error" in error["message"]
    # The traceback is in the server log instead, with the request id.
    logged = [r for r in caplog.records if r.name == "snap2caption.http" and r.exc_info]
    assert logged


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("bad", 400, "bad_request"),
        ("missing", 404, "not_found"),
        ("corrupt", 422, "corrupt_image"),
        ("busy", 503, "overloaded"),
        ("slow", 504, "timeout"),
    ],
)
def test_snap2caption_errors_keep_status_and_code(
    client: TestClient, kind: str, status: int, code: str
) -> None:
    response = client.get(f"/v1/raise/{kind}")
    error = assert_envelope(response, status, code)
    assert error["message"] == ERRORS[kind].message


def test_overloaded_sets_retry_after(client: TestClient) -> None:
    response = client.get("/v1/raise/busy")
    assert response.headers["retry-after"] == "3"


def test_sane_request_id_is_echoed_and_insane_one_replaced(client: TestClient) -> None:
    response = client.get("/v1/raise/missing", headers={"X-Request-ID": "abc-123.DEF"})
    assert response.headers["x-request-id"] == "abc-123.DEF"
    assert response.json()["error"]["request_id"] == "abc-123.DEF"
    response = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "service": "tiny", "version": "9.9.9"}


def test_readyz_ready_and_not_ready(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"model": "loaded"}
    STATE["ready"] = False
    response = client.get("/readyz")
    error = assert_envelope(response, 503, "not_ready")
    assert "model not loaded" in error["message"]
    assert error["details"] == {"checks": {"model": "missing"}}


def test_readyz_before_startup_is_503() -> None:
    app = create_app("tiny", "9.9.9", routers=[router])
    client = TestClient(app)  # no context manager: the lifespan has not run
    assert_envelope(client.get("/readyz"), 503, "not_ready")


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_under_route_template(client: TestClient) -> None:
    before = _sample(
        client.get("/metrics").text,
        "snap2caption_http_requests_total",
        service="tiny",
        route="/v1/items/{item_id}",
        method="GET",
        status="200",
    )
    for item in ("a", "b", "c"):
        assert client.get(f"/v1/items/{item}").status_code == 200
    text = client.get("/metrics").text
    after = _sample(
        text, "snap2caption_http_requests_total", service="tiny", route="/v1/items/{item_id}", status="200"
    )
    assert after - before == 3
    assert "/v1/items/a" not in text
    durations = _sample(
        text, "snap2caption_http_request_duration_seconds_count", service="tiny", route="/v1/items/{item_id}"
    )
    assert durations >= 3
    assert "snap2caption_http_requests_in_flight" in text


def test_metrics_carry_the_track_a_route_chose_else_the_services(client: TestClient) -> None:
    def count(track: str, status: str) -> float:
        text = client.get("/metrics").text
        return _sample(
            text,
            "snap2caption_http_requests_total",
            service="tiny",
            route="/v1/tracked/{track}",
            status=status,
            track=track,
        )

    before = {key: count(*key) for key in (("canary", "200"), ("canary", "400"), ("production", "200"))}
    assert client.get("/v1/tracked/canary").status_code == 200
    assert client.get("/v1/tracked/canary", params={"fail": "true"}).status_code == 400  # errors too
    assert client.get("/v1/tracked/production").status_code == 200
    assert {key: count(*key) - before[key] for key in before} == {
        ("canary", "200"): 1, ("canary", "400"): 1, ("production", "200"): 1,
    }  # fmt: skip
    text = client.get("/metrics").text
    tracked_durations = _sample(
        text,
        "snap2caption_http_request_duration_seconds_count",
        service="tiny",
        route="/v1/tracked/{track}",
        track="canary",
    )
    assert tracked_durations >= 2
    # A route that chooses nothing is the service's own track (production unless it serves a canary).
    assert (
        _sample(
            text, "snap2caption_http_requests_total", service="tiny", route="/metrics", track="production"
        )
        >= 1
    )


def test_a_service_serving_a_canary_labels_its_metrics_canary() -> None:
    app = create_app("tiny-canary", "9.9.9", routers=[router], track="canary")
    with TestClient(app) as client:
        assert client.get("/v1/items/x").status_code == 200
        text = client.get("/metrics").text
    assert (
        _sample(text, "snap2caption_http_requests_total", service="tiny-canary", route="/v1/items/{item_id}",
                track="canary") == 1
    )  # fmt: skip


def test_unmatched_paths_share_one_label(client: TestClient) -> None:
    client.get("/v1/random/path/1")
    client.get("/openapi.json")
    text = client.get("/metrics").text
    assert "/v1/random/path/1" not in text
    assert (
        _sample(text, "snap2caption_http_requests_total", service="tiny", route="<unmatched>", status="404")
        >= 1
    )
    assert (
        _sample(text, "snap2caption_http_requests_total", service="tiny", route="/openapi.json", status="200")
        >= 1
    )


def test_body_cap_is_413_envelope() -> None:
    app = create_app("tiny", "9.9.9", routers=[router], max_body_bytes=64)
    with TestClient(app) as client:
        response = client.post("/v1/echo", json={"name": "x" * 100, "count": 1})
        assert_envelope(response, 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:
            yield b'{"name": "'
            yield b"x" * 100
            yield b'", "count": 1}'

        response = client.post("/v1/echo", content=chunks(), headers={"content-type": "application/json"})
        assert_envelope(response, 413, "payload_too_large")


def test_openapi_documents_envelope_and_400_not_422(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    echo_responses = schema["paths"]["/v1/echo"]["post"]["responses"]
    assert "422" not in echo_responses
    assert echo_responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "500" in echo_responses
    assert "ErrorResponse" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


class Pid(BaseModel):
    pid: int


@router.get("/v1/pid", response_model=Pid)
async def pid() -> Pid:
    return Pid(pid=os.getpid())


def make_app() -> FastAPI:
    """Factory for the multi-worker test, imported by each uvicorn worker."""
    return create_app("tiny", "9.9.9", routers=[router])


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_add_up_across_uvicorn_workers(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "from snap2caption.http import ServiceSettings, run; "
        "run('tests.snap2caption.http.test_service_plumbing:make_app', "
        f"ServiceSettings(port={port}, workers=2))"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "a worker to serve")
        pids: set[int] = set()
        sent = 0

        def both_answered() -> bool:  # new connections spread over the workers once both are up
            nonlocal sent
            pids.add(httpx.get(f"{url}/v1/pid").json()["pid"])
            sent += 1
            return len(pids) == 2

        # Bounded by time, not by a count: the second worker may still be importing on busy cores.
        wait_for(both_answered, 60, "both workers to answer", interval_s=0)
        for _ in range(2):  # whichever worker answers the scrape reports both workers' requests
            text = httpx.get(f"{url}/metrics").text
            assert _sample(text, "snap2caption_http_requests_total", route="/v1/pid", status="200") == sent
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()
