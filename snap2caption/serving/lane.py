"""A served model: its store (pulled by alias, hot-swapped) and its micro-batcher, started and drained
together and reported in ``/readyz`` the same way by every model service."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from snap2caption.registry import ModelVersionInfo
from snap2caption.serving.batcher import MicroBatcher
from snap2caption.serving.model_store import ModelSource, ModelStore
from snap2caption.serving.settings import ModelServiceSettings


class Runtime(Protocol):
    """What both served models expose: the runtime they run on."""

    backend: str


ModelT = TypeVar("ModelT", bound=Runtime)
ItemT = TypeVar("ItemT")
OutT = TypeVar("OutT")


class ModelLane(Generic[ModelT, ItemT, OutT]):
    """One served model: its store (pulled by alias, hot-swapped) and its micro-batcher.

    Args:
        name: Registered model name; the ``model`` label of the store's and batcher's metrics.
        alias: Alias (or version number) to follow.
        backend: The configured runtime choice, shown by :meth:`status`.
        loader: ``loader(folder, info) -> model`` (worker thread).
        warmup: One dummy batch through a freshly loaded model.
        batch_fn: ``batch_fn(items, key) -> outputs`` (the batcher's thread).
        settings: Registry, polling and batching settings.
        source_factory: Registry client factory.
    """

    def __init__(
        self,
        name: str,
        alias: str,
        backend: str,
        *,
        loader: Callable[[Path, ModelVersionInfo], ModelT],
        warmup: Callable[[ModelT], None],
        batch_fn: Callable[[list[ItemT], Hashable], Sequence[OutT]],
        settings: ModelServiceSettings,
        source_factory: Callable[[], ModelSource],
    ) -> None:
        self.name = name
        self.backend = backend
        self.store: ModelStore[ModelT] = ModelStore(
            name,
            alias,
            loader=loader,
            warmup=warmup,
            source_factory=source_factory,
            cache_dir=settings.model_cache_dir,
            poll_interval_s=settings.poll_interval_s,
        )
        self.batcher: MicroBatcher[ItemT, OutT] = MicroBatcher(
            name,
            batch_fn,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            concurrency=settings.batch_concurrency,
        )

    def start(self) -> None:
        """Start the batcher and the model watcher (the first load runs in the background)."""
        self.batcher.start()
        self.store.start()

    async def close(self, timeout_s: float) -> None:
        """Stop watching the registry, finish queued work (up to ``timeout_s``), stop the batcher."""
        await self.store.close()
        await self.batcher.close(timeout_s)

    def status(self) -> dict[str, Any]:
        """``/readyz``'s detail for this model: version, load errors, runtime, queue."""
        current = self.store.current
        return {
            **self.store.status(),
            "backend": self.backend,
            "runtime": current.model.backend if current else None,
            "queue_depth": self.batcher.depth,
            "running_batches": self.batcher.running_batches,
        }

    def problem(self, status: dict[str, Any]) -> str | None:
        """Why this model cannot serve now (``None`` when it can), from its :meth:`status`."""
        if self.store.current is None:
            error = status["last_load_error"] or status["last_poll_error"]
            return f"{self.name} not loaded yet" + (f" ({error})" if error else "")
        if not self.batcher.alive:
            return f"the {self.name} batcher is not running"
        return None
