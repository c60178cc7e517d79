"""MicroBatcher: shared batches, per-request results in order, overload, deadlines, errors, drain.

The batch functions here record what each model call received, so the tests see batch composition
directly; a threading.Event holds a batch "in the model" to build up a queue behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from snap2caption.errors import NotReady, Overloaded, Timeout
from snap2caption.serving import MicroBatcher


class Recorder:
    """A batch function that records each call's (key, items) and answers ``(key, item * 10)``."""

    def __init__(self, gate: threading.Event | None = None, fail_on: object = None) -> None:
        self.calls: list[tuple[Hashable, list[int]]] = []
        self.gate = gate
        self.fail_on = fail_on
        self.entered = threading.Event()

    def __call__(self, items: list[int], key: Hashable) -> list[tuple[Hashable, int]]:
        self.calls.append((key, list(items)))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.fail_on in items:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [(key, item * 10) for item in items]

    @property
    def items_seen(self) -> list[int]:
        return [item for _, items in self.calls for item in items]


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), 10))


def make(name: str, fn: Recorder, **kwargs: Any) -> MicroBatcher[int, tuple[Hashable, int]]:
    batcher: MicroBatcher[int, tuple[Hashable, int]] = MicroBatcher(name, fn, **kwargs)
    batcher.start()
    return batcher


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


def sample(metric: str, model: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, {"model": model, **labels}) or 0.0


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_outputs_in_order() -> None:
    fn = Recorder()
    requests = [[1], [2, 3, 4], [5], [6, 7], [8, 9, 10, 11]]

    async def scenario() -> list[list[tuple[Hashable, int]]]:
        batcher = make("t-shared", fn, max_batch_size=11, max_wait_ms=1000)
        results = await asyncio.gather(*(batcher.submit(items) for items in requests))
        await batcher.close()
        assert all(r.batch_sizes == [11] for r in results)
        return [r.outputs for r in results]

    outputs = run(scenario)
    # Full batch: it ran at once (not after max_wait_ms), all five requests in one model call.
    assert len(fn.calls) == 1 and sorted(fn.items_seen) == list(range(1, 12))
    assert outputs == [[(None, i * 10) for i in items] for items in requests]
    assert sample("snap2caption_batch_size_sum", "t-shared") == 11


def test_a_partial_batch_runs_after_max_wait_and_keys_never_mix() -> None:
    fn = Recorder()

    async def scenario() -> None:
        batcher = make("t-keys", fn, max_batch_size=8, max_wait_ms=30)
        started = time.monotonic()
        greedy, beams, greedy2 = await asyncio.gather(
            batcher.submit([1, 2], key="greedy"),
            batcher.submit([3], key="beam4"),
            batcher.submit([4], key="greedy"),
        )
        assert time.monotonic() - started >= 0.025  # waited for the batch to fill
        assert greedy.outputs == [("greedy", 10), ("greedy", 20)]
        assert beams.outputs == [("beam4", 30)]
        assert greedy2.outputs == [("greedy", 40)]
        await batcher.close()

    run(scenario)
    assert sorted((key, sorted(items)) for key, items in fn.calls) == [("beam4", [3]), ("greedy", [1, 2, 4])]


def test_requests_stay_whole_and_a_request_larger_than_a_batch_is_split_in_order() -> None:
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario() -> None:
        batcher = make("t-split", fn, max_batch_size=4, max_wait_ms=0)
        blocker = asyncio.create_task(batcher.submit([0]))
        await wait_until(fn.entered.is_set)  # the model is busy: the next requests queue up together
        big = asyncio.create_task(batcher.submit(list(range(100, 110))))
        await asyncio.sleep(0)
        small = [asyncio.create_task(batcher.submit([i, i + 1, i + 2])) for i in (200, 300)]
        await wait_until(lambda: batcher.depth == 16)
        gate.set()
        result = await big
        assert result.outputs == [(None, i * 10) for i in range(100, 110)]
        assert result.batch_sizes == [4, 4, 2]
        for task, start in zip(small, (200, 300), strict=True):
            assert (await task).outputs == [(None, i * 10) for i in range(start, start + 3)]
        await blocker
        await batcher.close()

    run(scenario)
    # The big request is split in order; a 3-image request never is, even when only 2 slots are left.
    assert [items for _, items in fn.calls] == [
        [0],
        [100, 101, 102, 103],
        [104, 105, 106, 107],
        [108, 109],
        [200, 201, 202],
        [300, 301, 302],
    ]


def test_a_full_queue_answers_overloaded_at_once_with_retry_after() -> None:
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario() -> None:
        batcher = make("t-full", fn, max_batch_size=2, max_wait_ms=0, max_queue=4, retry_after_s=3)
        running = asyncio.create_task(batcher.submit([1, 2]))
        await wait_until(fn.entered.is_set)
        queued = [asyncio.create_task(batcher.submit([i, i])) for i in (3, 4)]
        await wait_until(lambda: batcher.depth == 4)
        # "At once" means on its first step, without waiting on anything: stepped by hand, the
        # coroutine must raise before it ever suspends (no wall-clock bound to miss on a busy machine).
        refused = batcher.submit([5])
        with pytest.raises(Overloaded) as info:
            refused.send(None)
        assert info.value.retry_after == 3 and "queue full" in info.value.message
        gate.set()
        await asyncio.gather(running, *queued)
        assert (await batcher.submit([6])).outputs == [(None, 60)]  # room again
        await batcher.close()

    run(scenario)
    assert 5 not in fn.items_seen
    assert sample("snap2caption_batcher_rejected_total", "t-full", reason="overloaded") == 1


def test_a_deadline_gives_timeout_and_expired_items_never_reach_the_model() -> None:
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario() -> None:
        batcher = make("t-deadline", fn, max_batch_size=1, max_wait_ms=0)
        running = asyncio.create_task(batcher.submit([1]))
        await wait_until(fn.entered.is_set)
        started = time.monotonic()
        with pytest.raises(Timeout, match="deadline"):
            await batcher.submit([2], deadline=time.monotonic() + 0.05)
        # Not before its deadline, and not waiting for the batch ahead (its gate opens only below, so
        # that wait would run into `run`'s 10 s limit); 5 s is slack for busy cores, not a target.
        assert 0.04 < time.monotonic() - started < 5
        assert batcher.depth == 0  # the abandoned item left the queue at once
        # One whose deadline passes while queued (not awaited here) is dropped when the batch forms.
        late = asyncio.create_task(batcher.submit([3], deadline=time.monotonic() + 0.05))
        with pytest.raises(Timeout):
            await batcher.submit([4], deadline=time.monotonic() - 1)  # already past: refused up front
        await asyncio.sleep(0.1)
        gate.set()
        await running
        with pytest.raises(Timeout):
            await late
        assert (await batcher.submit([5])).outputs == [(None, 50)]
        await batcher.close()

    run(scenario)
    assert fn.items_seen == [1, 5]
    assert sample("snap2caption_batcher_rejected_total", "t-deadline", reason="timeout") == 3


def test_a_cancelled_caller_s_items_are_dropped() -> None:
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario() -> None:
        batcher = make("t-cancel", fn, max_batch_size=1, max_wait_ms=0)
        running = asyncio.create_task(batcher.submit([1]))
        await wait_until(fn.entered.is_set)
        gone = asyncio.create_task(batcher.submit([2]))
        await wait_until(lambda: batcher.depth == 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert batcher.depth == 0
        gate.set()
        await running
        await batcher.close()

    run(scenario)
    assert fn.items_seen == [1]


def test_a_failing_batch_fails_its_callers_only_and_the_batcher_goes_on() -> None:
    fn = Recorder(fail_on=13)

    async def scenario() -> None:
        batcher = make("t-error", fn, max_batch_size=4, max_wait_ms=20)
        bad, good = await asyncio.gather(batcher.submit([13]), batcher.submit([2]), return_exceptions=True)
        assert isinstance(bad, RuntimeError) and isinstance(good, RuntimeError)  # same model call
        assert (await batcher.submit([3])).outputs == [(None, 30)]
        await batcher.close()

    run(scenario)


def test_close_drains_queued_work_then_refuses_new_requests() -> None:
    gate = threading.Event()
    fn = Recorder(gate)

    async def scenario() -> None:
        batcher = make("t-drain", fn, max_batch_size=2, max_wait_ms=0)
        tasks = [asyncio.create_task(batcher.submit([i])) for i in range(5)]
        await wait_until(fn.entered.is_set)
        closing = asyncio.create_task(batcher.close(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(NotReady, match="shutting down"):
            await batcher.submit([99])
        gate.set()
        await closing
        assert [(await t).outputs for t in tasks] == [[(None, i * 10)] for i in range(5)]

    run(scenario)
    assert sorted(fn.items_seen) == [0, 1, 2, 3, 4]


def test_the_model_runs_off_the_event_loop() -> None:
    loop_thread: list[int] = []
    batch_thread: list[int] = []
    entered, loop_ran = threading.Event(), threading.Event()

    def fn(items: list[int], key: Hashable) -> list[int]:
        batch_thread.append(threading.get_ident())
        entered.set()
        # Blocking work that ends only once the event loop has run meanwhile: on the loop's own thread
        # it could never end (the wait would time out), whatever the timing.
        assert loop_ran.wait(5), "the event loop did not run while the model did"
        return items

    async def scenario() -> None:
        loop_thread.append(threading.get_ident())
        batcher: MicroBatcher[int, int] = MicroBatcher("t-thread", fn, max_wait_ms=0)
        batcher.start()
        submitted = asyncio.create_task(batcher.submit([1]))
        await wait_until(entered.is_set)  # this coroutine runs while the model call is in progress
        loop_ran.set()
        assert (await submitted).outputs == [1]
        await batcher.close()

    run(scenario)
    assert batch_thread and batch_thread[0] != loop_thread[0]
