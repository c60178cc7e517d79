"""The gateway database's migrations, on SQLite and on a real PostgreSQL server.

A database written by the schema before migrations (made by ``create_all`` as that code did, or by
the baseline revision) is upgraded with every record kept; the metadata and the revisions agree;
several processes opening one database at once migrate it once; newer or foreign schemas are refused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError

from services.gateway import migrations
from services.gateway.db import api_keys, feedback, inference_log, make_engine, metadata
from services.gateway.inference_log import new_inference_id
from snap2caption.cli import main
from snap2caption.data.feedback_export import export_feedback
from tests.helpers import wait_for

# ------------------------------------------------------------------------------ the schema before 0002

# The tables as ``services/gateway/db.py`` declared them before migrations existed; ``create_all`` of
# this metadata is exactly what a database written by that code holds (unnamed constraints on SQLite).
LEGACY = MetaData()
Table(
    "api_keys",
    LEGACY,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(64), nullable=False),
    Column("hash", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)
Table(
    "inference_log",
    LEGACY,
    Column("request_id", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("key_id", String(32), nullable=True, index=True),
    Column("image_sha256", String(64), nullable=True, index=True),
    Column("image_bytes", Integer, nullable=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("format", String(16), nullable=True),
    Column("features", JSON, nullable=False),
    Column("outputs", JSON, nullable=False),
    Column("model_versions", JSON, nullable=False),
    Column("latencies", JSON, nullable=False),
    Column("status", Integer, nullable=False),
    Column("error_code", String(64), nullable=True),
    Column("image", LargeBinary, nullable=True),
)
Table(
    "feedback",
    LEGACY,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), ForeignKey("inference_log.request_id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("caption", Text, nullable=True),
    Column("rating", Integer, nullable=True),
    Column("reason", Text, nullable=True),
    Column("key_id", String(32), nullable=True),
    CheckConstraint("rating IS NULL OR (rating BETWEEN 1 AND 5)", name="feedback_rating_range"),
    CheckConstraint("caption IS NOT NULL OR rating IS NOT NULL", name="feedback_caption_or_rating"),
    Index("ix_feedback_request_id", "request_id"),
)

PNG = b"\x89PNG\r\n\x1a\n legacy bytes"
LONG_ID = "x" * 128  # the longest X-Request-ID a client may send


def legacy_log_row(request_id: str, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": request_id,
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "key_id": "abcdefabcdef",
        "image_sha256": "a" * 64,
        "image_bytes": 123,
        "width": 40,
        "height": 30,
        "format": "png",
        "features": ["caption", "tags"],
        "outputs": {"caption": {"text": f"caption of {request_id}", "confidence": 0.5}},
        "model_versions": {"caption": {"name": "captioner", "version": 3}},
        "latencies": {"total_ms": 12.5},
        "status": 200,
        "error_code": None,
        "image": None,
    }
    return {**row, **changes}


LEGACY_LOG = [
    legacy_log_row("req-1", image=PNG),
    legacy_log_row("req-2", status=415, error_code="unsupported_format", image_sha256=None, outputs={}),
    legacy_log_row("batch-9.0", key_id=None),
    legacy_log_row("batch-9.1", key_id=None),
    legacy_log_row(LONG_ID),
]
LEGACY_FEEDBACK = [
    {"id": 1, "request_id": "req-1", "caption": "a red square", "rating": None, "reason": "colour"},
    {"id": 2, "request_id": "req-1", "caption": None, "rating": 2, "reason": None},
    {"id": 3, "request_id": "batch-9.1", "caption": None, "rating": 5, "reason": None},
]
LEGACY_KEY = {
    "id": "abcdefabcdef",
    "name": "legacy",
    "prefix": "s2c_abcdefabcdef_AbCd",
    "hash": "sha256$" + "0" * 64,
    "created_at": datetime(2026, 1, 1, tzinfo=UTC),
    "revoked_at": None,
}


def write_legacy_rows(engine: Engine) -> None:
    created = datetime(2026, 1, 3, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(LEGACY.tables["api_keys"].insert(), [LEGACY_KEY])
        conn.execute(LEGACY.tables["inference_log"].insert(), LEGACY_LOG)
        conn.execute(
            LEGACY.tables["feedback"].insert(), [{**f, "created_at": created} for f in LEGACY_FEEDBACK]
        )


def make_legacy_database(url: str, how: str) -> None:
    """A database as the code before 0002 left it, with records: by ``create_all`` or by revision 0001."""
    engine = make_engine(url, migrate=False)
    try:
        if how == "create_all":
            LEGACY.create_all(engine)
        else:
            migrations.upgrade(engine, migrations.BASELINE)
        write_legacy_rows(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    new_database: Callable[[], str] = request.getfixturevalue("new_postgres_database")
    return new_database()


def revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return migrations.current_revision(conn)


def schema_differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": migrations.VERSION_TABLE}
        )
        return list(compare_metadata(context, metadata))


def comparable(row: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A row as a dict, with datetimes in UTC (SQLite hands them back naive) and bytes as bytes."""
    out: dict[str, Any] = {}
    for key, value in row._mapping.items():
        if key in drop:
            continue
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        elif isinstance(value, memoryview):
            value = bytes(value)
        out[key] = value
    return out


def assert_every_legacy_record_is_kept(engine: Engine) -> None:
    with engine.connect() as conn:
        logged = {r.id: r for r in conn.execute(select(inference_log))}
        feedback_rows = conn.execute(select(feedback).order_by(feedback.c.id)).all()
        keys = conn.execute(select(api_keys)).all()
    assert set(logged) == {r["request_id"] for r in LEGACY_LOG}
    for old in LEGACY_LOG:
        new = logged[old["request_id"]]
        # The old request id is both the new id and the correlation id; everything else is unchanged,
        # and production answered every request logged before the canary track existed (0004).
        assert new.request_id == old["request_id"]
        assert new.track == "production"
        assert comparable(new, drop=("id", "track")) == old
    assert [comparable(r, drop=("created_at",)) for r in feedback_rows] == [
        {
            "id": f["id"],
            "inference_id": f["request_id"],
            "caption": f["caption"],
            "rating": f["rating"],
            "reason": f["reason"],
            "key_id": None,
        }
        for f in LEGACY_FEEDBACK
    ]
    assert [comparable(k) for k in keys] == [LEGACY_KEY]


def assert_new_constraints_hold(engine: Engine) -> None:
    """Request ids repeat freely now; ids stay unique; feedback must name a logged analysis."""
    with engine.begin() as conn:
        again = [legacy_log_row("req-1", id=new_inference_id()) for _ in range(2)]
        conn.execute(inference_log.insert(), again)
        count = conn.execute(select(inference_log.c.id).where(inference_log.c.request_id == "req-1")).all()
        assert len(count) == 3
    now = datetime.now(UTC)
    refused: list[Callable[[Any], Any]] = [
        lambda conn: conn.execute(inference_log.insert(), [legacy_log_row("other", id="req-1")]),
        lambda conn: conn.execute(feedback.insert().values(inference_id="nope", created_at=now, rating=3)),
        lambda conn: conn.execute(feedback.insert().values(inference_id="req-1", created_at=now, rating=9)),
    ]
    for statement in refused:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            statement(conn)


# ------------------------------------------------------------------------------------------ tests


def test_metadata_and_migrations_agree(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert revision_of(engine) == migrations.head_revision()
        differences = schema_differences(engine)
        assert differences == [], (
            "services/gateway/db.py and the revisions in services/gateway/migrations/versions disagree: "
            f"add a revision (or fix one) so that these go away: {differences}"
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize("how", ["create_all", "baseline"])
def test_a_database_of_the_previous_schema_is_upgraded_with_every_record(
    database_url: str, how: str, tmp_path: Path
) -> None:
    make_legacy_database(database_url, how)
    engine = make_engine(database_url)
    try:
        assert revision_of(engine) == migrations.head_revision()
        assert_every_legacy_record_is_kept(engine)
        assert schema_differences(engine) == []
        assert_new_constraints_hold(engine)
        # The migrated log still feeds the export: req-1's retained image with its corrected caption.
        report = export_feedback(engine, tmp_path / "export")
        assert (report.images, report.corrected) == (1, 1)
    finally:
        engine.dispose()


def test_downgrade_then_upgrade_keeps_every_record(database_url: str) -> None:
    make_legacy_database(database_url, "create_all")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:  # two analyses sharing a request id, which the old schema cannot hold
            conn.execute(
                inference_log.insert(), [legacy_log_row("dup", id=new_inference_id()) for _ in range(2)]
            )
        migrations.downgrade(engine, migrations.BASELINE)
        assert revision_of(engine) == migrations.BASELINE
        with engine.connect() as conn:
            old_ids = set(conn.execute(text("SELECT request_id FROM inference_log")).scalars())
            old_feedback = conn.execute(text("SELECT request_id FROM feedback ORDER BY id")).scalars().all()
        assert len(old_ids) == len(LEGACY_LOG) + 2 and {r["request_id"] for r in LEGACY_LOG} <= old_ids
        assert old_feedback == [f["request_id"] for f in LEGACY_FEEDBACK]
        migrations.upgrade(engine)
        assert revision_of(engine) == migrations.head_revision()
        assert_every_legacy_record_is_kept_after_round_trip(engine)
    finally:
        engine.dispose()


def assert_every_legacy_record_is_kept_after_round_trip(engine: Engine) -> None:
    with engine.connect() as conn:
        ids = set(conn.execute(select(inference_log.c.id)).scalars())
        refs = conn.execute(select(feedback.c.inference_id).order_by(feedback.c.id)).scalars().all()
    assert len(ids) == len(LEGACY_LOG) + 2
    assert refs == [f["request_id"] for f in LEGACY_FEEDBACK]


def test_processes_opening_one_database_at_once_migrate_it_once(database_url: str, tmp_path: Path) -> None:
    make_legacy_database(database_url, "create_all")
    go = tmp_path / "go"
    # Each process imports, says it is ready, then waits for one signal: the upgrades start together.
    script = textwrap.dedent(
        f"""
        import logging, pathlib, sys, time
        from services.gateway.db import make_engine
        from services.gateway.migrations import current_revision
        logging.basicConfig(level=logging.INFO)
        pathlib.Path({str(tmp_path)!r}, "ready-" + sys.argv[1]).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.005)
        engine = make_engine({database_url!r})
        with engine.connect() as conn:
            print(current_revision(conn))
        """
    )
    repo = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(n)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    wait_for(
        lambda: len(list(tmp_path.glob("ready-*"))) == 4 or None, timeout_s=120, what="4 processes ready"
    )
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == migrations.head_revision()
    # One process migrated; the others waited for its lock, then found the schema at head.
    assert sum("upgrading schema" in err for _, err in results) == 1, [err for _, err in results]
    engine = make_engine(database_url)
    try:
        assert_every_legacy_record_is_kept(engine)
        with engine.connect() as conn:
            versions = (
                conn.execute(text(f"SELECT version_num FROM {migrations.VERSION_TABLE}")).scalars().all()
            )
        assert versions == [migrations.head_revision()]
    finally:
        engine.dispose()


def test_a_schema_from_newer_code_is_refused(database_url: str) -> None:
    make_engine(database_url).dispose()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(migrations.SchemaError, match="'9999', which this version of snap2caption does not"):
        make_engine(database_url)


def test_tables_of_unknown_origin_are_refused(database_url: str) -> None:
    engine = make_engine(database_url, migrate=False)
    try:
        LEGACY.tables["inference_log"].create(engine)
        with pytest.raises(migrations.SchemaError, match="has tables \\['inference_log'\\] but not"):
            migrations.upgrade(engine)
        assert revision_of(engine) is None
    finally:
        engine.dispose()


def test_a_failed_sqlite_migration_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    make_legacy_database(url, "create_all")
    raw = create_engine(url)  # no foreign key enforcement: write a row the migration will find broken
    with raw.begin() as conn:
        conn.execute(
            LEGACY.tables["feedback"]
            .insert()
            .values(request_id="gone", created_at=datetime.now(UTC), rating=1)
        )
    raw.dispose()
    with pytest.raises(migrations.SchemaError, match="broken foreign keys"):
        make_engine(url)
    engine = make_engine(url, migrate=False)
    try:
        tables = set(inspect(engine).get_table_names())
        assert migrations.VERSION_TABLE not in tables  # nothing was committed, not even the stamp
        columns = {c["name"] for c in inspect(engine).get_columns("inference_log")}
        assert "id" not in columns and "request_id" in columns
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM inference_log")).scalar_one() == len(LEGACY_LOG)
            assert (
                conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            )  # the connection's pragma is back
    finally:
        engine.dispose()


def test_db_cli_shows_and_moves_the_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    make_legacy_database(url, "baseline")
    runner = CliRunner()
    head = migrations.head_revision()
    current = runner.invoke(main, ["db", "current", "--database", url])
    assert current.exit_code == 0, current.output
    assert f"revision {migrations.BASELINE}; the newest is {head}" in current.output
    upgraded = runner.invoke(main, ["db", "upgrade", "--database", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"{migrations.BASELINE} -> {head}" in upgraded.output
    again = runner.invoke(main, ["db", "current", "--database", url])
    assert f"revision {head} (the newest)" in again.output
    down = runner.invoke(main, ["db", "downgrade", migrations.BASELINE, "--database", url])
    assert down.exit_code == 0, down.output
    assert f"{head} -> {migrations.BASELINE}" in down.output
    engine = make_engine(url)  # any opener upgrades it again
    try:
        assert revision_of(engine) == head
        assert_every_legacy_record_is_kept(engine)
    finally:
        engine.dispose()
