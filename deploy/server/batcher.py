"""Dynamic batching: concurrent requests share one ONNX Runtime call.

Requests join a bounded queue (counted in images).  Each of ``workers`` threads forms its
own batch the moment it is free: it takes the oldest requests up to ``max_batch`` images;
if fewer are waiting it waits for more until the oldest has waited ``max_delay`` (Triton's
``max_queue_delay``), so under load, when the previous call took longer than that, a batch
forms without any waiting.  The workers run ORT off the event loop (ORT releases the GIL)
and start the next call without a round trip through it, so a busy event loop (parsing
requests, writing answers, health checks) never stands between two ORT calls; answers go
back to the loop with one callback per batch.  A request larger than ``max_batch`` is split
into chunks that run in consecutive batches and are concatenated back in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kdtool.deploy.server.protocol import RequestError
from kdtool.errors import message_line

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
        # Shared with the worker threads: only touched while holding _cond.
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._queued = 0  # images in the queue, not yet in a batch
        self._closing = False
        self._flushing = False  # stopping: no new requests come, so wait for none
        self.running_batch = 0  # images in the ORT calls now running (0: idle)
        self._busy = 0  # workers in an ORT call
        self._threads: list[threading.Thread] = []
        self._stopped: list[asyncio.Future] = []
        self._event_loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        return (
            bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._closing
        )

    @property
    def stopping(self) -> bool:
        """The server was told to stop (flush_soon) or is closing."""
        return self._flushing or self._closing

    async def start(self) -> None:
        loop = self._event_loop = asyncio.get_running_loop()
        for i in range(self.workers):
            stopped = loop.create_future()
            thread = threading.Thread(
                target=self._work, args=(stopped,), name=f"kdtool-ort_{i}", daemon=True
            )
            self._stopped.append(stopped)
            self._threads.append(thread)
            thread.start()

    async def close(self) -> None:
        """Refuse new work, finish every queued request, then stop the worker threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        # Each worker signals through the loop after its last answers were queued there,
        # so every answer has been delivered once these complete.
        await asyncio.gather(*self._stopped)
        for t in self._threads:
            t.join()

    def flush_soon(self) -> None:
        """Run what is queued without waiting for company (safe from a signal handler)."""
        # Not the lock itself: the handler may interrupt the loop thread while it holds it.
        if self._event_loop is not None and not self._event_loop.is_closed():
            self._event_loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._cond:
            self._flushing = True
            self._cond.notify_all()

    def check_size(self, n: int) -> None:
        """Refuse a request of ``n`` images that could never be served (not a 503 to retry):
        callers that prepare their inputs at a cost check before preparing them."""
        if n > self.max_queue:
            raise RequestError(
                f"a batch of {n} images is more than the server queues "
                f"({self.max_queue}, --max-queue); send smaller batches"
            )

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the batch ``x``: raises RequestError(503) when full."""
        if not self.ready:
            raise RequestError("the server is shutting down", status=503)
        n = len(x)
        self.check_size(n)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(0, n, self.max_batch)]
        with self._cond:
            queued = self._queued
            accepted = queued + n <= self.max_queue
            if accepted:
                for i, fut in enumerate(futures):
                    start = i * self.max_batch
                    self._queue.append(_Item(x[start : start + self.max_batch], fut))
                self._queued += n
                self._cond.notify()
        if not accepted:
            if self.metrics is not None:
                self.metrics.rejected.inc(n)
            raise RequestError(
                f"server overloaded: this request's {n} images would join {queued} "
                f"queued, over the limit of {self.max_queue} (--max-queue); retry later",
                503,
            )
        self._set_gauge()
        if len(futures) == 1:
            return await futures[0]
        parts = await asyncio.gather(*futures)
        return np.concatenate(parts)

    def _set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.set(self._queued)

    # --- the worker threads -------------------------------------------------------------

    def _work(self, stopped: asyncio.Future) -> None:
        loop = self._event_loop
        try:
            while (batch := self._next_batch()) is not None:
                items, size = batch
                t_start = time.perf_counter()
                try:
                    y, error = self._run(items, size), None
                except Exception as e:  # fail this batch's requests (500), serve the rest
                    log.exception("ONNX Runtime failed on a batch of %d", size)
                    y, error = None, e
                finally:
                    with self._cond:
                        self.running_batch -= size
                        self._busy -= 1
                t_end = time.perf_counter()
                self._set_gauge()  # prometheus_client values are thread-safe
                _post(loop, self._deliver, items, size, y, error, t_start, t_end)
        except BaseException:  # a bug here, not in ORT: the server turns unready (503s)
            log.exception("batch worker %s stopped", threading.current_thread().name)
            raise
        finally:
            _post(loop, _resolve, stopped)

    def _next_batch(self) -> tuple[list[_Item], int] | None:
        """Wait until max_batch images are queued or the oldest has waited max_delay."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                if self._queued >= self.max_batch or self._closing or self._flushing:
                    break
                remaining = self._queue[0].t0 + self.max_delay - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # Share the queue with the other idle workers rather than take it all and
            # leave them idle (a convoy when max_batch >= the number of clients).
            idle = self.workers - self._busy
            limit = min(self.max_batch, max(1, -(-self._queued // idle)))
            items, size = [], 0
            while self._queue and (not items or size + len(self._queue[0].x) <= limit):
                item = self._queue.popleft()
                items.append(item)
                size += len(item.x)
            self._queued -= size
            self.running_batch += size
            self._busy += 1
            if self._queue:  # the rest is another idle worker's share: wake one
                self._cond.notify()
            return items, size

    def _run(self, items: list[_Item], size: int) -> np.ndarray:
        x = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
        if self.fixed_batch and size < self.fixed_batch:  # a static graph: one size only
            pad = np.zeros((self.fixed_batch - size, *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        y = self.run_fn(x)
        if len(y) < size:
            raise InferenceFailed(f"the model returned {len(y)} rows for {size} inputs")
        return y

    # --- back on the event loop ---------------------------------------------------------

    def _deliver(self, items, size, y, error, t_start: float, t_end: float) -> None:
        if error is not None:
            if not isinstance(error, InferenceFailed):
                reason = message_line(error, 300)
                error = InferenceFailed(f"inference failed: {type(error).__name__}: {reason}")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if self.metrics is not None:
            self.metrics.observe_batch(size, t_end - t_start, [t_start - i.t0 for i in items])
        offset = 0
        for item in items:
            n = len(item.x)
            if not item.future.done():  # done: the client went away meanwhile
                item.future.set_result(y[offset : offset + n])
            offset += n


def _post(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run ``callback(*args)`` on ``loop`` from a worker thread (nothing if it has closed)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop closed without close(): no one is waiting any more
        log.debug("event loop closed; %s dropped", getattr(callback, "__name__", callback))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
