"""The model a service serves: pulled by alias from the registry, verified, warmed up, hot-swapped.

:class:`ModelStore` holds one model, the version ``models:/<name>@<alias>`` names. Its watcher task
loads it at startup and then polls the alias every ``poll_interval_s``; when the alias points to
another version (a promotion, a rollback), that version is downloaded (hashes checked against the
registry), loaded (safetensors/ONNX/JSON, never a pickle) and warmed up with one dummy batch in a
background thread while the old model keeps serving; then :attr:`ModelStore.current` is replaced in
one assignment. A batch reads ``current`` once when it starts, so in-flight batches finish on the
model they started with, and the old model is freed when the last of them ends.

A load that fails (tampered or truncated artifact, a config the code refuses, a warm-up that raises)
leaves the serving model in place; the error shows in :meth:`ModelStore.status` (``/readyz``'s
``last_load_error``), in the log and in ``snap2caption_model_load_failures_total{model}``. The same
version is retried with exponential backoff (a download can fail for passing reasons), and a new
version is tried at the next poll. ``snap2caption_model_info{model,version}`` is 1 for the version
being served, and ``snap2caption_model_runtime_info{model,version,runtime,session,provider,providers}`` 1
for what runs it: per ONNX Runtime session (``model``; the captioner's ``encoder`` and ``decoder``) the
execution provider it got first and all it got (one series with empty ``session`` on torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from snap2caption.errors import NotReady
from snap2caption.registry import ModelVersionInfo

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT")

MODEL_INFO = Gauge(
    "snap2caption_model_info",
    "1 for the model version a service is serving, 0 for versions it served before.",
    ["model", "version"],
    multiprocess_mode="livemax",
)
MODEL_RUNTIME_INFO = Gauge(
    "snap2caption_model_runtime_info",
    "1 for each ONNX Runtime session of the version being served: its runtime, the execution provider it "
    "got first (`provider`) and every one it got (`providers`, best first); 0 for versions served before.",
    ["model", "version", "runtime", "session", "provider", "providers"],
    multiprocess_mode="livemax",
)
MODEL_LOAD_FAILURES = Counter(
    "snap2caption_model_load_failures",
    "Model versions that failed to download, verify, load or warm up (the old model kept serving).",
    ["model"],
)
MODEL_LOAD_SECONDS = Histogram(
    "snap2caption_model_load_seconds",
    "Time to download, verify, load and warm up one model version.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


class ModelSource(Protocol):
    """Where versions come from: :class:`snap2caption.registry.Registry` (or a test double)."""

    def resolve(self, name: str, ref: str | int) -> ModelVersionInfo: ...

    def download(self, name: str, ref: str | int, dst: str | Path) -> tuple[Path, ModelVersionInfo]: ...


@dataclass(frozen=True)
class LoadedModel(Generic[ModelT]):
    """A loaded, warmed-up model version.

    Attributes:
        model: What the loader built.
        info: The registry's description of the version.
        path: Its verified local folder.
        loaded_at: When it became ready (UTC).
        load_s: Download + load + warm-up time.
    """

    model: ModelT
    info: ModelVersionInfo
    path: Path
    loaded_at: dt.datetime
    load_s: float

    @property
    def version(self) -> int:
        return self.info.version


@dataclass
class _Failure:
    version: int
    error: str
    message: str
    at: dt.datetime
    attempts: int
    retry_at: float  # time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "error": self.error,
            "message": self.message,
            "at": self.at.isoformat(timespec="seconds"),
            "attempts": self.attempts,
        }


class ModelStore(Generic[ModelT]):
    """Serve the version an alias names; swap to a new one without downtime.

    Args:
        name: Registered model name (``captioner``); the ``model`` label of the metrics.
        alias: Alias to follow (``production``), or a version number to pin.
        loader: ``loader(folder, info) -> model``, from a verified local folder; runs on a worker thread.
        source_factory: Builds the registry client, on a worker thread at the first poll (importing and
            opening MLflow takes seconds that the event loop must not wait for).
        cache_dir: Where versions are downloaded (``<cache_dir>/<name>/v<version>``).
        warmup: ``warmup(model)`` runs one dummy batch after loading, before the model serves.
        runtime_of: ``runtime_of(model) -> (runtime, {session: providers})``, for
            ``snap2caption_model_runtime_info``; None: not exported.
        poll_interval_s: Seconds between alias checks; 0 loads once and never swaps.
        retry_max_s: Longest wait before retrying a version that failed (the wait doubles from
            ``poll_interval_s`` or 1 s).
    """

    def __init__(
        self,
        name: str,
        alias: str,
        *,
        loader: Callable[[Path, ModelVersionInfo], ModelT],
        source_factory: Callable[[], ModelSource],
        cache_dir: str | Path,
        warmup: Callable[[ModelT], None] | None = None,
        runtime_of: Callable[[ModelT], tuple[str, dict[str, list[str]]]] | None = None,
        poll_interval_s: float = 30.0,
        retry_max_s: float = 300.0,
    ) -> None:
        if poll_interval_s < 0:
            raise ValueError(f"poll_interval_s must be >= 0, got {poll_interval_s}")
        self.name = name
        self.alias = alias
        self.cache_dir = Path(cache_dir)
        self.poll_interval_s = poll_interval_s
        self.retry_max_s = retry_max_s
        self._loader = loader
        self._warmup = warmup
        self._runtime_of = runtime_of
        self._source_factory = source_factory
        self._source: ModelSource | None = None
        self._current: LoadedModel[ModelT] | None = None
        self._failure: _Failure | None = None
        self._poll_error: str | None = None
        self._last_poll: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one refresh at a time (watcher and refresh_now)
        self._failures = MODEL_LOAD_FAILURES.labels(name)
        self._load_seconds = MODEL_LOAD_SECONDS.labels(name)
        self._failures.inc(0)  # the series exists (at 0) before the first failure

    # ------------------------------------------------------------------------------- serving side

    @property
    def current(self) -> LoadedModel[ModelT] | None:
        """The model serving now, or ``None`` before the first load succeeds."""
        return self._current

    def get(self) -> LoadedModel[ModelT]:
        """The model serving now.

        Raises:
            NotReady: No version has loaded yet (503).
        """
        current = self._current
        if current is None:
            detail = f": {self._failure.message}" if self._failure else ""
            raise NotReady(f"model {self.name}@{self.alias} is not loaded yet{detail}")
        return current

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` shows: the version served and the last load / poll problems."""
        current = self._current
        return {
            "model": self.name,
            "alias": self.alias,
            "version": current.version if current else None,
            "loaded_at": current.loaded_at.isoformat(timespec="seconds") if current else None,
            "last_poll": self._last_poll.isoformat(timespec="seconds") if self._last_poll else None,
            "last_poll_error": self._poll_error,
            "last_load_error": self._failure.as_dict() if self._failure else None,
        }

    # ------------------------------------------------------------------------------------ watcher

    def start(self) -> None:
        """Start the watcher task: the first load now, then a poll every ``poll_interval_s``."""
        if self._task is not None:
            raise RuntimeError(f"model store {self.name!r} already started")
        self._task = asyncio.create_task(self._watch(), name=f"{self.name}-model-watcher")

    async def close(self) -> None:
        """Stop watching (a load in progress finishes in its thread and is dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh_now()
            except Exception:  # never let the watcher die: the next poll tries again
                logger.exception("model watcher %s: unexpected error", self.name)
            if self.poll_interval_s == 0 and self._current is not None:
                return
            await asyncio.sleep(self._next_poll_in())

    def _next_poll_in(self) -> float:
        delay = self.poll_interval_s or 1.0
        if self._failure is not None and self._current is None:
            # Nothing serves yet: retry the failed version as soon as its backoff allows.
            delay = min(delay, max(self._failure.retry_at - time.monotonic(), 0.1))
        return delay

    async def refresh_now(self) -> bool:
        """Check the alias once and swap if it names another version.

        Returns:
            True when a new version was loaded and now serves.
        """
        async with self._lock:
            try:
                if self._source is None:
                    self._source = await asyncio.to_thread(self._source_factory)
                info = await asyncio.to_thread(self._source.resolve, self.name, self.alias)
            except Exception as exc:
                self._poll_error = f"{type(exc).__name__}: {exc}"
                logger.warning("cannot resolve %s@%s: %s", self.name, self.alias, self._poll_error)
                return False
            self._poll_error = None
            self._last_poll = _now()
            current = self._current
            if current is not None and current.version == info.version:
                self._failure = None  # the alias names what serves (e.g. after a rollback)
                return False
            failure = self._failure
            if (
                failure is not None
                and failure.version == info.version
                and time.monotonic() < failure.retry_at
            ):
                return False
            return await self._load(info)

    async def _load(self, info: ModelVersionInfo) -> bool:
        version = info.version
        old = self._current
        logger.info(
            "loading %s v%s (%s@%s)%s",
            self.name, version, self.name, self.alias, f"; v{old.version} keeps serving" if old else "",
        )  # fmt: skip
        started = time.monotonic()
        try:
            loaded = await asyncio.to_thread(self._load_blocking, version)
        except Exception as exc:
            self._record_failure(version, exc)
            return False
        self._load_seconds.observe(loaded.load_s)
        self._current = loaded  # the swap: batches that start from now on use the new model
        self._failure = None
        if old is not None:
            MODEL_INFO.labels(self.name, str(old.version)).set(0)
            self._set_runtime_info(old, 0)
        MODEL_INFO.labels(self.name, str(version)).set(1)
        self._set_runtime_info(loaded, 1)
        logger.info(
            "%s v%s serving (load + warm-up %.2f s)%s",
            self.name, version, time.monotonic() - started, f", replacing v{old.version}" if old else "",
        )  # fmt: skip
        return True

    def _set_runtime_info(self, loaded: LoadedModel[ModelT], value: int) -> None:
        if self._runtime_of is None:
            return
        runtime, sessions = self._runtime_of(loaded.model)
        for session, providers in (sessions or {"": []}).items():
            primary = providers[0] if providers else ""
            labels = (self.name, str(loaded.version), runtime, session, primary, ",".join(providers))
            MODEL_RUNTIME_INFO.labels(*labels).set(value)

    def _load_blocking(self, version: int) -> LoadedModel[ModelT]:
        assert self._source is not None
        started = time.monotonic()
        # By number, not alias: the files are those of the version resolved, even if the alias moves.
        path, info = self._source.download(self.name, version, self.cache_dir)
        model = self._loader(path, info)
        if self._warmup is not None:
            self._warmup(model)
        return LoadedModel(model, info, path, _now(), time.monotonic() - started)

    def _record_failure(self, version: int, exc: Exception) -> None:
        previous = self._failure
        attempts = previous.attempts + 1 if previous is not None and previous.version == version else 1
        backoff = min((self.poll_interval_s or 1.0) * 2 ** (attempts - 1), self.retry_max_s)
        self._failure = _Failure(
            version=version,
            error=getattr(exc, "code", None) or type(exc).__name__,
            message=str(exc),
            at=_now(),
            attempts=attempts,
            retry_at=time.monotonic() + backoff,
        )
        self._failures.inc()
        serving = f"v{self._current.version} keeps serving" if self._current else "nothing serves yet"
        logger.error(
            "loading %s v%s failed (attempt %d, retry in %.1f s; %s): %s: %s",
            self.name, version, attempts, backoff, serving, type(exc).__name__, exc,
        )  # fmt: skip


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
