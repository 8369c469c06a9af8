"""Micro-batching: merge concurrent requests into one model call.

Why: a transformer's cost per text falls steeply with batch size on a CPU (one matrix multiply
over 32 rows instead of 32 over one), so under load the service answers more texts per second
by running them together. Requests wait in an asyncio queue; one worker takes the oldest, keeps
collecting until the batch holds ``max_batch_texts`` texts or the oldest request has waited
``max_wait_ms``, runs the model in a worker thread (torch releases the GIL, so the event loop
keeps accepting requests meanwhile) and resolves each request's future with its own slice.

While a batch runs, new requests pile up; they form the next batch at once (the oldest has
already waited longer than ``max_wait_ms``), so under load the batch size follows the
backlog with no added delay, and a lone request waits at most ``max_wait_ms``.

A request is never split: its texts go to the model in one call and so are all answered by
the same model version, even across a hot swap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

M = TypeVar("M")  # what the batch function says about the whole batch (e.g. the model version)
R = TypeVar("R")  # one result per text

BatchFunction = Callable[[list[str]], tuple[M, Sequence[R]]]


class QueueFullError(RuntimeError):
    """The backlog is at its limit: the caller should answer 503 and ask the client to retry."""


class BatcherClosedError(RuntimeError):
    """The batcher is stopping (server shutdown) and takes no new work."""


@dataclass
class _Pending(Generic[M, R]):
    texts: list[str]
    future: asyncio.Future[tuple[M, list[R]]]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[M, R]):
    """Collects :meth:`submit` calls into batches for ``run_batch`` (one call at a time).

    ``run_batch(texts)`` returns ``(meta, results)`` with one result per text, in order; it runs
    in ``executor`` (give every batcher of an app the same single-thread executor: two model
    calls at once on a 2-core CPU only slow each other down). If it raises, every request of
    that batch gets the exception and the batcher carries on with the next batch.
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        executor: Executor,
        *,
        max_batch_texts: int = 64,
        max_wait_ms: float = 5.0,
        max_queued_requests: int = 4096,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_texts = max_batch_texts
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued_requests = max_queued_requests
        self.on_batch = on_batch
        self.name = name
        self._queue: asyncio.Queue[_Pending[M, R]] = asyncio.Queue()
        self._carry: _Pending[M, R] | None = None  # a request that did not fit the last batch
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight: list[_Pending[M, R]] = []
        self.batches = 0  # model calls so far (tests and /metrics read it)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(self, texts: list[str]) -> tuple[M, list[R]]:
        """Queue ``texts`` and wait for their results (and the batch's meta)."""
        if self._closed:
            raise BatcherClosedError(f"{self.name} is shutting down")
        if self.queued >= self.max_queued_requests:
            raise QueueFullError(f"{self.name}: {self.queued} requests already waiting")
        if self._task is None:
            self.start()
        future: asyncio.Future[tuple[M, list[R]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(list(texts), future))
        return await future

    async def stop(self) -> None:
        """Finish what is queued (in-flight requests are answered), then stop the worker."""
        self._closed = True
        if self._task is None:
            return
        while (self.queued or self._in_flight) and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._fail_waiting(BatcherClosedError(f"{self.name} stopped"))

    def _fail_waiting(self, exc: Exception) -> None:
        """Whoever still waits (only after a forced stop) gets an answer rather than hanging."""
        waiting = list(self._in_flight) + ([self._carry] if self._carry else [])
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(exc)
        self._in_flight, self._carry = [], None

    async def _first(self) -> _Pending[M, R]:
        """The next request, however long it takes: the carried-over one first."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._queue.get()

    async def _next(self, timeout: float) -> _Pending[M, R] | None:
        """The next request: the carried-over one first; None when none arrives in ``timeout`` seconds."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _collect(self) -> list[_Pending[M, R]]:
        first = await self._first()
        batch, size = [first], len(first.texts)
        deadline = first.enqueued + self.max_wait
        while size < self.max_batch_texts:
            item = await self._next(deadline - time.perf_counter())
            if item is None:
                break
            if size + len(item.texts) > self.max_batch_texts:
                self._carry = item  # keeps arrival order: it heads the next batch
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]  # a cancelled caller is skipped
            if not batch:
                continue
            self._in_flight = batch
            texts = [text for pending in batch for text in pending.texts]
            try:
                meta, results = await loop.run_in_executor(self.executor, self.run_batch, texts)
                if len(results) != len(texts):
                    raise RuntimeError(
                        f"{self.name}: batch function returned {len(results)} results for {len(texts)} texts"
                    )
            except asyncio.CancelledError:
                raise  # stop(): _fail_waiting answers this batch's callers
            except Exception as exc:  # every caller of the batch learns why; the worker lives on
                log.exception("%s: batch of %d texts failed", self.name, len(texts))
                outcome: Exception | tuple[M, Sequence[R]] = exc
            else:
                outcome = (meta, results)
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(texts))
            start = 0
            for pending in batch:
                end = start + len(pending.texts)
                if not pending.future.done():
                    if isinstance(outcome, Exception):
                        pending.future.set_exception(outcome)
                    else:
                        pending.future.set_result((outcome[0], list(outcome[1][start:end])))
                start = end
            self._in_flight = []
