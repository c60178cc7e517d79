"""A served model: its store (pulled by alias, hot-swapped) and its micro-batcher, started and drained
together and reported in ``/readyz`` the same way by every model service.

A request prepares its images for the model current when it arrives (decoded and preprocessed on request
threads, for that model's input spec); by the time its batch runs, the alias may have moved to a model
that wants other inputs (another size, another preprocessing). :class:`ModelLane` runs every batch whole
on the model current at the batch's start and prepares again, from the original bytes, only the items
made for another spec: the redo-after-swap rule, here once for every served model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from snap2caption.registry import ModelVersionInfo
from snap2caption.serving.batcher import MicroBatcher
from snap2caption.serving.model_store import LoadedModel, ModelSource, ModelStore
from snap2caption.serving.settings import ModelServiceSettings


class Runtime(Protocol):
    """What every served model exposes: the runtime it runs on (``onnx``, ``torch``, ...) and, per ONNX
    Runtime session, the execution providers it got (best first; empty without ONNX Runtime)."""

    runtime: str
    providers: dict[str, list[str]]


class Prepared(Protocol):
    """An input prepared for one model: the spec it was made with (compared with the current model's)."""

    @property
    def spec(self) -> Hashable: ...


ModelT = TypeVar("ModelT", bound=Runtime)
SpecT = TypeVar("SpecT", bound=Hashable)
ItemT = TypeVar("ItemT", bound=Prepared)
OutT = TypeVar("OutT")


class ModelLane(Generic[ModelT, SpecT, ItemT, OutT]):
    """One served model: its store (pulled by alias, hot-swapped) and its micro-batcher.

    Args:
        name: Registered model name; the ``model`` label of the store's and batcher's metrics.
        alias: Alias (or version number) to follow.
        runtime_choice: The configured runtime choice, shown by :meth:`status`.
        loader: ``loader(folder, info) -> model`` (worker thread).
        warmup: One dummy batch through a freshly loaded model.
        spec: ``spec(model)``: the input spec a model wants; items made for another are prepared again.
        redo: ``redo(item, spec) -> item``: an item prepared again for ``spec`` from its original bytes.
        batch_fn: ``batch_fn(loaded, items, key) -> outputs``: one model call on ``loaded`` (the batcher's
            thread); every item was made for ``loaded``'s spec.
        settings: Registry, polling and batching settings.
        source_factory: Registry client factory.
    """

    def __init__(
        self,
        name: str,
        alias: str,
        runtime_choice: str,
        *,
        loader: Callable[[Path, ModelVersionInfo], ModelT],
        warmup: Callable[[ModelT], None],
        spec: Callable[[ModelT], SpecT],
        redo: Callable[[ItemT, SpecT], ItemT],
        batch_fn: Callable[[LoadedModel[ModelT], list[ItemT], Hashable], Sequence[OutT]],
        settings: ModelServiceSettings,
        source_factory: Callable[[], ModelSource],
    ) -> None:
        self.name = name
        self.runtime_choice = runtime_choice
        self.spec = spec
        self._redo = redo
        self._batch_fn = batch_fn
        self.store: ModelStore[ModelT] = ModelStore(
            name,
            alias,
            loader=loader,
            warmup=warmup,
            runtime_of=lambda model: (model.runtime, model.providers),
            source_factory=source_factory,
            cache_dir=settings.model_cache_dir,
            poll_interval_s=settings.poll_interval_s,
        )
        self.batcher: MicroBatcher[ItemT, OutT] = MicroBatcher(
            name,
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            concurrency=settings.batch_concurrency,
        )

    def current(self) -> tuple[LoadedModel[ModelT], SpecT]:
        """The model serving now and its input spec, to prepare a request's items with.

        Raises:
            NotReady: No model loaded yet.
        """
        loaded = self.store.get()
        return loaded, self.spec(loaded.model)

    def _run_batch(self, items: list[ItemT], key: Hashable) -> Sequence[OutT]:
        """One model call (the batcher's thread), whole on the model current at its start."""
        loaded = self.store.get()
        spec = self.spec(loaded.model)
        items = [item if item.spec == spec else self._redo(item, spec) for item in items]
        return self._batch_fn(loaded, items, key)

    def start(self) -> None:
        """Start the batcher and the model watcher (the first load runs in the background)."""
        self.batcher.start()
        self.store.start()

    async def close(self, timeout_s: float) -> None:
        """Stop watching the registry, finish queued work (up to ``timeout_s``), stop the batcher."""
        await self.store.close()
        await self.batcher.close(timeout_s)

    def status(self) -> dict[str, Any]:
        """``/readyz``'s detail for this model: version, load errors, runtime, execution providers, queue."""
        current = self.store.current
        return {
            **self.store.status(),
            "backend": self.runtime_choice,  # the wire key /readyz has always had
            "runtime": current.model.runtime if current else None,
            "providers": current.model.providers if current else None,
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
