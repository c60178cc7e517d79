"""``POST /v1/feedback`` on a minimal app (shared plumbing + this router), the feedback -> ETL loop, and
the same loop end to end through a real gateway with API keys on."""

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
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fastapi import APIRouter, Depends, FastAPI, Request
from PIL import Image
from sqlalchemy import Engine, create_engine, select

import services.gateway.feedback as feedback_module
from services.gateway.auth import Principal
from services.gateway.config import Settings
from services.gateway.db import feedback, inference_log, make_engine
from services.gateway.feedback import router
from services.gateway.inference_log import InferenceLogWriter, InferenceRecord
from snap2caption.cli import main
from snap2caption.data.etl import EtlConfig, run_etl
from snap2caption.http import create_app
from tests.gateway_stack import Stack, assert_envelope
from tests.helpers import image_bytes, wait_for

KEY = "k-test"
MAX_IMAGE_BYTES = 60_000
MAX_IMAGE_PIXELS = 1_000_000


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def log_record(
    request_id: str, caption: str | None, image: bytes | None, key_id: str | None = KEY, retained: bool = True
) -> InferenceRecord:
    """A logged analysis of ``image`` (its hash always; its bytes only when ``retained``)."""
    outputs: dict[str, Any] = {"caption": {"text": caption, "confidence": 0.5}} if caption else {}
    return InferenceRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id=key_id,
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
        image=image if retained else None,
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
        # Stands in for the gateway's auth dependency, which leaves the principal on request.state:
        # the key id from a test header, or none (keys off).
        request.state.principal = Principal(key_id=request.headers.get("x-test-key"))

    protected = APIRouter(dependencies=[Depends(fake_auth)])
    protected.include_router(router)
    application = create_app("gateway", "test", routers=[protected])
    application.state.db_engine = engine
    application.state.settings = Settings(max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
    return application


@pytest.fixture()
def client(app: FastAPI) -> Iterator[httpx.AsyncClient]:
    yield httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def post(
    client: httpx.AsyncClient,
    body: Any,
    key: str | None = KEY,
    image: bytes | None = None,
) -> httpx.Response:
    """POST feedback: ``body`` as JSON (or raw text), or as multipart fields when ``image`` is given."""
    headers = {"x-test-key": key} if key else {}

    async def go() -> httpx.Response:
        if image is not None:
            fields = {k: str(v) for k, v in body.items()}
            files = {"file": ("photo.png", image, "image/png")}
            return await client.post("/v1/feedback", data=fields, files=files, headers=headers)
        if isinstance(body, (bytes, str)):
            headers["content-type"] = "application/json"
            return await client.post("/v1/feedback", content=body, headers=headers)
        return await client.post("/v1/feedback", json=body, headers=headers)

    return asyncio.run(go())


def stored(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(feedback).order_by(feedback.c.id)))


def logged_image(engine: Engine, inference_id: str) -> bytes | None:
    with engine.connect() as conn:
        image = conn.execute(select(inference_log.c.image).where(inference_log.c.id == inference_id)).scalar()
    return None if image is None else bytes(image)


def export(engine: Engine, out: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        main, ["data", "feedback-export", "--database", str(engine.url), "--out", str(out), *args]
    )
    assert result.exit_code == 0, result.output
    return {"output": result.output, **json.loads((out / "annotations" / "captions.json").read_text())}


# ------------------------------------------------------------------------------------------ the route


def test_feedback_is_stored_normalised_with_the_key(engine: Engine, client: httpx.AsyncClient) -> None:
    record = log_record("req-1", "a red square", png((200, 0, 0)))
    write_log(engine, record)
    answer = post(
        client, {"inference_id": record.id, "caption": "  A  red\tsquare\n on white ", "reason": " x "}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json() | {"id": 0} == {
        "id": 0,
        "inference_id": record.id,
        "request_id": "req-1",
        "image_stored": False,
    }
    answer2 = post(client, {"inference_id": record.id, "rating": 2})
    assert answer2.status_code == 201
    assert answer2.json()["id"] != answer.json()["id"]
    rows = stored(engine)
    assert [(r.inference_id, r.caption, r.rating, r.reason, r.key_id) for r in rows] == [
        (record.id, "A red square on white", None, "x", KEY),
        (record.id, None, 2, None, KEY),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"inference_id": "inf-1"},  # neither caption nor rating
        {"inference_id": "inf-1", "rating": 0},
        {"inference_id": "inf-1", "rating": 6},
        {"inference_id": "inf-1", "rating": "great"},
        {"inference_id": "inf-1", "caption": ""},
        {"inference_id": "inf-1", "caption": "   \n\t "},
        {"inference_id": "inf-1", "caption": "x" * 301},
        {"inference_id": "inf-1", "rating": 5, "reason": "y" * 501},
        {"inference_id": "inf-1", "rating": 5, "mood": "happy"},
        {"inference_id": "inf-1", "request_id": "req-1", "rating": 5},  # which one?
        {"caption": "no analysis named"},
        {"inference_id": "", "rating": 3},
        {"inference_id": "i" * 161, "rating": 3},
        [1, 2],
        "{not json",
        "",
    ],
)
def test_bad_feedback_is_a_400_envelope(engine: Engine, client: httpx.AsyncClient, body: Any) -> None:
    write_log(engine, log_record("req-1", "a red square", None))
    answer = post(client, body)
    assert_envelope(answer, 400, "bad_request")
    assert stored(engine) == []


@pytest.mark.parametrize("field", ["inference_id", "request_id"])
def test_an_unknown_analysis_is_404(
    engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monkeypatch.setattr(feedback_module, "LOG_LAG_S", 0.2)
    answer = post(client, {field: "never-logged", "rating": 5})
    assert_envelope(answer, 404, "not_found")
    assert stored(engine) == []


def test_a_request_id_is_accepted_only_when_it_names_one_analysis(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    once, twice = log_record("req-once", "a cat", None), log_record("req-twice", "a dog", None)
    write_log(engine, once, twice, log_record("req-twice", "a dog", None))  # a client resent its request id
    answer = post(client, {"request_id": "req-once", "rating": 4})
    assert answer.status_code == 201, answer.text
    assert (answer.json()["inference_id"], answer.json()["request_id"]) == (once.id, "req-once")
    error = assert_envelope(
        post(client, {"request_id": "req-twice", "rating": 4}), 409, "ambiguous_request_id"
    )
    assert "inference_id" in error["message"]
    assert post(client, {"inference_id": twice.id, "rating": 4}).status_code == 201
    assert [r.inference_id for r in stored(engine)] == [once.id, twice.id]


def test_with_keys_on_only_the_key_that_analysed_may_send_feedback(
    engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feedback_module, "LOG_LAG_S", 0.2)
    mine = log_record("req-mine", "a cat", png((1, 2, 3)), key_id="k-mine", retained=False)
    write_log(engine, mine)
    # Another key's analysis is "not found", exactly like one that does not exist: ids cannot be probed.
    for body in ({"inference_id": mine.id, "rating": 1}, {"request_id": "req-mine", "rating": 1}):
        assert_envelope(post(client, body, key="k-other"), 404, "not_found")
    assert_envelope(
        post(client, {"inference_id": mine.id, "rating": 1}, image=png((1, 2, 3))), 404, "not_found"
    )
    assert stored(engine) == [] and logged_image(engine, mine.id) is None
    assert post(client, {"inference_id": mine.id, "rating": 1}, key="k-mine").status_code == 201
    # Keys off: no one is told apart, so any caller may send feedback.
    assert post(client, {"request_id": "req-mine", "rating": 2}, key=None).status_code == 201
    assert [(r.rating, r.key_id) for r in stored(engine)] == [(1, "k-mine"), (2, None)]


def test_feedback_sent_before_the_log_record_lands_waits_for_it(
    engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log is written off the request path: feedback may arrive a moment before its record. A
    # generous wait, so a busy machine cannot turn the late record into a 404.
    monkeypatch.setattr(feedback_module, "LOG_LAG_S", 30.0)
    late = log_record("req-late", "a cat", None)
    timer = threading.Timer(0.3, write_log, args=(engine, late))
    started = time.monotonic()
    timer.start()
    answer = post(client, {"inference_id": late.id, "rating": 4})
    timer.join()
    assert answer.status_code == 201, answer.text
    assert time.monotonic() - started >= 0.3  # it answered only once the record was there


# ------------------------------------------------------------------------------------------ images


def test_the_analysed_image_sent_with_feedback_is_kept_for_export(
    engine: Engine, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    red, blue = png((200, 0, 0)), png((0, 0, 200))
    private = log_record("req-red", "a blue square", red, retained=False)  # retention off (the default)
    retained = log_record("req-blue", "a blue square", blue)
    write_log(engine, private, retained)
    before = export(engine, tmp_path / "before")
    assert before["images"] == [] and "image_not_retained" not in before["output"]  # no feedback yet
    assert post(client, {"inference_id": private.id, "caption": "a red square"}).status_code == 201
    assert "image_not_retained 1" in export(engine, tmp_path / "without")["output"]

    # The image may come with any later feedback on the analysis; it serves the earlier one too.
    answer = post(client, {"inference_id": private.id, "rating": 2}, image=red)
    assert answer.status_code == 201, answer.text
    assert answer.json()["image_stored"] is True
    assert logged_image(engine, private.id) == red
    # Sending the image of an analysis whose image was retained anyway changes nothing.
    assert post(client, {"inference_id": retained.id, "rating": 5}, image=blue).status_code == 201
    assert logged_image(engine, retained.id) == blue

    coco = export(engine, tmp_path / "export")
    red_name, blue_name = (f"{hashlib.sha256(b).hexdigest()}.png" for b in (red, blue))
    assert {img["file_name"] for img in coco["images"]} == {red_name, blue_name}
    by_file = {img["id"]: img["file_name"] for img in coco["images"]}
    assert sorted((by_file[a["image_id"]], a["caption"]) for a in coco["annotations"]) == sorted(
        [(red_name, "a red square"), (blue_name, "a blue square")]
    )
    assert (tmp_path / "export" / "images" / red_name).read_bytes() == red
    assert "skipped: rating_below_min 1 ->" in coco["output"]  # the rating of 2; nothing lacks an image


def noise_png(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "status", "code"),
    [
        (png((0, 200, 0)), 409, "image_mismatch"),  # a sound image, but not the analysed one
        (b"just some text, not an image\n", 415, "unsupported_format"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", 415, "unsupported_format"),
        (png((200, 0, 0))[:60], 422, "corrupt_image"),
        (noise_png((200, 200)), 413, "payload_too_large"),  # ~120 kB > the 60 kB cap
        (png((200, 0, 0), size=(2000, 1000)), 413, "image_too_large"),  # 2 MP > the 1 MP cap
    ],
)
def test_a_wrong_or_bad_image_is_refused_with_the_envelope(
    engine: Engine, client: httpx.AsyncClient, image: bytes, status: int, code: str
) -> None:
    record = log_record("req-red", "a blue square", png((200, 0, 0)), retained=False)
    write_log(engine, record)
    assert_envelope(post(client, {"inference_id": record.id, "rating": 2}, image=image), status, code)
    assert stored(engine) == [] and logged_image(engine, record.id) is None


def test_an_image_for_an_analysis_that_logged_none_is_refused(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    failed = log_record("req-failed", None, None)  # failed before an image was decoded: no hash
    write_log(engine, failed)
    error = assert_envelope(
        post(client, {"inference_id": failed.id, "rating": 1}, image=png((1, 1, 1))), 409, "image_mismatch"
    )
    assert "logged no image" in error["message"]


@pytest.mark.parametrize(
    ("files", "data"),
    [
        ({"file": ("a.png", b"", "image/png")}, {"inference_id": "x", "rating": "3"}),  # empty upload
        ({"image": ("a.png", b"\x89PNG", "image/png")}, {"inference_id": "x", "rating": "3"}),  # wrong field
        (None, {"inference_id": "x", "rating": "3", "file": "not a file"}),
        ({"file": ("a.png", b"\x89PNG", "image/png")}, {"inference_id": "x", "rating": "3", "mood": "ok"}),
        ({"file": ("a.png", b"\x89PNG", "image/png")}, {"rating": "3"}),
    ],
)
def test_malformed_multipart_feedback_is_a_400_envelope(
    engine: Engine, client: httpx.AsyncClient, files: Any, data: dict[str, str]
) -> None:
    async def go() -> httpx.Response:
        if files is None:  # multipart with text fields only
            return await client.post(
                "/v1/feedback", files={k: (None, v) for k, v in data.items()}, headers={"x-test-key": KEY}
            )
        return await client.post("/v1/feedback", data=data, files=files, headers={"x-test-key": KEY})

    assert_envelope(asyncio.run(go()), 400, "bad_request")


# ------------------------------------------------------------------------------------------ export


def test_export_feeds_the_real_etl(engine: Engine, client: httpx.AsyncClient, tmp_path: Path) -> None:
    red, blue, green, grey = png((200, 0, 0)), png((0, 0, 200)), png((0, 200, 0)), png((90, 90, 90))
    records = {
        "red": log_record("r-red", "a blue square", red),  # wrong: corrected below
        "blue": log_record("r-blue", "a blue square", blue),  # right: confirmed by a good rating
        "blue-again": log_record("r-blue-again", "a blue square", blue),  # same image again, same caption
        "green": log_record("r-green", "a green square", green),  # rated badly, no correction
        "private": log_record("r-private", "a grey square", grey, retained=False),  # image not retained
        "grey": log_record("r-grey", "a grey square", grey),  # not rated at all: no feedback
    }
    write_log(engine, *records.values())
    for name, body in [
        ("red", {"caption": "A red square on a white page", "rating": 1}),
        ("blue", {"rating": 5}),
        ("blue-again", {"rating": 4}),
        ("green", {"rating": 2}),
        ("private", {"caption": "a grey square"}),
    ]:
        assert post(client, {"inference_id": records[name].id, **body}).status_code == 201

    out = tmp_path / "feedback-data"
    coco = export(engine, out)
    assert "2 images, 2 captions (1 corrected, 1 confirmed by rating)" in coco["output"]
    assert "image_not_retained 1" in coco["output"] and "rating_below_min 1" in coco["output"]
    files = {img["file_name"] for img in coco["images"]}
    assert files == {f"{hashlib.sha256(red).hexdigest()}.png", f"{hashlib.sha256(blue).hexdigest()}.png"}
    assert (out / "images" / f"{hashlib.sha256(red).hexdigest()}.png").read_bytes() == red

    etl_out = tmp_path / "etl-out"
    report = run_etl(
        EtlConfig(
            source="coco",
            images=out / "images",
            annotations=[out / "annotations" / "captions.json"],
            out=etl_out,
            workers=1,
        ),
        progress=False,
    )
    assert report.images_ok == 2 and not report.quarantined
    captions = sorted(
        caption
        for split in ("train", "val", "test")
        for row in pq.read_table(etl_out / "manifests" / f"{split}.parquet").to_pylist()
        for caption in row["captions"]
    )
    # The ETL's own normalisation (lowercase, no trailing period) applies to feedback as to any source.
    assert captions == ["a blue square", "a red square on a white page"]

    # Re-running with a higher bar: r-blue (5) still confirms blue, r-blue-again (4) no longer counts;
    # an exported image that no longer belongs is removed, anyone else's file is left alone.
    stale = out / "images" / f"{'ab' * 32}.png"
    stale.write_bytes(grey)
    (out / "images" / "notes.txt").write_text("mine")
    again = export(engine, out, "--min-rating", "5")
    assert "2 images" in again["output"] and "rating_below_min 2" in again["output"]
    assert not stale.exists() and (out / "images" / "notes.txt").exists()


# ------------------------------------------------------------------------------ through a real gateway


@pytest.mark.integration
def test_loop_through_a_gateway_with_keys_and_no_image_retention(stack: Stack, tmp_path: Path) -> None:
    """Analyse with retention off -> feedback with the image (from the key that analysed) -> export."""
    gateway = stack.start_gateway(auth_enabled="true")
    database = gateway.env["SNAP2CAPTION_GATEWAY_DATABASE_URL"]
    runner = CliRunner()
    keys = [runner.invoke(main, ["keys", "create", name, "--database", database]) for name in ("a", "b")]
    assert all(k.exit_code == 0 for k in keys), [k.output for k in keys]
    key_a, key_b = (k.stdout.strip().splitlines()[-1] for k in keys)

    photo = image_bytes("red")
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        # A client that resends its own X-Request-ID: both analyses are logged, each under its own id.
        answers = [
            http.post(
                "/v1/analyze",
                files={"file": ("red.png", photo, "image/png")},
                headers={"Authorization": f"Bearer {key_a}", "X-Request-ID": "client-chosen-1"},
            )
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        first, second = (a.json() for a in answers)
        assert first["request_id"] == second["request_id"] == "client-chosen-1"
        assert first["inference_id"] != second["inference_id"]

        def feedback_call(key: str, image: bytes, **fields: str) -> httpx.Response:
            return http.post(
                "/v1/feedback",
                data={"inference_id": first["inference_id"], **fields},
                files={"file": ("red.png", image, "image/png")},
                headers={"Authorization": f"Bearer {key}"},
            )

        assert_envelope(feedback_call(key_b, photo, caption="a red square"), 404, "not_found")
        assert_envelope(
            feedback_call(key_a, image_bytes("blue"), caption="a red square"), 409, "image_mismatch"
        )
        assert_envelope(
            feedback_call(key_a, b"%PDF-1.7\n", caption="a red square"), 415, "unsupported_format"
        )
        too_big = np.random.default_rng(1).integers(0, 256, (800, 800, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(too_big).save(buffer, format="PNG")  # ~1.9 MB > the stack's 1.5 MB image cap
        assert_envelope(
            feedback_call(key_a, buffer.getvalue(), caption="a red square"), 413, "payload_too_large"
        )
        stored_answer = feedback_call(key_a, photo, caption="a red square in the middle", rating="2")
        assert stored_answer.status_code == 201, stored_answer.text
        assert stored_answer.json()["image_stored"] is True
        ambiguous = http.post(
            "/v1/feedback",
            json={"request_id": "client-chosen-1", "rating": 3},
            headers={"Authorization": f"Bearer {key_a}"},
        )
        assert_envelope(ambiguous, 409, "ambiguous_request_id")

    engine = create_engine(database)
    try:

        def both_logged() -> list[Any] | None:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(inference_log.c.id, inference_log.c.image).where(
                        inference_log.c.request_id == "client-chosen-1"
                    )
                ).all()
            return rows if len(rows) == 2 else None

        rows = {r.id: r.image for r in wait_for(both_logged, timeout_s=10, what="both analyses logged")}
        assert set(rows) == {first["inference_id"], second["inference_id"]}
        assert bytes(rows[first["inference_id"]]) == photo  # sent with the feedback
        assert rows[second["inference_id"]] is None  # retention is off
    finally:
        engine.dispose()

    out = tmp_path / "export"
    result = runner.invoke(main, ["data", "feedback-export", "--database", database, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 images, 1 captions (1 corrected, 0 confirmed by rating)" in result.output
    coco = json.loads((out / "annotations" / "captions.json").read_text())
    name = f"{hashlib.sha256(photo).hexdigest()}.png"
    assert [img["file_name"] for img in coco["images"]] == [name]
    assert [a["caption"] for a in coco["annotations"]] == ["a red square in the middle"]
    assert (out / "images" / name).read_bytes() == photo
