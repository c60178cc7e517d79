"""Model releases with a canary track: the release records, and which track answers a request.

A release (``snap2caption release start captioner --version 7 --share 10``) gives version 7 the
registry's ``canary`` alias, which a second model service (``MODEL_ALIAS=canary``) serves beside
production, and writes a ``releases`` row that every gateway process reads (:class:`ReleaseStore`,
polled with the backends' readiness). While it runs, the gateway sends ``share`` percent of the traffic
to the canary service (:func:`bucket`: a hash of the request id, so one request, its retries with the same
``X-Request-ID`` and every item of a batch take the same track); the ``X-Snap2Caption-Track`` header
overrides the choice for testing. Every decision (start, promote, rollback) is a ``release_decisions``
row with the numbers it was made on, and the gateway exports their count as a metric.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import Engine, RowMapping, func, insert, select, update

from services.gateway.db import release_decisions, releases

logger = logging.getLogger(__name__)

Track = Literal["production", "canary"]
TRACKS: tuple[Track, ...] = get_args(Track)
TRACK_HEADER = "X-Snap2Caption-Track"
"""Request header that forces a track (``production`` or ``canary``) for testing; answered back too."""

ReleaseState = Literal["running", "promoted", "rolled_back"]
Decision = Literal["start", "promote", "rollback"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)
MODELS = ("captioner", "detector")


def bucket(request_id: str) -> float:
    """The request's place in ``[0, 100)``: its track is ``canary`` when this is below the share.

    A hash rather than a random draw, so that the choice is the same for a request, its retries and its
    batch items, and the share is exact over many ids.
    """
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100.0


@dataclass(frozen=True)
class Release:
    """One model's canary: the version, its share of the traffic (percent) and state."""

    model: str
    version: int
    share: float
    state: ReleaseState
    started_at: datetime
    ended_at: datetime | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"


class ReleaseError(Exception):
    """A release command that cannot run now (no canary running, one running already)."""


class ReleaseStore:
    """The ``releases`` and ``release_decisions`` tables of the gateway database.

    Args:
        engine: The gateway database (``services.gateway.db.make_engine``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, model: str) -> Release | None:
        """The model's release (running or the last one), or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(select(releases).where(releases.c.model == model)).mappings().first()
        return None if row is None else _release(row)

    def running(self) -> dict[str, Release]:
        """The running releases, by model."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(releases).where(releases.c.state == "running")).mappings().all()
        return {row["model"]: _release(row) for row in rows}

    def start(self, model: str, version: int, share: float, numbers: Mapping[str, Any]) -> Release:
        """Record a new canary of ``model`` (replacing its last, ended release).

        Raises:
            ReleaseError: A canary of the model is running already.
        """
        now = datetime.now(UTC)
        values = {"version": version, "share": share, "state": "running", "started_at": now, "ended_at": None}
        with self.engine.begin() as conn:
            current = conn.execute(
                select(releases.c.state, releases.c.version).where(releases.c.model == model)
            ).first()
            if current is not None and current.state == "running":
                raise ReleaseError(
                    f"{model} v{current.version} is in canary already: promote or roll it back first"
                )
            if current is None:
                conn.execute(insert(releases).values(model=model, **values))
            else:
                conn.execute(update(releases).where(releases.c.model == model).values(**values))
            self._decide(conn, model, version, "start", False, f"canary at {share:g}%", numbers, now)
        return Release(model, version, share, "running", now)

    def end(
        self, model: str, decision: Decision, *, automatic: bool, reason: str, numbers: Mapping[str, Any]
    ) -> Release:
        """End the running canary of ``model`` by ``decision`` (``promote`` or ``rollback``) and record why.

        Raises:
            ReleaseError: No canary of the model is running.
        """
        now = datetime.now(UTC)
        state: ReleaseState = "promoted" if decision == "promote" else "rolled_back"
        with self.engine.begin() as conn:
            done = conn.execute(
                update(releases)
                .where(releases.c.model == model, releases.c.state == "running")
                .values(state=state, ended_at=now)
                .returning(releases.c.version)
            ).first()
            if done is None:
                raise ReleaseError(f"no canary of {model} is running")
            self._decide(conn, model, done.version, decision, automatic, reason, numbers, now)
        release = self.get(model)
        assert release is not None
        return release

    def record(
        self, model: str, version: int, decision: Decision, *, reason: str, numbers: Mapping[str, Any]
    ) -> None:
        """Record a decision outside a canary (a rollback of production itself)."""
        with self.engine.begin() as conn:
            self._decide(conn, model, version, decision, False, reason, numbers, datetime.now(UTC))

    def decisions(self, model: str | None = None) -> list[dict[str, Any]]:
        """The decisions taken, oldest first (of one model, or all)."""
        query = select(release_decisions).order_by(release_decisions.c.id)
        if model is not None:
            query = query.where(release_decisions.c.model == model)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def decision_counts(self) -> dict[tuple[str, str], int]:
        """How many decisions of each kind each model had: ``{(model, decision): n}``."""
        query = select(release_decisions.c.model, release_decisions.c.decision, func.count()).group_by(
            release_decisions.c.model, release_decisions.c.decision
        )
        with self.engine.connect() as conn:
            return {(model, decision): n for model, decision, n in conn.execute(query)}

    @staticmethod
    def _decide(
        conn: Any,
        model: str,
        version: int,
        decision: Decision,
        automatic: bool,
        reason: str,
        numbers: Mapping[str, Any],
        now: datetime,
    ) -> None:
        conn.execute(
            insert(release_decisions).values(
                model=model, version=version, decision=decision, automatic=automatic,
                reason=reason, numbers=dict(numbers), created_at=now,
            )
        )  # fmt: skip
        logger.warning(
            "release %s: %s v%s (%s): %s; numbers: %s",
            decision, model, version, "automatic" if automatic else "by hand", reason, dict(numbers),
        )  # fmt: skip


def _release(row: RowMapping) -> Release:
    return Release(
        model=row["model"],
        version=int(row["version"]),
        share=float(row["share"]),
        state=row["state"],
        started_at=_utc(row["started_at"]),
        ended_at=None if row["ended_at"] is None else _utc(row["ended_at"]),
    )


def _utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were written as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
