"""The inference log: every ``/v1/analyze`` answer, written off the request path in batches.

Each record's key is made here (:func:`new_inference_id`), never taken from the client: a client that
resends its ``X-Request-ID`` gets two records with that correlation id, and each answer its own
``inference_id``. The request handler calls :meth:`InferenceLogWriter.submit`, which never blocks and
never raises: when
the queue is full, or the writer is closed or dead, the record is dropped and counted. A background
thread drains the queue into the database in batches; a batch the database refuses is dropped (counted,
logged) and the thread carries on with the next one. A log that can drop but never fail a request.

Metrics: ``snap2caption_inference_log_written_total``, ``snap2caption_inference_log_dropped_total{reason}``
(``queue_full``, ``db_error``, ``closed``) and the gauge ``snap2caption_inference_log_queue_depth``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from services.gateway.db import inference_log

logger = logging.getLogger(__name__)

WRITTEN = Counter("snap2caption_inference_log_written", "Inference log records written to the database.")
DROPPED = Counter(
    "snap2caption_inference_log_dropped",
    "Inference log records dropped: queue_full (writer behind), db_error (database refused), closed.",
    ["reason"],
)
QUEUE_DEPTH = Gauge(
    "snap2caption_inference_log_queue_depth",
    "Inference log records waiting to be written.",
    multiprocess_mode="livesum",
)
for _reason in ("queue_full", "db_error", "closed"):
    DROPPED.labels(_reason)  # export zeros, so alerts on rate() see the series from the start


def new_inference_id() -> str:
    """A new inference log key: a UUIDv7 (RFC 9562), ``0190f5c2-8a4b-7c3d-9e8f-0123456789ab``.

    Its first 48 bits are the Unix time in milliseconds, so new keys sort after old ones and inserts
    land at the end of the primary key's index; its 74 random bits make a collision, or a guess,
    practically impossible.
    """
    millis = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
    value = (millis << 80) | int.from_bytes(secrets.token_bytes(10))
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # the RFC 9562 variant
    return str(uuid.UUID(int=value))


@dataclass
class InferenceRecord:
    """One logged inference (``/v1/analyze`` answer, success or failure).

    Attributes:
        request_id: The request's ``X-Request-ID`` (``<id>.<n>`` for a batch item): a correlation id,
            not unique.
        created_at: When the request was answered (timezone-aware UTC).
        key_id: API key id, or ``None`` when keys are off.
        image_sha256: SHA-256 of the original bytes, or ``None`` when the request failed before.
        image_bytes: Size of the original bytes, or ``None``.
        width: Width after EXIF orientation, or ``None``.
        height: Height after EXIF orientation, or ``None``.
        format: Sniffed format (``jpeg``, ``png``, ...), or ``None``.
        features: Features asked for, e.g. ``["caption", "tags"]``.
        outputs: What was answered (caption, alt text, tags, objects, errors).
        model_versions: ``{"captioner": {...}, "detector": {...}}``.
        latencies_ms: Timings in milliseconds, e.g. ``{"total_ms": 80.1}``.
        status: HTTP status answered.
        error_code: The error envelope's code, or ``None`` on success.
        image: The original bytes when the gateway retains images (for feedback datasets), else ``None``.
        id: The record's key, made by the gateway and answered as ``inference_id``; feedback refers
            to it.
        track: ``production``, or ``canary`` when a model's canary answered part of it.
    """

    request_id: str
    created_at: datetime
    key_id: str | None
    image_sha256: str | None
    image_bytes: int | None
    width: int | None
    height: int | None
    format: str | None
    features: list[str]
    outputs: dict[str, Any]
    model_versions: dict[str, Any]
    latencies_ms: dict[str, Any]
    status: int
    error_code: str | None
    image: bytes | None = field(default=None, repr=False)
    id: str = field(default_factory=new_inference_id)
    track: str = "production"

    def row(self) -> dict[str, Any]:
        """The ``inference_log`` table row."""
        return {
            "id": self.id,
            "request_id": self.request_id,
            "created_at": self.created_at,
            "key_id": self.key_id,
            "image_sha256": self.image_sha256,
            "image_bytes": self.image_bytes,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "features": list(self.features),
            "outputs": self.outputs,
            "model_versions": self.model_versions,
            "latencies": self.latencies_ms,
            "status": self.status,
            "error_code": self.error_code,
            "image": self.image,
            "track": self.track,
        }


class InferenceLogWriter:
    """Write :class:`InferenceRecord` s to the database from a background thread, in batches.

    Args:
        engine: From :func:`services.gateway.db.make_engine`.
        max_queue: Records waiting at most; more are dropped (``queue_full``).
        batch_size: Most records per database transaction.
    """

    def __init__(self, engine: Engine, max_queue: int = 1000, batch_size: int = 100) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be >= 1")
        self.engine = engine
        self.batch_size = batch_size
        self._queue: queue.Queue[InferenceRecord] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "db_error": 0, "closed": 0}
        self._count_lock = threading.Lock()

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
            self._thread.start()

    def submit(self, record: InferenceRecord) -> bool:
        """Queue a record for writing, without blocking.

        Returns:
            ``True`` when queued; ``False`` when dropped (queue full, writer closed or dead).
        """
        try:
            if self._closed or (self._thread is not None and not self._thread.is_alive()):
                self._drop("closed")
                return False
            self._queue.put_nowait(record)
            QUEUE_DEPTH.inc()
            return True
        except queue.Full:
            self._drop("queue_full")
            return False
        except Exception:  # the caller is answering a request: never let the log fail it
            logger.exception("inference log: submit failed")
            self._drop("closed")
            return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records, write what is queued (for up to ``timeout_s``), stop the thread.

        Records still queued after ``timeout_s`` are dropped (``closed``).
        """
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("inference log: writer still busy after %.1f s; leaving it", timeout_s)
                return
        # Not started, or finished: whatever is left will never be written.
        left = self._drain(self._queue.qsize())
        if left:
            self._drop("closed", len(left))
            logger.warning("inference log: %d records dropped at close", len(left))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    # --- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            QUEUE_DEPTH.dec()
            batch = [first, *self._drain(self.batch_size - 1)]
            try:
                self._write(batch)
            except Exception:  # the thread must outlive any one bad batch
                logger.exception("inference log: unexpected error; %d records dropped", len(batch))
                self._drop("db_error", len(batch))

    def _drain(self, n: int) -> list[InferenceRecord]:
        batch: list[InferenceRecord] = []
        while len(batch) < n:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
            QUEUE_DEPTH.dec()
        return batch

    def _write(self, batch: list[InferenceRecord]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(inference_log.insert(), [r.row() for r in batch])
            self._wrote(len(batch))
        except IntegrityError:
            # A record the database refuses (keys are the gateway's own, so not a repeated one): write
            # the batch one by one so only the offending records are lost.
            for record in batch:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(inference_log.insert(), [record.row()])
                    self._wrote(1)
                except Exception as exc:
                    logger.warning("inference log: record %s dropped: %s", record.id, exc)
                    self._drop("db_error")
        except Exception as exc:
            logger.warning("inference log: batch of %d dropped: %s", len(batch), exc)
            self._drop("db_error", len(batch))

    def _wrote(self, n: int) -> None:
        WRITTEN.inc(n)
        with self._count_lock:
            self.written += n

    def _drop(self, reason: str, n: int = 1) -> None:
        DROPPED.labels(reason).inc(n)
        with self._count_lock:
            self.dropped[reason] += n
