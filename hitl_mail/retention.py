"""Forget the raw bytes of processed replies once `[inbound].raw_retention` has passed.

A stored reply keeps its raw message only as long as it can be needed: until
it is processed, and for the retention after (to look into a complaint, say).
Then its bytes are cleared in batches, a few each time, off the SMTP edge's
path; the row itself stays (its dedupe key keeps a late re-delivery a
duplicate), and the reply's text is kept in the request's audit trail.
"""

from __future__ import annotations

import asyncio
import logging

from hitl_mail.config import Config
from hitl_mail.models import utcnow
from hitl_mail.store import Store
from hitl_mail.waiting import idle

log = logging.getLogger(__name__)

EVERY = 3600.0  # seconds between rounds; each round also runs at start
BATCH = 500
PAUSE = 0.05  # between batches of one round, so other writers get the database in between
MAX_BATCHES = 200  # a round stops after this many; the next round goes on


class RawRetention:
    """The purge stage: one round at start, then one every `EVERY` seconds."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.wakeup = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.purge(stopping)
            except Exception:  # a database hiccup: the next round tries again
                log.exception("could not purge raw replies; trying again in %.0fs", EVERY)
            await idle(self.wakeup, stopping, EVERY)
            self.wakeup.clear()

    async def purge(self, stopping: asyncio.Event | None = None) -> int:
        """Clear every processed reply past the retention, a batch at a time; how many."""
        before = utcnow() - self.config.inbound.raw_retention
        total = 0
        for _ in range(MAX_BATCHES):
            purged = await asyncio.to_thread(self.store.purge_raw, before, BATCH)
            total += purged
            if purged < BATCH or (stopping is not None and stopping.is_set()):
                break
            await asyncio.sleep(PAUSE)
        if total:
            log.info("raw bytes of %d processed replies purged (older than %s)", total, before)
        return total
