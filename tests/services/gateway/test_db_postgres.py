"""The same gateway database code on a real PostgreSQL server (a throwaway cluster on a loopback port).

Skipped, saying why, when PostgreSQL's ``initdb``/``pg_ctl`` or the ``psycopg`` driver is not installed.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from services.gateway.auth import KeyStore
from services.gateway.db import feedback, inference_log, make_engine
from services.gateway.feedback import export_feedback
from services.gateway.inference_log import InferenceLogWriter, InferenceRecord
from tests.helpers import free_port

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


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else Debian's versioned folder (newest version first)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return shutil.which(name) or (str(found[-1]) if found else None)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    pytest.importorskip(
        "psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')"
    )
    # PostgreSQL refuses to run as root: run the server as the `postgres` user then.
    run_as: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="s2c-pg-"))  # not under pytest's root-only tmp folders
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True, "timeout": 60}
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"], **quiet)
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], **quiet
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **quiet)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    with engine.begin() as conn:
        for table in (feedback, inference_log):
            conn.execute(table.delete())
    engine.dispose()


def test_keys_log_feedback_and_export_on_postgres(engine: Engine, postgres_url: str, tmp_path: Path) -> None:
    make_engine(postgres_url).dispose()  # a second opener finds the schema and leaves it alone
    store = KeyStore(engine)
    key, secret = store.create("pg")
    assert store.verify(secret) == key
    assert store.revoke(key.id) and store.verify(secret) is None

    writer = InferenceLogWriter(engine, batch_size=7)
    writer.start()
    for i in range(20):
        writer.submit(pg_record(f"pg-{i}", key_id=key.id, image=b"PNG" if i == 0 else None))
    writer.submit(pg_record("pg-3", status=400, error_code="bad_request"))  # a client resent its request id
    writer.close(timeout_s=10)
    assert writer.written == 20 and writer.dropped["db_error"] == 1
    with engine.begin() as conn:
        assert conn.execute(select(func.count()).select_from(inference_log)).scalar_one() == 20
        row = conn.execute(select(inference_log).where(inference_log.c.request_id == "pg-0")).one()
        assert row.outputs["caption"]["text"] == "caption pg-0" and bytes(row.image) == b"PNG"
        conn.execute(feedback.insert().values(request_id="pg-1", created_at=datetime.now(UTC), rating=5))
    report = export_feedback(engine, tmp_path / "export")
    assert report.skipped == {"image_not_retained": 1}
