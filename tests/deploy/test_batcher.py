"""DynamicBatcher on its own: batches form in worker threads, off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kdtool.deploy.server.batcher import DynamicBatcher, InferenceFailed
from kdtool.deploy.server.protocol import RequestError


class Recorder:
    """A model that doubles its input, takes ``seconds`` per call and logs each call."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.calls: list[tuple[float, float, int, str]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.calls.append((start, time.perf_counter(), len(x), threading.current_thread().name))
        return 2 * x


def _images(n: int, first: int = 0) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.float32).reshape(n, 1)


def test_next_call_starts_while_the_event_loop_is_blocked():
    model = Recorder(0.1)
    batcher = DynamicBatcher(model, max_batch=1, max_delay_s=0, max_queue=8)

    async def main():
        await batcher.start()
        tasks = [asyncio.create_task(batcher.infer(_images(1, i))) for i in range(2)]
        await asyncio.sleep(0)  # both requests are queued
        time.sleep(0.45)  # the loop is busy (parsing, say) through both calls
        unblocked = time.perf_counter()
        out = await asyncio.gather(*tasks)
        await batcher.close()
        return out, unblocked

    out, unblocked = asyncio.run(main())
    assert [o.tolist() for o in out] == [[[0.0]], [[2.0]]]
    (_, e1, *_), (s2, e2, *_) = model.calls
    # The second call began right after the first, not when the loop was free again.
    assert s2 - e1 < 0.05 and e2 < unblocked, (s2 - e1, unblocked - e2)


def test_requests_share_a_batch_and_large_ones_are_split_in_order():
    model = Recorder(0.05)
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=0.02, max_queue=64)

    async def main():
        await batcher.start()
        small = [batcher.infer(_images(1, 100 + i)) for i in range(3)]
        big = batcher.infer(_images(10))
        out = await asyncio.gather(*small, big)
        await batcher.close()
        return out

    *small, big = asyncio.run(main())
    for i, y in enumerate(small):
        assert y.tolist() == [[2.0 * (100 + i)]]
    np.testing.assert_array_equal(big, 2 * _images(10))
    sizes = [n for _, _, n, _ in model.calls]
    assert sizes == [3, 4, 4, 2]  # the small ones joined; the big one's 4 did not fit


def test_close_finishes_queued_work_and_refuses_new():
    model = Recorder(0.05)
    batcher = DynamicBatcher(model, max_batch=2, max_delay_s=10.0, max_queue=8)

    async def main():
        await batcher.start()
        assert batcher.ready
        pending = asyncio.create_task(batcher.infer(_images(1, 7)))  # would wait 10 s
        await asyncio.sleep(0.05)
        t = time.perf_counter()
        await batcher.close()  # runs it now instead of waiting for company
        closed_in = time.perf_counter() - t
        with pytest.raises(RequestError, match="shutting down"):
            await batcher.infer(_images(1))
        return await pending, closed_in

    y, closed_in = asyncio.run(main())
    assert y.tolist() == [[14.0]] and closed_in < 2
    assert not batcher.ready
    assert not any(t.is_alive() for t in batcher._threads)


def test_a_failing_call_fails_its_batch_only():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom\nsecond line")
        return x

    batcher = DynamicBatcher(flaky, max_batch=1, max_delay_s=0, max_queue=8)

    async def main():
        await batcher.start()
        first = await asyncio.gather(batcher.infer(_images(1)), return_exceptions=True)
        second = await batcher.infer(_images(1, 5))
        await batcher.close()
        return first[0], second

    err, ok = asyncio.run(main())
    assert isinstance(err, InferenceFailed) and str(err) == "inference failed: RuntimeError: boom"
    assert ok.tolist() == [[5.0]]


def test_full_queue_is_503_and_oversized_request_is_400():
    gate = threading.Event()

    def held(x):
        gate.wait(5)
        return x

    batcher = DynamicBatcher(held, max_batch=1, max_delay_s=0, max_queue=2)

    async def main():
        await batcher.start()
        running = asyncio.create_task(batcher.infer(_images(1)))
        while not batcher.running_batch:
            await asyncio.sleep(0.005)
        queued = [asyncio.create_task(batcher.infer(_images(1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as full:
            await batcher.infer(_images(1))
        with pytest.raises(RequestError) as big:
            await batcher.infer(_images(3))
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()
        return full.value, big.value

    full, big = asyncio.run(main())
    assert full.status == 503 and "overloaded" in str(full)
    assert "this request's 1 images would join 2 queued, over the limit of 2" in str(full)
    assert big.status == 400 and "more than the server queues" in str(big)


def test_idle_workers_share_the_queue():
    model = Recorder(0.1)
    batcher = DynamicBatcher(model, max_batch=8, max_delay_s=0.05, max_queue=64, workers=2)

    async def main():
        await batcher.start()
        await asyncio.gather(*(batcher.infer(_images(1, i)) for i in range(8)))
        await batcher.close()

    asyncio.run(main())
    # Not one batch of 8 and an idle worker: 4 each, at the same time.
    assert sorted(n for *_, n, _ in model.calls) == [4, 4]
    (_, e1, _, t1), (s2, _, _, t2) = sorted(model.calls)
    assert t1 != t2 and s2 < e1  # overlapping, on two threads


def test_a_split_request_wakes_every_idle_worker():
    # One request queues four chunks with one notify: the worker that takes the first
    # chunk must wake the other for the rest.
    model = Recorder(0.1)
    batcher = DynamicBatcher(model, max_batch=4, max_delay_s=0, max_queue=64, workers=2)

    async def main():
        await batcher.start()
        await asyncio.sleep(0.05)  # both workers asleep on an empty queue
        y = await batcher.infer(_images(16))
        await batcher.close()
        return y

    np.testing.assert_array_equal(asyncio.run(main()), 2 * _images(16))
    assert [n for *_, n, _ in model.calls] == [4, 4, 4, 4]
    assert len({name for *_, name in model.calls}) == 2
