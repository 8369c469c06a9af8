"""Admission by the model's measured pace: a request that would wait past its deadline is refused at once.

Real batchers on a real event loop and thread pool; the pace is set where a test needs an exact figure
(timing a call on a loaded machine would make the boundary a guess), and measured where a test only needs
to know that it is.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batching import MicroBatcher, QueueFullError


def _echo(texts: list[str]) -> tuple[str, list[str]]:
    return "meta", list(texts)


def test_a_request_that_would_wait_past_its_deadline_is_refused_at_once() -> None:
    async def scenario() -> None:
        release = threading.Event()
        loop = asyncio.get_running_loop()
        entered = asyncio.Event()

        def held(texts: list[str]) -> tuple[str, list[str]]:
            loop.call_soon_threadsafe(entered.set)
            release.wait(60)
            return _echo(texts)

        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(
                held, pool, max_batch_texts=8, max_wait_ms=0, max_queued_texts=10_000, deadline_ms=1000
            )
            assert batcher.expected_wait(10_000) == 0.0  # nothing measured yet: nothing refused on a guess
            batcher.texts_per_second = 100.0  # the model's pace: 100 texts in the 1 s deadline
            running = asyncio.ensure_future(batcher.submit(["r"] * 8))
            await entered.wait()  # 8 texts in the model call now
            queued = batcher.enqueue(["q"] * 90)  # 8 running + these 90 = 0.98 s of work: admitted
            assert batcher.expected_wait(2) == pytest.approx(1.0)
            assert batcher.expected_wait(3) > batcher.deadline
            with pytest.raises(QueueFullError, match=r"~1100 ms of work, over the 1000 ms deadline"):
                batcher.enqueue(["x"] * 12)
            assert batcher.queued_texts == 90  # the refused request took nothing from the budget
            batcher.enqueue(["y", "y"])  # exactly at the deadline: admitted
            release.set()
            assert (await running)[1] == ["r"] * 8 and (await queued.future)[1] == ["q"] * 90
            await batcher.stop()

    asyncio.run(scenario())


def test_the_pace_is_measured_on_the_models_own_calls_and_follows_a_change() -> None:
    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(_echo, pool, max_batch_texts=4, max_wait_ms=0)
            assert batcher.texts_per_second is None
            assert (await batcher.submit(["a", "b"]))[1] == ["a", "b"]
            first = batcher.texts_per_second
            assert first is not None and first > 0
            batcher._record_pace(10, 1.0)  # a slower call pulls the average down by a fifth of the gap
            assert batcher.texts_per_second == pytest.approx(0.8 * first + 0.2 * 10)
            batcher._record_pace(10, 0.0)  # a call too short to time tells nothing
            assert batcher.texts_per_second == pytest.approx(0.8 * first + 0.2 * 10)
            await batcher.stop()

    asyncio.run(scenario())
