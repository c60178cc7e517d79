"""``POST /v1/feedback`` on a minimal app (shared plumbing + this router), and the feedback -> ETL loop."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fastapi import APIRouter, Depends, FastAPI, Request
from PIL import Image
from sqlalchemy import Engine, select

import services.gateway.feedback as feedback_module
from services.gateway.auth import Principal
from services.gateway.db import feedback, make_engine
from services.gateway.feedback import router
from services.gateway.inference_log import InferenceLogWriter, InferenceRecord
from snap2caption.cli import main
from snap2caption.data.etl import EtlConfig, run_etl
from snap2caption.service import create_app


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def log_record(request_id: str, caption: str | None, image: bytes | None) -> InferenceRecord:
    outputs: dict[str, Any] = {"caption": {"text": caption, "confidence": 0.5}} if caption else {}
    return InferenceRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id=None,
        image_sha256=hashlib.sha256(image).hexdigest() if image else None,
        image_bytes=len(image) if image else None,
        width=40,
        height=30,
        format="png",
        features=["caption"],
        outputs=outputs,
        model_versions={},
        latencies_ms={},
        status=200,
        error_code=None,
        image=image,
    )


def write_log(engine: Engine, *records: InferenceRecord) -> None:
    writer = InferenceLogWriter(engine)
    writer.start()
    for r in records:
        assert writer.submit(r)
    writer.close(timeout_s=5)
    assert writer.written == len(records)


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    return make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")


@pytest.fixture()
def app(engine: Engine) -> FastAPI:
    async def fake_auth(request: Request) -> None:
        # Stands in for the gateway's auth dependency, which leaves the principal on request.state.
        request.state.principal = Principal(key_id="k-test")

    protected = APIRouter(dependencies=[Depends(fake_auth)])
    protected.include_router(router)
    application = create_app("gateway", "test", routers=[protected])
    application.state.db_engine = engine
    return application


@pytest.fixture()
def client(app: FastAPI) -> Iterator[httpx.AsyncClient]:
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def post(client: httpx.AsyncClient, body: Any, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        if isinstance(body, (bytes, str)):
            return await client.post(
                "/v1/feedback", content=body, headers={"content-type": "application/json"}
            )
        return await client.post("/v1/feedback", json=body, **kwargs)

    return asyncio.run(go())


def stored(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(feedback).order_by(feedback.c.id)))


def test_feedback_is_stored_normalised_with_the_key(engine: Engine, client: httpx.AsyncClient) -> None:
    write_log(engine, log_record("req-1", "a red square", png((200, 0, 0))))
    answer = post(client, {"request_id": "req-1", "caption": "  A  red\tsquare\n on white ", "reason": " x "})
    assert answer.status_code == 201, answer.text
    assert answer.json()["request_id"] == "req-1"
    answer2 = post(client, {"request_id": "req-1", "rating": 2})
    assert answer2.status_code == 201
    assert answer2.json()["id"] != answer.json()["id"]
    rows = stored(engine)
    assert [(r.caption, r.rating, r.reason, r.key_id) for r in rows] == [
        ("A red square on white", None, "x", "k-test"),
        (None, 2, None, "k-test"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "req-1"},  # neither caption nor rating
        {"request_id": "req-1", "rating": 0},
        {"request_id": "req-1", "rating": 6},
        {"request_id": "req-1", "rating": "great"},
        {"request_id": "req-1", "caption": ""},
        {"request_id": "req-1", "caption": "   \n\t "},
        {"request_id": "req-1", "caption": "x" * 301},
        {"request_id": "req-1", "rating": 5, "reason": "y" * 501},
        {"request_id": "req-1", "rating": 5, "mood": "happy"},
        {"caption": "no request id"},
        {"request_id": "", "rating": 3},
        [1, 2],
        "{not json",
        "",
    ],
)
def test_bad_feedback_is_a_400_envelope(engine: Engine, client: httpx.AsyncClient, body: Any) -> None:
    write_log(engine, log_record("req-1", "a red square", None))
    answer = post(client, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "bad_request"
    assert error["request_id"] == answer.headers["x-request-id"]
    assert stored(engine) == []


def test_unknown_request_id_is_404(
    engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback_module, "LOG_LAG_S", 0.2)
    answer = post(client, {"request_id": "never-logged", "rating": 5})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert stored(engine) == []


def test_feedback_sent_before_the_log_record_lands_waits_for_it(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    # The log is written off the request path: feedback may arrive a moment before its record.
    timer = threading.Timer(0.3, write_log, args=(engine, log_record("req-late", "a cat", None)))
    timer.start()
    started = time.monotonic()
    answer = post(client, {"request_id": "req-late", "rating": 4})
    timer.join()
    assert answer.status_code == 201, answer.text
    assert 0.25 <= time.monotonic() - started < feedback_module.LOG_LAG_S + 0.5


def test_export_feeds_the_real_etl(engine: Engine, client: httpx.AsyncClient, tmp_path: Path) -> None:
    red, blue, green, grey = png((200, 0, 0)), png((0, 0, 200)), png((0, 200, 0)), png((90, 90, 90))
    write_log(
        engine,
        log_record("r-red", "a blue square", red),  # wrong: corrected below
        log_record("r-blue", "a blue square", blue),  # right: confirmed by a good rating
        log_record("r-blue-again", "a blue square", blue),  # same image again, same caption
        log_record("r-green", "a green square", green),  # rated badly, no correction
        log_record("r-private", "a grey square", None),  # image not retained
        log_record("r-grey", "a grey square", grey),  # not rated at all: no feedback
    )
    for body in [
        {"request_id": "r-red", "caption": "A red square on a white page", "rating": 1},
        {"request_id": "r-blue", "rating": 5},
        {"request_id": "r-blue-again", "rating": 4},
        {"request_id": "r-green", "rating": 2},
        {"request_id": "r-private", "caption": "a grey square"},
    ]:
        assert post(client, body).status_code == 201

    export = tmp_path / "feedback-data"
    url = str(engine.url)
    result = CliRunner().invoke(main, ["data", "feedback-export", "--database", url, "--out", str(export)])
    assert result.exit_code == 0, result.output
    assert "2 images, 2 captions (1 corrected, 1 confirmed by rating)" in result.output
    assert "image_not_retained 1" in result.output and "rating_below_min 1" in result.output

    coco = json.loads((export / "annotations" / "captions.json").read_text())
    files = {img["file_name"] for img in coco["images"]}
    assert files == {f"{hashlib.sha256(red).hexdigest()}.png", f"{hashlib.sha256(blue).hexdigest()}.png"}
    assert (export / "images" / f"{hashlib.sha256(red).hexdigest()}.png").read_bytes() == red

    out = tmp_path / "etl-out"
    report = run_etl(
        EtlConfig(
            source="coco",
            images=export / "images",
            annotations=[export / "annotations" / "captions.json"],
            out=out,
            workers=1,
        ),
        progress=False,
    )
    assert report.images_ok == 2 and not report.quarantined
    captions = sorted(
        caption
        for split in ("train", "val", "test")
        for row in pq.read_table(out / "manifests" / f"{split}.parquet").to_pylist()
        for caption in row["captions"]
    )
    # The ETL's own normalisation (lowercase, no trailing period) applies to feedback as to any source.
    assert captions == ["a blue square", "a red square on a white page"]

    # Re-running with a higher bar: r-blue (5) still confirms blue, r-blue-again (4) no longer counts;
    # an exported image that no longer belongs is removed, anyone else's file is left alone.
    stale = export / "images" / f"{'ab' * 32}.png"
    stale.write_bytes(grey)
    (export / "images" / "notes.txt").write_text("mine")
    again = CliRunner().invoke(
        main, ["data", "feedback-export", "--database", url, "--out", str(export), "--min-rating", "5"]
    )
    assert again.exit_code == 0, again.output
    assert "2 images" in again.output and "rating_below_min 2" in again.output
    assert not stale.exists() and (export / "images" / "notes.txt").exists()
