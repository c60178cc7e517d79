"""The inference log writer: batches, concurrency, drops that are counted and never raised."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select, text

from services.gateway.db import inference_log, make_engine
from services.gateway.inference_log import InferenceLogWriter, InferenceRecord, new_inference_id
from tests.helpers import wait_for


def record(request_id: str, image: bytes | None = None, **changes: Any) -> InferenceRecord:
    return InferenceRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id="abc123abc123",
        image_sha256="0" * 64,
        image_bytes=1234,
        width=64,
        height=48,
        format="png",
        features=["caption", "tags"],
        outputs={"caption": {"text": "a red square", "confidence": 0.9}, "tags": [{"label": "red"}]},
        model_versions={"captioner": {"name": "captioner", "version": "3"}},
        latencies_ms={"total_ms": 12.5},
        status=200,
        error_code=None,
        image=image,
        **changes,
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(inference_log)).scalar_one())


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    return make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")


def test_records_round_trip(engine: Engine) -> None:
    writer = InferenceLogWriter(engine)
    writer.start()
    assert writer.submit(record("r1", image=b"\x89PNG..."))
    failed = record("r2")
    failed.status, failed.error_code, failed.outputs = 415, "unsupported_format", {}
    failed.image_sha256 = failed.image_bytes = failed.width = failed.height = failed.format = None
    assert writer.submit(failed)
    writer.close(timeout_s=5)
    with engine.connect() as conn:
        got = {r.request_id: r for r in conn.execute(select(inference_log))}
    assert got["r1"].outputs["caption"]["text"] == "a red square"
    assert got["r1"].features == ["caption", "tags"]
    assert got["r1"].latencies == {"total_ms": 12.5}
    assert bytes(got["r1"].image) == b"\x89PNG..."
    assert (got["r2"].status, got["r2"].error_code, got["r2"].image_bytes) == (
        415,
        "unsupported_format",
        None,
    )


def test_concurrent_submits_are_all_written_in_batches(engine: Engine) -> None:
    written_before = metric("snap2caption_inference_log_written_total")
    writer = InferenceLogWriter(engine, max_queue=5000, batch_size=50)
    writer.start()
    results: list[bool] = []
    lock = threading.Lock()

    def submit_many(worker: int) -> None:
        mine = [writer.submit(record(f"w{worker}-{i}")) for i in range(200)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=submit_many, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close(timeout_s=20)
    assert all(results) and len(results) == 1600
    assert rows(engine) == 1600
    assert writer.written == 1600
    assert metric("snap2caption_inference_log_written_total") - written_before == 1600
    assert writer.queue_depth == 0


def test_full_queue_drops_and_counts_without_blocking(engine: Engine) -> None:
    before = metric("snap2caption_inference_log_dropped_total", reason="queue_full")
    writer = InferenceLogWriter(engine, max_queue=5)  # not started: nothing drains the queue
    accepted = [writer.submit(record(f"q{i}")) for i in range(12)]
    assert accepted == [True] * 5 + [False] * 7
    assert writer.dropped["queue_full"] == 7
    assert metric("snap2caption_inference_log_dropped_total", reason="queue_full") - before == 7
    assert metric("snap2caption_inference_log_queue_depth") >= 5
    writer.start()
    writer.close(timeout_s=5)
    assert rows(engine) == 5


def test_submit_after_close_is_dropped_as_closed(engine: Engine) -> None:
    writer = InferenceLogWriter(engine)
    writer.start()
    writer.close(timeout_s=5)
    before = metric("snap2caption_inference_log_dropped_total", reason="closed")
    assert writer.submit(record("late")) is False
    assert metric("snap2caption_inference_log_dropped_total", reason="closed") - before == 1


def test_a_broken_database_never_reaches_the_caller_and_the_writer_recovers(engine: Engine) -> None:
    before = metric("snap2caption_inference_log_dropped_total", reason="db_error")
    writer = InferenceLogWriter(engine, batch_size=10)
    writer.start()
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE inference_log"))
    for i in range(25):
        assert writer.submit(record(f"lost-{i}")) is True  # queued; the failure happens off the caller
    wait_for(lambda: writer.dropped["db_error"] == 25, timeout_s=10, what="25 db_error drops")
    assert metric("snap2caption_inference_log_dropped_total", reason="db_error") - before == 25
    inference_log.create(engine)  # the database is back
    assert writer.submit(record("after"))
    writer.close(timeout_s=5)
    assert writer.written == 1 and rows(engine) == 1


def test_a_repeated_request_id_is_logged_twice_under_two_ids(engine: Engine) -> None:
    writer = InferenceLogWriter(engine, batch_size=100)
    for i in range(5):
        writer.submit(record(f"r{i}"))
    writer.submit(record("r2"))  # a client re-sent its own X-Request-ID
    writer.start()
    writer.close(timeout_s=5)
    assert rows(engine) == 6 and writer.dropped["db_error"] == 0
    with engine.connect() as conn:
        ids = (
            conn.execute(select(inference_log.c.id).where(inference_log.c.request_id == "r2")).scalars().all()
        )
    assert len(set(ids)) == 2


def test_a_record_the_database_refuses_loses_only_itself(engine: Engine) -> None:
    writer = InferenceLogWriter(engine, batch_size=100)
    taken = new_inference_id()
    for i in range(5):
        writer.submit(record(f"r{i}", id=taken if i == 0 else new_inference_id()))
    writer.submit(record("r5", id=taken))  # refused (the key exists): the batch is retried one by one
    writer.start()
    writer.close(timeout_s=5)
    assert rows(engine) == 5
    assert writer.written == 5 and writer.dropped["db_error"] == 1


def test_inference_ids_are_unique_uuid7_that_start_with_the_time() -> None:
    ids = [new_inference_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    # The first 48 bits are the Unix time in milliseconds (so keys sort by time and index well).
    millis = int(ids[0].replace("-", "")[:12], 16)
    assert abs(millis / 1000 - time.time()) < 60
