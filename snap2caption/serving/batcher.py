"""Dynamic micro-batching for model services: many concurrent requests, few model calls.

Requests :meth:`MicroBatcher.submit` a list of items (one per image) and await their results. One
batcher task forms batches: it waits until ``max_batch_size`` items are queued or the oldest queued
item has waited ``max_wait_ms``, then runs the batch function on a worker thread (CPU-heavy work never
runs on the event loop) and hands each request its own outputs, in order. While a batch runs, new
requests queue up, so under load the next batch forms at once from what arrived meanwhile.

Rules:

- Items batch together only when their requests share a ``key`` (e.g. the decoding options), since a
  model call takes one set of options.
- A request's items stay in one batch whenever they fit (``len(items) <= max_batch_size``), so they
  all see the same model version; only a request larger than a batch is split, in order.
- The queue is bounded in items: a request that would overflow it fails at once with 503
  ``overloaded`` and a Retry-After, instead of waiting behind work it cannot finish in time.
- Each request has a deadline: it gets 504 ``timeout`` when the deadline passes, and items whose
  request has timed out (or whose client went away) are dropped before they reach the model.
- :meth:`MicroBatcher.close` drains: no new requests, queued work is finished (up to a timeout).

Metrics (labels ``model``): ``snap2caption_queue_depth`` (items waiting), ``snap2caption_queue_seconds``
(enqueue to batch start, per request), ``snap2caption_batch_size`` (items per model call),
``snap2caption_inference_seconds`` (one model call), ``snap2caption_batcher_rejected_total``
(``reason`` = ``overloaded`` | ``timeout`` | ``error``), ``snap2caption_queue_capacity``
(``max_queue``: alerts compare the depth with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from snap2caption.errors import NotReady, Overloaded, Timeout
from snap2caption.http.metrics import LATENCY_BUCKETS

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")  # one input item (an image)
OutT = TypeVar("OutT")  # one output (its caption)

BatchFn = Callable[[list[ItemT], Hashable], Sequence[OutT]]
"""``batch_fn(items, key) -> outputs``, one output per item, in order; runs on a worker thread."""

QUEUE_DEPTH = Gauge(
    "snap2caption_queue_depth",
    "Items (images) waiting in a batcher's queue.",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "snap2caption_queue_capacity",
    "Most items a batcher's queue holds (max_queue); queue_depth / queue_capacity is its saturation.",
    ["model"],
    multiprocess_mode="livesum",  # summed like the depth, so the ratio holds across workers
)
QUEUE_SECONDS = Histogram(
    "snap2caption_queue_seconds",
    "Time a request's items waited in the queue before their batch started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "snap2caption_batch_size",
    "Items per model call.",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256),
)
INFERENCE_SECONDS = Histogram(
    "snap2caption_inference_seconds",
    "Wall time of one model call (one batch).",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REJECTED = Counter(
    "snap2caption_batcher_rejected",
    "Requests a batcher did not answer with results, by reason.",
    ["model", "reason"],
)
_REASONS = ("overloaded", "timeout", "error")


@dataclass(frozen=True)
class Batched(Generic[OutT]):
    """What :meth:`MicroBatcher.submit` returns.

    Attributes:
        outputs: One output per submitted item, in order.
        queue_s: Longest wait of the request's items between enqueue and the start of their batch.
        inference_s: Time of the model calls that ran the request's items (summed if it was split).
        batch_sizes: Size of each batch the request's items ran in (one entry unless split).
    """

    outputs: list[OutT]
    queue_s: float
    inference_s: float
    batch_sizes: list[int]


@dataclass(eq=False)
class _Request(Generic[ItemT, OutT]):
    items: list[ItemT]
    key: Hashable
    deadline: float  # time.monotonic()
    enqueued: float
    future: asyncio.Future[None]
    outputs: list[OutT | None]
    next_index: int = 0  # first item not yet handed to a batch
    done_items: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def unscheduled(self) -> int:
        return len(self.items) - self.next_index


@dataclass(frozen=True)
class _Slice(Generic[ItemT, OutT]):
    request: _Request[ItemT, OutT]
    start: int
    stop: int


class MicroBatcher(Generic[ItemT, OutT]):
    """Collects items from concurrent requests into batches for one model function.

    Args:
        name: Model name, the ``model`` label of the metrics (``captioner``, ``detector``).
        batch_fn: ``batch_fn(items, key) -> outputs``, called on a worker thread with at most
            ``max_batch_size`` items that share ``key``; one output per item, in order.
        max_batch_size: Most items per model call.
        max_wait_ms: Longest the oldest queued item waits for a batch to fill.
        max_queue: Most items waiting; a request that would pass it gets 503 ``overloaded``.
        timeout_s: Deadline of a request that gives none.
        retry_after_s: Retry-After of the 503.
        concurrency: Batches running at once (each on its own thread). 1 suits a model that
            already uses every core it should; more lets single-threaded models share cores.
        executor: Where batches run; a private thread pool of ``concurrency`` threads by default
            (shut down by :meth:`close`; a given one is left to its owner).
    """

    def __init__(
        self,
        name: str,
        batch_fn: BatchFn[ItemT, OutT],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        timeout_s: float = 10.0,
        retry_after_s: float = 1.0,
        concurrency: int = 1,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or concurrency < 1:
            raise ValueError("max_batch_size, max_queue and concurrency must be >= 1")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.concurrency = concurrency
        self._batch_fn = batch_fn
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix=f"{name}-batch"
        )
        self._queue: deque[_Request[ItemT, OutT]] = deque()
        self._depth = 0  # unscheduled items in the queue
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._depth_gauge = QUEUE_DEPTH.labels(name)
        self._queue_hist = QUEUE_SECONDS.labels(name)
        self._size_hist = BATCH_SIZE.labels(name)
        self._infer_hist = INFERENCE_SECONDS.labels(name)
        self._rejected = {reason: REJECTED.labels(name, reason) for reason in _REASONS}
        self._depth_gauge.set(0)
        QUEUE_CAPACITY.labels(name).set(max_queue)

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name!r} already started")
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._depth

    @property
    def running_batches(self) -> int:
        """Batches running now."""
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the batching task runs (and the batcher takes requests)."""
        return self._task is not None and not self._task.done() and not self._closing

    async def close(self, timeout_s: float = 10.0) -> None:
        """Drain: refuse new requests, finish queued and running batches, then stop.

        Work still queued after ``timeout_s`` fails with 503 ``overloaded``.
        """
        if self._task is None:
            return
        self._closing = True
        assert self._arrived is not None
        self._arrived.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            logger.warning("batcher %s: drain timed out with %d items queued", self.name, self._depth)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            for request in self._queue:
                self._fail(request, Overloaded("shutting down", self.retry_after_s), "overloaded")
            self._queue.clear()
            self._set_depth(0)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------------------------- submit

    async def submit(
        self, items: Sequence[ItemT], *, key: Hashable = None, deadline: float | None = None
    ) -> Batched[OutT]:
        """Queue ``items`` and wait for their outputs.

        Args:
            items: The request's items (at least one).
            key: Items batch only with items of the same key (e.g. decoding options); hashable.
            deadline: ``time.monotonic()`` by which the request must be answered; default now +
                ``timeout_s``.

        Returns:
            The outputs in the order of ``items``, with the request's queue and model times.

        Raises:
            Overloaded: The queue cannot take the items (503, with ``retry_after``).
            Timeout: The deadline passed before every output was ready (504).
            NotReady: The batcher is not started or is shutting down (503).
            Exception: Whatever the batch function raised for a batch with these items.
        """
        if not items:
            raise ValueError("submit needs at least one item")
        if not self.alive:
            raise NotReady("shutting down" if self._closing else f"batcher {self.name!r} is not running")
        now = time.monotonic()
        deadline = now + self.timeout_s if deadline is None else deadline
        if deadline <= now:
            self._rejected["timeout"].inc()
            raise Timeout("deadline exceeded before the request reached the model queue")
        if self._depth + len(items) > self.max_queue:
            self._rejected["overloaded"].inc()
            raise Overloaded(
                f"{self.name} queue full ({self._depth} of {self.max_queue} images waiting); retry later",
                self.retry_after_s,
            )
        request: _Request[ItemT, OutT] = _Request(
            items=list(items),
            key=key,
            deadline=deadline,
            enqueued=now,
            future=asyncio.get_running_loop().create_future(),
            outputs=[None] * len(items),
        )
        self._queue.append(request)
        self._set_depth(self._depth + len(items))
        assert self._arrived is not None
        self._arrived.set()
        try:
            await asyncio.wait_for(asyncio.shield(request.future), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self._abandon(request)
            self._rejected["timeout"].inc()
            raise Timeout(
                f"deadline of {1000 * (deadline - now):.0f} ms exceeded "
                f"(queued {len(items)} images behind {self._depth} others)"
            ) from None
        except asyncio.CancelledError:  # the client went away: its items must not reach the model
            self._abandon(request)
            raise
        return Batched(
            outputs=cast(list[OutT], list(request.outputs)),  # every slot is filled by now
            queue_s=request.queue_s,
            inference_s=request.inference_s,
            batch_sizes=list(request.batch_sizes),
        )

    def _abandon(self, request: _Request[ItemT, OutT]) -> None:
        """Take a request that nobody waits for any more out of the queue (if it is still there)."""
        if not request.future.done():
            request.future.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(request)
            self._set_depth(self._depth - request.unscheduled)

    def _fail(self, request: _Request[ItemT, OutT], exc: BaseException, reason: str) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
            self._rejected[reason].inc()

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._depth_gauge.set(depth)

    # -------------------------------------------------------------------------------- batching

    async def _loop(self) -> None:
        assert self._arrived is not None and self._slots is not None
        try:
            while True:
                await self._slots.acquire()  # form a batch only when it can run: it fills meanwhile
                batch = await self._next_batch()
                if batch is None:
                    self._slots.release()
                    break
                task = asyncio.create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
        except Exception:  # a bug here would hang every caller: log it and fail them instead
            logger.exception("batcher %s crashed", self.name)
            for request in self._queue:
                self._fail(request, RuntimeError(f"batcher {self.name} crashed"), "error")
            self._queue.clear()
            self._set_depth(0)
            raise

    async def _next_batch(self) -> list[_Slice[ItemT, OutT]] | None:
        """Wait for work and for the batch to fill; ``None`` once closing with nothing queued."""
        assert self._arrived is not None
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
            head = self._queue[0]
            fill_by = head.enqueued + self.max_wait_s
            while not self._closing and self._waiting_items(head.key) < self.max_batch_size:
                left = fill_by - time.monotonic()
                if left <= 0 or head not in self._queue:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            batch = self._take_batch()
            if batch:
                return batch

    def _waiting_items(self, key: Hashable) -> int:
        return sum(r.unscheduled for r in self._queue if r.key == key and not r.future.done())

    def _take_batch(self) -> list[_Slice[ItemT, OutT]]:
        """Pick the next batch: requests of the oldest live request's key, whole where they fit.

        Expired requests are failed and dropped here, so their items never reach the model.
        """
        now = time.monotonic()
        batch: list[_Slice[ItemT, OutT]] = []
        kept: deque[_Request[ItemT, OutT]] = deque()
        key: Hashable = None
        size, depth = 0, self._depth
        for request in self._queue:
            if request.future.done():  # abandoned
                depth -= request.unscheduled
                continue
            if request.deadline <= now:
                depth -= request.unscheduled
                self._fail(request, Timeout("deadline exceeded while queued"), "timeout")
                continue
            if not batch:
                key = request.key
            room = self.max_batch_size - size
            if request.key != key or room == 0:
                kept.append(request)
                continue
            n = request.unscheduled
            if n <= room:
                take = n
            elif size == 0:  # larger than a whole batch: split it, in order
                take = room
            else:  # keep a request's items together: it goes first in the next batch
                kept.append(request)
                continue
            batch.append(_Slice(request, request.next_index, request.next_index + take))
            request.next_index += take
            size += take
            depth -= take
            if request.unscheduled:
                kept.append(request)
        self._queue = kept
        self._set_depth(depth)
        return batch

    async def _run(self, batch: list[_Slice[ItemT, OutT]]) -> None:
        assert self._slots is not None
        try:
            items = [item for s in batch for item in s.request.items[s.start : s.stop]]
            key = batch[0].request.key
            started = time.monotonic()
            for s in batch:
                waited = started - s.request.enqueued
                s.request.queue_s = max(s.request.queue_s, waited)
                if s.start == 0:
                    self._queue_hist.observe(waited)
            self._size_hist.observe(len(items))
            loop = asyncio.get_running_loop()
            try:
                outputs = await loop.run_in_executor(self._executor, self._batch_fn, items, key)
                if len(outputs) != len(items):
                    raise RuntimeError(
                        f"{self.name} batch function returned {len(outputs)} outputs for {len(items)} items"
                    )
            except Exception as exc:
                logger.exception("batcher %s: batch of %d items failed", self.name, len(items))
                for s in batch:
                    self._fail(s.request, exc, "error")
                return
            elapsed = time.monotonic() - started
            self._infer_hist.observe(elapsed)
            offset = 0
            for s in batch:
                request, n = s.request, s.stop - s.start
                request.outputs[s.start : s.stop] = outputs[offset : offset + n]
                offset += n
                request.done_items += n
                request.inference_s += elapsed
                request.batch_sizes.append(len(items))
                if request.done_items == len(request.items) and not request.future.done():
                    request.future.set_result(None)
        finally:
            self._slots.release()
