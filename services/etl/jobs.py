"""The job store: every ETL job and its state, in SQL (SQLite by default), so a restart loses nothing.

Life of a job: ``queued`` -> ``running`` -> ``succeeded`` | ``failed``. ``attempts`` counts the starts.
A job found ``running`` when the service starts was cut off by a crash: it goes back to ``queued``
(the ETL is idempotent) until it has used ``max_attempts`` starts, then it fails with the reason.
A job stopped by a graceful shutdown goes back to ``queued`` and that start is not counted.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String, Text, create_engine, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.etl.schemas import JobRequest
from snap2caption.db import use_sqlite_pragmas
from snap2caption.errors import BadRequest, Overloaded


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    """One ETL job. ``spec`` holds the request with every path resolved to an absolute path."""

    __tablename__ = "etl_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(64), default=None)
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int | None] = mapped_column(Integer, default=None)
    counts: Mapped[dict[str, int] | None] = mapped_column(JSON, default=None)
    quarantined: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


def utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; every time stored here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    """Thread-safe access to the jobs table; every method is one short transaction.

    Args:
        url: SQLAlchemy database URL. For SQLite the file's folder must exist.
    """

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)
        use_sqlite_pragmas(self.engine)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # Serialises the check-then-write steps (queue bound, claiming) within this process.
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def submit(self, source: str, spec: dict[str, Any], max_queued: int, retry_after_s: float) -> JobRow:
        """Add a queued job.

        Raises:
            Overloaded: When ``max_queued`` jobs are already waiting.
        """
        with self._lock, self._session.begin() as session:
            queued = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.status == "queued"))
            if (queued or 0) >= max_queued:
                raise Overloaded(
                    f"{queued} jobs are already queued; try again later", retry_after=retry_after_s
                )
            row = JobRow(id=uuid.uuid4().hex, status="queued", source=source, spec=spec, created_at=_now())
            session.add(row)
        return row

    def get(self, job_id: str) -> JobRow | None:
        """One job, or ``None``."""
        with self._session() as session:
            return session.get(JobRow, job_id)

    def recent(self, limit: int = 50, status: str | None = None) -> Sequence[JobRow]:
        """Jobs, newest first."""
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(JobRow.status == status)
        with self._session() as session:
            return session.scalars(query).all()

    def claim_next(self) -> JobRow | None:
        """Mark the oldest queued job running and return it, or ``None`` when none waits."""
        with self._lock, self._session.begin() as session:
            row = session.scalars(
                select(JobRow)
                .where(JobRow.status == "queued")
                .order_by(JobRow.created_at, JobRow.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            row.status = "running"
            row.attempts += 1
            row.started_at = _now()
            row.finished_at = None
            row.stage, row.done, row.total, row.error = None, 0, None, None
        return row

    def progress(self, job_id: str, stage: str, done: int, total: int | None) -> None:
        """Record how far a running job is."""
        with self._session.begin() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running")
                .values(stage=stage, done=done, total=total)
            )

    def succeed(self, job_id: str, counts: dict[str, int], quarantined: list[dict[str, str]]) -> JobRow:
        """Mark a job succeeded with what the ETL reported."""
        return self._finish(job_id, "succeeded", counts=counts, quarantined=quarantined, error=None)

    def fail(self, job_id: str, error: str) -> JobRow:
        """Mark a job failed, saying why."""
        return self._finish(job_id, "failed", error=error)

    def _finish(self, job_id: str, status: str, **values: Any) -> JobRow:
        with self._session.begin() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise KeyError(job_id)
            row.status = status
            row.finished_at = _now()
            for key, value in values.items():
                setattr(row, key, value)
        return row

    def requeue(self, job_id: str) -> None:
        """Put a job stopped by a graceful shutdown back in the queue; that start does not count."""
        with self._session.begin() as session:
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running")
                .values(
                    status="queued",
                    attempts=func.max(JobRow.attempts - 1, 0),
                    stage=None,
                    done=0,
                    total=None,
                    started_at=None,
                )
            )

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """After a crash: re-queue the jobs left running, or fail those out of attempts.

        Returns:
            ``(requeued_ids, failed_ids)``.
        """
        requeued: list[str] = []
        failed: list[str] = []
        with self._lock, self._session.begin() as session:
            for row in session.scalars(select(JobRow).where(JobRow.status == "running")):
                if row.attempts >= max_attempts:
                    row.status = "failed"
                    row.finished_at = _now()
                    row.error = (
                        f"gave up: the service stopped while this job was running {row.attempts} times "
                        f"(max_attempts={max_attempts}); the logs around {utc(row.started_at)} say why"
                    )
                    failed.append(row.id)
                else:
                    row.status = "queued"
                    row.stage, row.done, row.total = None, 0, None
                    requeued.append(row.id)
        return requeued, failed


def resolve_spec(request: JobRequest, data_root: Path) -> dict[str, Any]:
    """Check a job request's paths against ``data_root`` and resolve them.

    Relative paths are taken under ``data_root``; every path, after ``..`` and symlinks are resolved,
    must stay inside it.

    Args:
        request: The validated request body.
        data_root: The folder jobs may read and write.

    Returns:
        The job spec: the request with absolute, resolved paths.

    Raises:
        BadRequest: A path leaves ``data_root``, is missing, or is of the wrong kind.
    """
    root = data_root.resolve()
    images = _inside(root, request.images, "images")
    if not images.is_dir():
        raise BadRequest(f"images: {request.images!r} is not an existing folder under the data root")
    annotations = []
    for index, raw in enumerate(request.annotations):
        path = _inside(root, raw, f"annotations[{index}]")
        if not path.is_file():
            raise BadRequest(f"annotations[{index}]: {raw!r} is not an existing file under the data root")
        annotations.append(str(path))
    out = _inside(root, request.out, "out")
    if out == root:
        raise BadRequest("out: the output folder must be a folder inside the data root, not the root itself")
    if out.exists() and not out.is_dir():
        raise BadRequest(f"out: {request.out!r} exists and is not a folder")
    return {
        "images": str(images),
        "annotations": annotations,
        "out": str(out),
        "options": request.options.model_dump(exclude_none=True),
    }


def _inside(root: Path, raw: str, field: str) -> Path:
    if "\x00" in raw:
        raise BadRequest(f"{field}: the path contains a NUL byte")
    candidate = Path(raw)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops, unreadable components
        raise BadRequest(f"{field}: {raw!r} cannot be resolved ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise BadRequest(
            f"{field}: {raw!r} resolves outside the data root (after '..' and symlinks); it must stay in it"
        )
    return resolved


def relative_to_root(path: str, data_root: Path) -> str:
    """Show a stored absolute path relative to ``data_root`` (as given if the root has moved)."""
    try:
        return Path(path).relative_to(data_root.resolve()).as_posix()
    except ValueError:
        return path
