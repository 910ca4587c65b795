"""How a stage idles: until it is woken (new work), told to stop, or its poll interval passes."""

from __future__ import annotations

import asyncio


async def idle(wakeup: asyncio.Event, stopping: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
