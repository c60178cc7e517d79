"""The same gateway database code on a real PostgreSQL server (a throwaway cluster on a loopback port,
from ``conftest.py``; skipped, saying why, when PostgreSQL or the ``psycopg`` driver is not installed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from services.gateway.auth import KeyStore
from services.gateway.db import feedback, inference_log, make_engine
from services.gateway.inference_log import InferenceLogWriter, InferenceRecord
from snap2caption.data.feedback_export import export_feedback

pytestmark = pytest.mark.integration


def pg_record(request_id: str, **changes: Any) -> InferenceRecord:
    record = InferenceRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id=None,
        image_sha256=None,
        image_bytes=3,
        width=1,
        height=1,
        format="png",
        features=["caption"],
        outputs={"caption": {"text": f"caption {request_id}", "confidence": 0.5}},
        model_versions={"captioner": {"version": "1"}},
        latencies_ms={"total_ms": 1.5},
        status=200,
        error_code=None,
    )
    return dataclasses.replace(record, **changes)


@pytest.fixture()
def postgres_url(new_postgres_database: Callable[[], str]) -> str:
    return new_postgres_database()


@pytest.fixture()
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def test_keys_log_feedback_and_export_on_postgres(engine: Engine, postgres_url: str, tmp_path: Path) -> None:
    make_engine(postgres_url).dispose()  # a second opener finds the schema and leaves it alone
    store = KeyStore(engine)
    key, secret = store.create("pg")
    assert store.verify(secret) == key
    assert store.revoke(key.id) and store.verify(secret) is None

    writer = InferenceLogWriter(engine, batch_size=7)
    writer.start()
    records = [pg_record(f"pg-{i}", key_id=key.id, image=b"PNG" if i == 0 else None) for i in range(20)]
    for record in records:
        writer.submit(record)
    writer.submit(pg_record("pg-3", status=400, error_code="bad_request"))  # a client resent its request id
    # The longest request id a batch item can have: a 128-character X-Request-ID, a dot, its position.
    writer.submit(pg_record("r" * 128 + ".15"))
    writer.close(timeout_s=10)
    assert writer.written == 22 and writer.dropped["db_error"] == 0
    with engine.begin() as conn:
        assert conn.execute(select(func.count()).select_from(inference_log)).scalar_one() == 22
        resent = conn.execute(select(inference_log.c.status).where(inference_log.c.request_id == "pg-3"))
        assert sorted(resent.scalars()) == [200, 400]
        row = conn.execute(select(inference_log).where(inference_log.c.id == records[0].id)).one()
        assert row.request_id == "pg-0" and row.outputs["caption"]["text"] == "caption pg-0"
        assert bytes(row.image) == b"PNG"
        conn.execute(
            feedback.insert().values(inference_id=records[1].id, created_at=datetime.now(UTC), rating=5)
        )
    report = export_feedback(engine, tmp_path / "export")
    assert report.skipped == {"image_not_retained": 1}
