"""How stages wait: idling until woken, giving way to a flood of replies, sharing one batch.

`idle`: until the stage is woken (new work), told to stop, or its poll
interval passes. `let_flood_pass`: while the SMTP listener stores replies
faster than the daemon could process them, answering and resuming wait.
`Coalesce`: concurrent calls of one operation go to the database together,
so under load one statement and one commit serve many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# While replies are stored faster than FLOOD_RATE a second (over the last
# FLOOD_WINDOW seconds), answering and resuming wait, at most MAX_YIELD seconds
# at a time: above that rate the backlog grows whatever they do (the daemon
# answers and resumes about 100 a second on two cores), so working later costs
# no throughput, and the SMTP listener keeps the CPU and SQLite's write lock
# to itself while a burst arrives. The backlog is worked through after it.
FLOOD_RATE = 200.0
FLOOD_WINDOW = 0.25
MAX_YIELD = 5.0
# A burst is known from its start: ONSET_COUNT replies within ONSET_WINDOW (300 a
# second) are a flood too, and answering, woken by a stored reply, first lets
# ONSET_WINDOW pass since it, so a burst's first replies show the rest coming.
# Waiting for the quarter-second rule instead, answering worked through a
# burst's first hundred replies beside the listener: a 400-reply burst was
# accepted at 0.47 of bare aiosmtpd's pace, and at 0.63 with answering held
# from its first reply (bench/findings.md, seventh round).
ONSET_COUNT = 3
ONSET_WINDOW = 0.01
LONG_WAIT = 1.0  # a stage's wait for a burst is logged at INFO from this long

K = TypeVar("K")
V = TypeVar("V")


async def idle(wakeup: asyncio.Event, stopping: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Arrivals:
    """When the SMTP listener stored its latest replies: is a flood arriving?"""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._times: deque[tuple[float, int]] = deque()  # (when, how many), oldest first
        self._count = 0  # replies in _times

    def note(self, count: int = 1) -> None:
        """`count` replies were stored just now."""
        self._times.append((self.clock(), count))
        self._count += count
        self._forget_old()

    def flooding(self) -> bool:
        """More than FLOOD_RATE replies a second stored over the last FLOOD_WINDOW,
        or ONSET_COUNT within the last ONSET_WINDOW."""
        self._forget_old()
        if self._count > FLOOD_RATE * FLOOD_WINDOW:
            return True
        since, recent = self.clock() - ONSET_WINDOW, 0
        for when, count in reversed(self._times):
            if when < since:
                break
            recent += count
        return recent >= ONSET_COUNT

    async def settle(self) -> None:
        """Wait until the newest reply is ONSET_WINDOW old: a burst shows itself by then."""
        if self._times:
            left = self._times[-1][0] + ONSET_WINDOW - self.clock()
            if left > 0:
                await asyncio.sleep(left)

    def _forget_old(self) -> None:
        since = self.clock() - FLOOD_WINDOW
        while self._times and self._times[0][0] < since:
            self._count -= self._times.popleft()[1]


async def let_flood_pass(arrivals: Arrivals, stopping: asyncio.Event, stage: str) -> bool:
    """While a flood arrives, the CPU and the write lock are the listener's (MAX_YIELD at most).

    True when it waited.
    """
    if not arrivals.flooding():
        return False
    log.debug("replies arriving at over %d/s: %s waits for them to pass", FLOOD_RATE, stage)
    loop = asyncio.get_running_loop()
    began = loop.time()
    while arrivals.flooding() and loop.time() - began < MAX_YIELD:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), FLOOD_WINDOW / 5)
            return True
    waited = loop.time() - began
    # A cluster of a few replies holds a stage for milliseconds: worth a line only when long.
    log.log(
        logging.INFO if waited >= LONG_WAIT else logging.DEBUG,
        "%s again after waiting %.1fs for a burst of replies (over %d/s) to pass",
        stage,
        waited,
        FLOOD_RATE,
    )
    return True


class Coalesce(Generic[K, V]):
    """`await coalesce(item)`: items that arrive while a batch runs go together in the next.

    `run(items)` returns one result per item, in order. A handler's result
    comes only after the batch that holds its item has finished; if the batch
    raises, each item of it is run again alone (when `split_on_error`), so one
    item the database refuses does not refuse its neighbours, and then every
    item that still fails gets the exception. Alone, an item waits for one
    run as it would without this.
    """

    def __init__(
        self,
        run: Callable[[list[K]], Awaitable[list[V]]],
        name: str,
        max_batch: int = 256,
        split_on_error: bool = False,
    ) -> None:
        self._run = run
        self._name = name
        self._max_batch = max_batch
        self._split_on_error = split_on_error
        self._waiting: list[tuple[K, asyncio.Future[V]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0  # batches run so far, split ones included

    async def __call__(self, item: K) -> V:
        done: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_waiting(), name=self._name)
        return await done

    async def wait_idle(self) -> None:
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

    async def _run_waiting(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            await self._run_batch(batch, self._split_on_error)

    async def _run_batch(self, batch: list[tuple[K, asyncio.Future[V]]], split: bool) -> None:
        self.runs += 1
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            if split and len(batch) > 1:
                for one in batch:
                    await self._run_batch([one], split=False)
                return
            for _, done in batch:
                if not done.done():  # a handler whose client went away is cancelled
                    done.set_exception(exc)
            return
        for (_, done), result in zip(batch, results, strict=True):
            if not done.done():
                done.set_result(result)
