"""Micro-batching with admission control: merge concurrent requests into one model call, and refuse
at once the work that could not be answered in time.

Why batching: a transformer's cost per text falls steeply with batch size on a CPU (one matrix
multiply over 32 rows instead of 32 over one), so under load the service answers more texts per
second by running them together. Requests wait in a queue; one worker takes the oldest, keeps
collecting until the batch holds ``max_batch_texts`` texts or the oldest request has waited
``max_wait_ms``, runs the model in a worker thread (torch releases the GIL, so the event loop
keeps accepting requests meanwhile) and resolves each request's future with its own slice.

Why admission is counted in texts, not requests: the model's cost is per text, so a backlog of
4,096 requests can be 4,096 texts or 262,144 (minutes of work). ``max_queued_texts`` bounds the
work waiting, hence the wait: a request that would take the backlog over it is refused at once
(:class:`QueueFullError`, a fast 503) instead of queueing for an answer nobody waits for. A
request also carries a deadline (``deadline_ms`` after it was queued): still queued when it
passes, it is dropped and answered :class:`DeadlineExceededError`, never run late. Once the
worker has taken a request into a batch, it is answered whatever the clock says.

Why admission also looks at the model's pace: a backlog under ``max_queued_texts`` can still be
more than the model gets through before the deadline (2,048 texts are ~2.5 s for an int8 MiniLM on
2 cores, ~15 s for an fp32 one), and then the tail of the queue would wait out its deadline and get
a *slow* 503. The batcher keeps a moving average of the model's texts per second (measured on its
own calls), and refuses at once a request that would wait longer than the deadline behind the
texts already queued. Under overload, a client gets either an answer within the deadline or a 503
within a few milliseconds.

Why work can be withdrawn: a client that disconnected, or whose deadline passed, must not cost a
model call. :meth:`withdraw` takes a queued request out (its texts free the budget at once);
:meth:`submit` does so itself when its caller is cancelled.

Fairness between domains: give every batcher of an app the same single-thread executor. Each
batcher has at most one call in it at a time, and the executor runs calls in arrival order, so
a domain's batch waits for at most one call of each other domain: a flood on one domain (a
ranking domain included: its requests go through a batcher of one request per call) cannot
starve the others.

A request is never split: its texts go to the model in one call and so are all answered by
the same model version, even across a hot swap.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")  # one input (a text; a whole ranking request for /rank)
M = TypeVar("M")  # what the batch function says about the whole batch (e.g. the model version)
R = TypeVar("R")  # one result per input

BatchFunction = Callable[[list[T]], tuple[M, Sequence[R]]]

_QUEUED, _TAKEN, _DROPPED = "queued", "taken", "dropped"


class QueueFullError(RuntimeError):
    """The backlog is at its limit: the caller should answer 503 and ask the client to retry."""


class DeadlineExceededError(RuntimeError):
    """The request was still queued when its deadline passed: dropped, never run."""


class BatcherClosedError(RuntimeError):
    """The batcher is stopping (server shutdown) and takes no new work."""


@dataclass(eq=False)  # identity comparison: withdrawing from the deque must not compare texts
class Ticket(Generic[T, M, R]):
    """One queued request: its inputs, what it costs the budget, its answer to come, its deadline."""

    items: list[T]
    cost: int
    future: asyncio.Future[tuple[M, list[R]]]
    enqueued: float  # loop.time()
    deadline: float
    state: str = _QUEUED
    timer: asyncio.TimerHandle | None = None


class MicroBatcher(Generic[T, M, R]):
    """Collects requests into batches for ``run_batch`` (one call at a time), within a budget of queued texts.

    ``run_batch(items)`` returns ``(meta, results)`` with one result per item, in order; it runs
    in ``executor``. If it raises, every request of that batch gets the exception and the batcher
    carries on with the next batch.
    """

    def __init__(
        self,
        run_batch: BatchFunction[T, M, R],
        executor: Executor,
        *,
        max_batch_texts: int = 64,
        max_wait_ms: float = 5.0,
        max_queued_texts: int = 2048,
        deadline_ms: float = 2000.0,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_texts = max_batch_texts
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued_texts = max_queued_texts
        self.deadline = deadline_ms / 1000.0
        self.on_batch = on_batch
        self.name = name
        self._queue: deque[Ticket[T, M, R]] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight: list[Ticket[T, M, R]] = []
        self.batches = 0  # model calls so far (tests and /metrics read it)
        self.texts_per_second: float | None = None  # moving average of the model's pace (None: not measured yet)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    @property
    def queued_texts(self) -> int:
        """What the waiting requests cost the budget."""
        return self._queued_texts

    @property
    def in_flight(self) -> int:
        """Requests in the batch being run (or about to be)."""
        return len(self._in_flight)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def enqueue(self, items: Sequence[T], cost: int | None = None) -> Ticket[T, M, R]:
        """Queue ``items`` (costing ``cost`` texts, default one per item) or refuse them at once.

        No waiting and no model work here: :class:`QueueFullError` is decided on two integers.
        """
        if self._closed:
            raise BatcherClosedError(f"{self.name} is shutting down")
        cost = len(items) if cost is None else cost
        self.check_admission(cost)
        if self._task is None:
            self.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        ticket: Ticket[T, M, R] = Ticket(list(items), cost, loop.create_future(), now, now + self.deadline)
        ticket.timer = loop.call_at(ticket.deadline, self._expire, ticket)
        self._queue.append(ticket)
        self._queued_texts += cost
        self._arrived.set()
        return ticket

    def check_admission(self, cost: int) -> None:
        """:class:`QueueFullError` if ``cost`` more texts would overflow the budget or wait past the deadline.

        The one admission rule: :meth:`enqueue` applies it, and a caller may apply it before it has even
        parsed a request (the service does, with ``cost=1``, to make refusals under overload cheap)."""
        if self._queued_texts + cost > self.max_queued_texts:
            raise QueueFullError(f"{self.name}: {self._queued_texts} texts already waiting")
        wait = self.expected_wait(cost)
        if wait > self.deadline:
            raise QueueFullError(
                f"{self.name}: {self._queued_texts} texts already waiting, ~{wait * 1000:.0f} ms of work, "
                f"over the {self.deadline * 1000:.0f} ms deadline"
            )

    def expected_wait(self, cost: int) -> float:
        """Seconds until a request of ``cost`` texts queued now would be done, at the model's measured pace.

        Counts the queued texts, the batch running now (taken as a whole) and the request itself; 0 before
        the first model call has been timed (nothing is refused on a guess)."""
        if not self.texts_per_second:
            return 0.0
        running = sum(len(ticket.items) for ticket in self._in_flight)
        return (self._queued_texts + running + cost) / self.texts_per_second

    def withdraw(self, ticket: Ticket[T, M, R]) -> bool:
        """Take a request out of the queue (its caller left); False when it is already in a batch or gone.

        Its future is cancelled either way, so a batch that is running discards its rows.
        """
        removed = self._drop(ticket)
        if not ticket.future.done():
            ticket.future.cancel()
        return removed

    async def submit(self, items: Sequence[T], cost: int | None = None) -> tuple[M, list[R]]:
        """Queue ``items`` and wait for their results (and the batch's meta); cancelled, it withdraws them."""
        ticket = self.enqueue(items, cost)
        try:
            return await ticket.future
        except asyncio.CancelledError:
            self.withdraw(ticket)
            raise

    async def stop(self) -> None:
        """Finish what is queued (in-flight requests are answered), then stop the worker."""
        self._closed = True
        if self._task is None:
            return
        while (self._queue or self._in_flight) and not self._task.done():
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._fail_waiting(BatcherClosedError(f"{self.name} stopped"))

    def _drop(self, ticket: Ticket[T, M, R]) -> bool:
        """Remove a still-queued request and give its texts back to the budget."""
        if ticket.state != _QUEUED:
            return False
        ticket.state = _DROPPED
        if ticket.timer is not None:
            ticket.timer.cancel()
        self._queue.remove(ticket)  # at most max_queued_texts entries, compared by identity
        self._queued_texts -= ticket.cost
        return True

    def _expire(self, ticket: Ticket[T, M, R]) -> None:
        """The deadline of a request passed: if it still waits, it is dropped and told so, never run late."""
        if self._drop(ticket) and not ticket.future.done():
            waited = asyncio.get_running_loop().time() - ticket.enqueued
            ticket.future.set_exception(
                DeadlineExceededError(f"{self.name}: still queued after {waited * 1000:.0f} ms (deadline)")
            )

    def _fail_waiting(self, exc: Exception) -> None:
        """Whoever still waits (only after a forced stop) gets an answer rather than hanging."""
        waiting = list(self._in_flight)
        while self._queue:
            ticket = self._queue[0]
            self._drop(ticket)
            waiting.append(ticket)
        for ticket in waiting:
            if not ticket.future.done():
                ticket.future.set_exception(exc)
        self._in_flight = []

    def _take_head(self) -> Ticket[T, M, R] | None:
        """The oldest queued request that is still worth running (an expired one is answered, not run)."""
        now = asyncio.get_running_loop().time()
        while self._queue:
            ticket = self._queue[0]
            if now >= ticket.deadline:  # the timer has not fired yet (a busy loop): same outcome
                self._expire(ticket)
                continue
            return ticket
        return None

    def _take(self, ticket: Ticket[T, M, R]) -> None:
        self._queue.popleft()
        ticket.state = _TAKEN
        if ticket.timer is not None:
            ticket.timer.cancel()
        self._queued_texts -= ticket.cost

    async def _wait_for_work(self, until: float | None) -> bool:
        """Wait until a request is queued (True), or until loop time ``until`` passes (False)."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._arrived.clear()
            if until is None:
                await self._arrived.wait()
                continue
            remaining = until - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return bool(self._queue)
        return True

    async def _collect(self) -> list[Ticket[T, M, R]]:
        while True:
            await self._wait_for_work(None)
            first = self._take_head()
            if first is not None:
                break
        self._take(first)
        batch, size = [first], len(first.items)
        close_at = first.enqueued + self.max_wait
        while size < self.max_batch_texts:
            if not await self._wait_for_work(close_at):
                break
            item = self._take_head()
            if item is None:
                continue
            if size + len(item.items) > self.max_batch_texts:
                break  # it stays at the head of the queue: the next batch starts with it
            self._take(item)
            batch.append(item)
            size += len(item.items)
        return batch

    def _record_pace(self, texts: int, seconds: float) -> None:
        """Fold one call into the moving average of texts per second (weight 0.2: a few calls follow a change).

        The time includes waiting for the shared executor behind other domains' calls: that is part of
        what a queued request will wait, too."""
        if seconds <= 0:
            return
        pace = texts / seconds
        previous = self.texts_per_second
        self.texts_per_second = pace if previous is None else 0.8 * previous + 0.2 * pace

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [t for t in await self._collect() if not t.future.done()]  # a caller gone meanwhile is skipped
            if not batch:
                continue
            self._in_flight = batch
            items = [item for ticket in batch for item in ticket.items]
            try:
                started = loop.time()
                meta, results = await loop.run_in_executor(self.executor, self.run_batch, items)
                self._record_pace(len(items), loop.time() - started)
                if len(results) != len(items):
                    raise RuntimeError(
                        f"{self.name}: batch function returned {len(results)} results for {len(items)} inputs"
                    )
            except asyncio.CancelledError:
                raise  # stop(): _fail_waiting answers this batch's callers
            except Exception as exc:  # every caller of the batch learns why; the worker lives on
                log.exception("%s: batch of %d inputs failed", self.name, len(items))
                outcome: Exception | tuple[M, Sequence[R]] = exc
            else:
                outcome = (meta, results)
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(items))
            start = 0
            for ticket in batch:
                end = start + len(ticket.items)
                if not ticket.future.done():
                    if isinstance(outcome, Exception):
                        ticket.future.set_exception(outcome)
                    else:
                        ticket.future.set_result((outcome[0], list(outcome[1][start:end])))
                start = end
            self._in_flight = []
