"""``snap2caption.client`` over real HTTP on loopback.

Two servers:

- a scripted stand-in gateway (a tiny FastAPI app in its own uvicorn process) for what a real gateway
  will not do on demand: answer 503 / 429 with a chosen ``Retry-After`` a chosen number of times, answer
  like a proxy's HTML error page, or answer garbage. It records each request, so the tests also check
  what the client puts on the wire (multipart field, query options, JSON body, auth header). It is a
  stand-in only for those answers; everything else is tested against the real gateway below.
- the real gateway stack (captioner + detector + gateway processes with tiny models) from
  ``tests/gateway_stack.py`` (the suite-wide ``stack`` fixture).
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from snap2caption.client import (
    AsyncSnap2CaptionClient,
    Snap2CaptionAPIError,
    Snap2CaptionClient,
    Snap2CaptionConnectionError,
    parse_retry_after,
)
from tests.gateway_stack import CAPTIONS, COLOURS, Stack, colour_png
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.integration

STUB_APP = textwrap.dedent(
    '''
    """A scripted stand-in gateway: /v1/* answers pop from a script; every request is recorded."""
    import hashlib
    from typing import Any

    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse

    app = FastAPI()
    script: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []


    @app.get("/_ping")
    async def ping() -> dict[str, str]:
        return {"status": "ok"}


    @app.post("/_script")
    async def set_script(request: Request) -> dict[str, int]:
        script[:] = await request.json()
        seen.clear()
        return {"queued": len(script)}


    @app.get("/_seen")
    async def get_seen() -> list[dict[str, Any]]:
        return seen


    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def v1(path: str, request: Request) -> Response:
        record: dict[str, Any] = {
            "method": request.method,
            "path": "/v1/" + path,
            "query": dict(request.query_params),
            "authorization": request.headers.get("authorization"),
            "content_type": request.headers.get("content-type", "").split(";")[0],
            "user_agent": request.headers.get("user-agent"),
        }
        if record["content_type"] == "multipart/form-data":
            form = await request.form()
            record["files"] = [
                {"field": key, "filename": value.filename,
                 "sha256": hashlib.sha256(await value.read()).hexdigest()}
                for key, value in form.multi_items()
                if hasattr(value, "filename")
            ]
            record["fields"] = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        elif record["content_type"] == "application/json":
            record["json"] = await request.json()
        seen.append(record)
        answer = script.pop(0) if script else {"status": 500, "json": {"error": {
            "code": "internal_error", "message": "stub: script empty", "request_id": "stub"}}}
        headers = answer.get("headers", {})
        if "json" in answer:
            return JSONResponse(answer["json"], status_code=answer["status"], headers=headers)
        return Response(answer.get("text", ""), status_code=answer["status"], headers=headers,
                        media_type=answer.get("media_type", "text/html"))
    '''
)

RESULT = {
    "request_id": "rid-ok",
    "image": {"width": 64, "height": 48, "format": "png"},
    "caption": {"text": "a red circle", "confidence": 0.5},
    "alt_text": {"text": "A red circle.", "source": "caption"},
    "tags": [{"name": "cup", "score": 0.25, "hashtag": "#cup"}],
    "objects": [{"label": "circle", "score": 0.9, "box": {"x1": 1, "y1": 2, "x2": 30, "y2": 40}}],
    "models": {"caption": {"name": "captioner", "version": 1, "alias": "production", "backend": "onnx"}},
    "timings": {"decode_ms": 1.0, "total_ms": 9.5, "brand_new_ms": 0.5},
    "errors": [],
    "a_field_from_the_future": True,
}


def envelope(status: int, code: str, message: str, retry_after: str | None = None) -> dict[str, Any]:
    """A scripted error answer in the gateway's envelope."""
    answer: dict[str, Any] = {
        "status": status,
        "json": {"error": {"code": code, "message": message, "request_id": f"rid-{code}"}},
    }
    if retry_after is not None:
        answer["headers"] = {"Retry-After": retry_after}
    return answer


OK = {"status": 200, "json": RESULT}
# A batch answer as the gateway's contract has it (the client validates it with the gateway's schema).
EMPTY_BATCH = {"request_id": "b", "items": [], "succeeded": 0, "failed": 0, "total_ms": 1.0}


class Stub:
    """The running stand-in gateway."""

    def __init__(self, url: str) -> None:
        self.url = url

    def script(self, *answers: dict[str, Any]) -> None:
        """Queue the answers of the next /v1 requests (and forget what was seen)."""
        httpx.post(f"{self.url}/_script", json=list(answers), timeout=5).raise_for_status()

    def seen(self) -> list[dict[str, Any]]:
        """The /v1 requests received since the last ``script``."""
        seen: list[dict[str, Any]] = httpx.get(f"{self.url}/_seen", timeout=5).json()
        return seen


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    """The stand-in gateway in its own uvicorn process on a free loopback port."""
    import subprocess

    folder = tmp_path_factory.mktemp("stub-gateway")
    (folder / "stub_gateway.py").write_text(STUB_APP)
    port = free_port()
    log = (folder / "stub.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(folder), "stub_gateway:app", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"stub gateway exited: {(folder / 'stub.log').read_text()}")
        try:
            return httpx.get(f"{url}/_ping", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "the stub gateway")
        yield Stub(url)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


# ------------------------------------------------------------------------------ what goes on the wire


def test_upload_sends_multipart_file_query_options_and_bearer_key(stub: Stub, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n pretend")
    stub.script(OK)
    with Snap2CaptionClient(stub.url, api_key="k-123") as client:
        result = client.analyze(image, features=["caption", "tags"], max_tags=3, min_confidence=0.2)
    (request,) = stub.seen()
    assert request["path"] == "/v1/analyze" and request["content_type"] == "multipart/form-data"
    assert request["files"] == [
        {"field": "file", "filename": "photo.png", "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}
    ]
    assert request["query"] == {"features": "caption,tags", "max_tags": "3", "min_confidence": "0.2"}
    assert request["authorization"] == "Bearer k-123"
    assert request["user_agent"].startswith("snap2caption-client/")
    # Typed result; unknown fields ignored in the model but kept in `raw` and (timings) `model_extra`.
    assert result.caption is not None and result.caption.text == "a red circle"
    assert result.objects is not None and result.objects[0].box.x2 == 30
    assert result.models["caption"].version == 1
    assert result.timings.total_ms == 9.5 and result.timings.model_extra == {"brand_new_ms": 0.5}
    assert result.raw["a_field_from_the_future"] is True


def test_url_and_options_go_in_the_json_body(stub: Stub) -> None:
    stub.script(OK, {"status": 200, "json": EMPTY_BATCH})
    with Snap2CaptionClient(stub.url) as client:
        client.analyze("https://example.com/cat.jpg", features="objects", gender_neutral=True)
        client.analyze_batch(["http://example.com/a.png", "https://example.com/b.png"], max_tags=2)
    single, batch = stub.seen()
    assert single["json"] == {
        "url": "https://example.com/cat.jpg",
        "features": "objects",
        "gender_neutral": True,
    }
    assert single["authorization"] is None and single["query"] == {}
    assert batch["path"] == "/v1/analyze/batch"
    assert batch["json"] == {"urls": ["http://example.com/a.png", "https://example.com/b.png"], "max_tags": 2}


def test_batch_uploads_are_repeated_files_fields(stub: Stub, tmp_path: Path) -> None:
    second = tmp_path / "second.jpg"
    second.write_bytes(b"\xff\xd8\xff second")
    stub.script({"status": 200, "json": EMPTY_BATCH})
    with Snap2CaptionClient(stub.url) as client:
        client.analyze_batch([b"first", second])
    (request,) = stub.seen()
    assert [(f["field"], f["filename"]) for f in request["files"]] == [
        ("files", "image-0"),
        ("files", "second.jpg"),
    ]


def test_feedback_sends_only_what_was_given(stub: Stub) -> None:
    receipt_json = {"request_id": "rid-1", "inference_id": "inf-1", "id": 7}
    stub.script(*[{"status": 201, "json": receipt_json}] * 3)
    with Snap2CaptionClient(stub.url) as client:
        receipt = client.feedback("inf-1", rating=4)
        client.feedback(request_id="rid-1", caption="a cat")
        client.feedback("inf-1", rating=2, image=b"\x89PNG image bytes")
    assert (receipt.id, receipt.inference_id, receipt.image_stored) == (7, "inf-1", False)
    by_id, by_request_id, with_image = stub.seen()
    assert by_id["json"] == {"inference_id": "inf-1", "rating": 4}
    assert by_request_id["json"] == {"request_id": "rid-1", "caption": "a cat"}
    # With the image: the same fields, as multipart text fields, and the image as `file`.
    assert with_image["content_type"] == "multipart/form-data"
    assert with_image["fields"] == {"inference_id": "inf-1", "rating": "2"}
    assert with_image["files"] == [
        {"field": "file", "filename": "image-0", "sha256": hashlib.sha256(b"\x89PNG image bytes").hexdigest()}
    ]


def test_bad_arguments_are_refused_before_any_request(stub: Stub) -> None:
    stub.script()
    with Snap2CaptionClient(stub.url) as client:
        with pytest.raises(ValueError, match="features"):
            client.analyze(b"x", features=["caption", "colour"])
        with pytest.raises(ValueError, match="not a mix"):
            client.analyze_batch([b"x", "https://example.com/a.png"])
        with pytest.raises(ValueError, match="rating"):
            client.feedback("inf", rating=6)
        with pytest.raises(ValueError, match="caption, a rating"):
            client.feedback("inf")
        with pytest.raises(ValueError, match="one of the two"):
            client.feedback(rating=3)
        with pytest.raises(ValueError, match="one of the two"):
            client.feedback("inf", request_id="rid", rating=3)
    assert stub.seen() == []


# ------------------------------------------------------------------------------------------- errors


def test_envelope_becomes_a_typed_error(stub: Stub) -> None:
    stub.script(envelope(415, "unsupported_format", "the bytes look like plain text"))
    with Snap2CaptionClient(stub.url) as client, pytest.raises(Snap2CaptionAPIError) as caught:
        client.analyze(b"hello")
    error = caught.value
    assert (error.status, error.code, error.request_id) == (
        415,
        "unsupported_format",
        "rid-unsupported_format",
    )
    assert error.message == "the bytes look like plain text" and error.retry_after is None
    assert (
        str(error)
        == "415 unsupported_format: the bytes look like plain text (request id rid-unsupported_format)"
    )
    assert repr(pickle.loads(pickle.dumps(error))) == repr(error)  # survives process pools


def test_a_proxy_error_page_still_gives_a_readable_error(stub: Stub) -> None:
    page = "<html><body><h1>502 Bad Gateway</h1>\n<p>nginx</p></body></html>"
    stub.script({"status": 502, "text": page, "headers": {"X-Request-ID": "from-header"}})
    with Snap2CaptionClient(stub.url) as client, pytest.raises(Snap2CaptionAPIError) as caught:
        client.analyze(b"x")
    assert (caught.value.status, caught.value.code) == (502, "http_502")
    assert caught.value.request_id == "from-header" and "502 Bad Gateway" in caught.value.message


def test_a_200_that_is_not_a_result_is_an_error_not_a_crash(stub: Stub) -> None:
    stub.script({"status": 200, "json": {"unexpected": True}})
    with Snap2CaptionClient(stub.url) as client, pytest.raises(Snap2CaptionAPIError) as caught:
        client.analyze(b"x")
    assert caught.value.code == "invalid_response"


def test_unreachable_gateway_is_a_connection_error() -> None:
    with (
        Snap2CaptionClient(f"http://127.0.0.1:{free_port()}") as client,
        pytest.raises(Snap2CaptionConnectionError, match="cannot reach"),
    ):
        client.analyze(b"x")


def test_retry_after_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    from email.utils import formatdate

    now = 1_700_000_000.0  # a fixed clock: the answer is exact, not a window around a moving now
    monkeypatch.setattr(time, "time", lambda: now)
    assert parse_retry_after(formatdate(now + 10, usegmt=True)) == 10.0
    assert parse_retry_after(formatdate(now - 10, usegmt=True)) == 0.0  # a date already past: no wait


# ------------------------------------------------------------------------------------------ retries


def test_no_retry_unless_asked(stub: Stub) -> None:
    stub.script(envelope(503, "overloaded", "queue full", retry_after="0.1"), OK)
    with Snap2CaptionClient(stub.url) as client, pytest.raises(Snap2CaptionAPIError) as caught:
        client.analyze(b"x")
    assert (caught.value.code, caught.value.retry_after) == ("overloaded", 0.1)
    assert len(stub.seen()) == 1


def test_retries_503_and_429_waiting_retry_after(stub: Stub) -> None:
    stub.script(
        envelope(503, "overloaded", "queue full", retry_after="0.3"),
        envelope(429, "rate_limited", "slow down", retry_after="0.3"),
        OK,
    )
    started = time.monotonic()
    with Snap2CaptionClient(stub.url, max_retries=2) as client:
        result = client.analyze(b"x")
    assert result.request_id == "rid-ok"
    assert len(stub.seen()) == 3
    assert time.monotonic() - started >= 0.6  # both waits honoured


def test_gives_up_after_max_retries_with_the_last_error(stub: Stub) -> None:
    stub.script(*[envelope(503, "overloaded", "queue full", retry_after="0.05")] * 3, OK)
    with Snap2CaptionClient(stub.url, max_retries=2) as client, pytest.raises(Snap2CaptionAPIError) as caught:
        client.analyze(b"x")
    assert caught.value.code == "overloaded" and len(stub.seen()) == 3


def test_other_errors_and_long_waits_are_not_retried(stub: Stub) -> None:
    stub.script(
        envelope(500, "internal_error", "boom"), envelope(503, "overloaded", "busy", retry_after="120")
    )
    with Snap2CaptionClient(stub.url, max_retries=5, max_retry_wait_s=10) as client:
        with pytest.raises(Snap2CaptionAPIError, match="internal_error"):
            client.analyze(b"x")
        started = time.monotonic()
        with pytest.raises(Snap2CaptionAPIError) as caught:
            client.analyze(b"x")
    assert caught.value.retry_after == 120 and time.monotonic() - started < 5
    assert len(stub.seen()) == 2


def test_async_client_retries_and_raises_like_the_sync_one(stub: Stub) -> None:
    stub.script(
        envelope(503, "overloaded", "queue full", retry_after="0.1"),
        OK,
        envelope(401, "unauthorized", "missing API key"),
    )

    async def run() -> tuple[str, Snap2CaptionAPIError]:
        async with AsyncSnap2CaptionClient(stub.url, max_retries=1) as client:
            result = await client.analyze(b"x")
            with pytest.raises(Snap2CaptionAPIError) as caught:
                await client.analyze(b"x")
            return result.request_id, caught.value

    request_id, error = asyncio.run(run())
    assert request_id == "rid-ok"
    assert (error.status, error.code) == (401, "unauthorized")
    assert len(stub.seen()) == 3


# --------------------------------------------------------------------------------- the real gateway


def test_analyze_gives_a_typed_result(stack: Stack) -> None:
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        result = client.analyze(colour_png("red"))
    assert result.caption is not None and result.caption.text == CAPTIONS[0]
    assert 0 < (result.caption.confidence or 0) <= 1
    assert result.alt_text is not None and result.alt_text.source in ("caption", "fallback")
    assert (result.image.width, result.image.height, result.image.format) == (96, 72, "png")
    assert result.tags and all(tag.hashtag.startswith("#") for tag in result.tags)
    assert result.objects is not None
    for obj in result.objects:
        assert 0 <= obj.box.x1 <= obj.box.x2 <= 96 and 0 <= obj.box.y1 <= obj.box.y2 <= 72
    assert set(result.models) == {"caption", "tags", "objects"}
    assert result.models["caption"].name == "captioner" and result.models["caption"].version >= 1
    assert result.timings.total_ms and result.timings.total_ms > 0 and result.errors == []
    assert len(result.request_id) >= 16


def test_options_reach_the_gateway(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(colour_png("red"))
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        only_caption = client.analyze(path, features=["caption"])
        neutral = client.analyze(path, features="caption,tags", gender_neutral=True, max_tags=1)
    assert only_caption.caption is not None and only_caption.caption.text == CAPTIONS[0]
    assert only_caption.tags is None and only_caption.objects is None and only_caption.alt_text is None
    assert neutral.caption is not None and "man" not in neutral.caption.text.split()
    assert neutral.tags is not None and len(neutral.tags) == 1 and neutral.objects is None


def test_gateway_errors_raise_with_the_envelope(stack: Stack) -> None:
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        with pytest.raises(Snap2CaptionAPIError) as not_image:
            client.analyze(b"just text, not an image\n", filename="notes.jpg")
        with pytest.raises(Snap2CaptionAPIError) as loopback:
            client.analyze("http://127.0.0.1:9/cat.png")
        with pytest.raises(Snap2CaptionAPIError) as unknown:
            client.feedback("no-such-request", rating=3)
    assert (not_image.value.status, not_image.value.code) == (415, "unsupported_format")
    assert (loopback.value.status, loopback.value.code) == (400, "url_not_allowed")
    assert (unknown.value.status, unknown.value.code) == (404, "not_found")
    for error in (not_image.value, loopback.value, unknown.value):
        assert error.request_id and error.message and "Traceback" not in error.message


def test_batch_gives_a_result_or_an_error_per_item(stack: Stack) -> None:
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        batch = client.analyze_batch([colour_png("red"), b"not an image", colour_png("blue")])
    assert [item.index for item in batch.items] == [0, 1, 2]
    assert [item.ok for item in batch.items] == [True, False, True]
    assert (batch.succeeded, batch.failed) == (2, 1)
    first, bad, last = batch.items
    assert first.result is not None and first.result.caption is not None
    assert first.result.caption.text == CAPTIONS[0]
    assert last.result is not None and last.result.caption is not None
    assert last.result.caption.text == CAPTIONS[1]
    assert bad.error is not None and (bad.error.code, bad.error.status) == ("unsupported_format", 415)


def test_feedback_on_an_analysis_is_stored(stack: Stack) -> None:
    with Snap2CaptionClient(stack.gateway.url, timeout=60) as client:
        result = client.analyze(colour_png("green"), features="caption")
        assert result.inference_id is not None
        receipt = client.feedback(
            result.inference_id, caption="a kite over a green field", rating=2, reason="no girl"
        )
    assert (receipt.inference_id, receipt.request_id) == (result.inference_id, result.request_id)
    assert isinstance(receipt.id, int)


def test_async_client_analyses_concurrently(stack: Stack) -> None:
    colours = list(COLOURS)[:4]

    async def run() -> list[str]:
        async with AsyncSnap2CaptionClient(stack.gateway.url, timeout=60) as client:
            results = await asyncio.gather(
                *(client.analyze(colour_png(c), features="caption") for c in colours)
            )
        return [r.caption.text if r.caption else "" for r in results]

    assert asyncio.run(run()) == CAPTIONS[:4]
