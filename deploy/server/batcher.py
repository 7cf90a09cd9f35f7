"""Dynamic batching: concurrent requests share one ONNX Runtime call.

Requests join a bounded queue (counted in images).  One batcher task takes the oldest
requests up to ``max_batch`` images; if fewer are waiting it waits for more until the
oldest has waited ``max_delay`` (Triton's ``max_queue_delay``), so under load, when the
previous call took longer than that, a batch forms without any waiting.  The ORT call
runs on a worker thread (ORT releases the GIL), so the event loop keeps parsing requests
and answering health checks meanwhile.  A request larger than ``max_batch`` is split into
chunks that run in consecutive batches and are concatenated back in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kdtool.deploy.server.protocol import RequestError

log = logging.getLogger("kdtool.serve")


class InferenceFailed(Exception):
    """ONNX Runtime raised on a batch that passed validation: a server-side problem."""


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    t0: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        fixed_batch: int | None = None,
        metrics=None,
        workers: int = 1,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.run_fn = run
        self.workers = workers  # ORT calls in flight at once (each on its own thread)
        self.max_batch = min(max_batch, fixed_batch) if fixed_batch else max_batch
        self.max_delay = max_delay_s
        self.max_queue = max_queue
        self.fixed_batch = fixed_batch
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._queued = 0  # images in the queue, not yet in a batch
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._flushing = False  # stopping: no new requests come, so wait for none
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.running_batch = 0  # images in the ORT calls now running (0: idle)
        self._slots: asyncio.Semaphore | None = None
        self._inflight: set[asyncio.Task] = set()

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="kdtool-ort")
        self._task = asyncio.create_task(self._loop(), name="kdtool-batcher")

    async def close(self) -> None:
        """Refuse new work, finish every queued request, then stop the worker thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def flush_soon(self) -> None:
        """Run what is queued without waiting for company (safe from a signal handler)."""
        if self._event_loop is not None and not self._event_loop.is_closed():
            self._event_loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flushing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the batch ``x``: raises RequestError(503) when full."""
        if not self.ready:
            raise RequestError("the server is shutting down", status=503)
        n = len(x)
        if n > self.max_queue:  # could never be served: not a 503 to retry
            raise RequestError(
                f"a batch of {n} images is more than the server queues "
                f"({self.max_queue}, --max-queue); send smaller batches"
            )
        if self._queued + n > self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.inc(n)
            raise RequestError(
                f"server overloaded: {self._queued} images are queued and the "
                f"limit is {self.max_queue} (--max-queue); retry later",
                503,
            )
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, n, self.max_batch):
            fut = loop.create_future()
            self._queue.append(_Item(x[start : start + self.max_batch], fut))
            futures.append(fut)
        self._queued += n
        self._set_gauge()
        self._wakeup.set()
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures)
        return np.concatenate(parts)

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.set(self._queued)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    await asyncio.gather(*self._inflight)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # A batch forms only once a worker is free: with one worker, requests that
            # arrive during a call wait in the queue and make the next batch.
            await self._slots.acquire()
            if not self._queue:
                self._slots.release()
                continue
            await self._gather_more()
            items, size = [], 0
            while self._queue and size + len(self._queue[0].x) <= self.max_batch:
                item = self._queue.popleft()
                items.append(item)
                size += len(item.x)
            self._queued -= size
            self._set_gauge()
            task = asyncio.create_task(self._run(loop, items, size))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _gather_more(self) -> None:
        """Wait until max_batch images are queued or the oldest has waited max_delay."""
        deadline = self._queue[0].t0 + self.max_delay
        while self._queued < self.max_batch and not (self._closing or self._flushing):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                return

    async def _run(self, loop, items: list[_Item], size: int) -> None:
        t_start = time.perf_counter()
        self.running_batch += size
        try:
            x = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
            if self.fixed_batch and size < self.fixed_batch:  # a static graph: one size only
                pad = np.zeros((self.fixed_batch - size, *x.shape[1:]), x.dtype)
                x = np.concatenate([x, pad])
            y = await loop.run_in_executor(self._executor, self.run_fn, x)
            if len(y) < size:
                raise InferenceFailed(f"the model returned {len(y)} rows for {size} inputs")
        except Exception as e:  # fail this batch's requests (500), keep serving the rest
            log.exception("ONNX Runtime failed on a batch of %d", size)
            if not isinstance(e, InferenceFailed):
                reason = str(e).splitlines()[0][:300] if str(e) else ""
                e = InferenceFailed(f"inference failed: {type(e).__name__}: {reason}")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        finally:
            self.running_batch -= size
        t_end = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_batch(size, t_end - t_start, [t_start - i.t0 for i in items])
        offset = 0
        for item in items:
            n = len(item.x)
            if not item.future.done():  # done: the client went away meanwhile
                item.future.set_result(y[offset : offset + n])
            offset += n
