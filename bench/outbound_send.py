"""Item 3 (child process): hitl-mail's sending stage against a bare aiosmtplib loop, same messages, same sink.

    python -m bench.outbound_send JOB.json   → one JSON document on stdout

Both send `count` finished notifications over one reused connection to the
sink (its own process). The bare loop only sends; hitl-mail's `Outbox`
claims the rows from the database, sends each, and records each attempt
(status, audit event) in its own commit, exactly as the daemon does. The two
alternate `reps` times; each keeps its best run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta
from typing import Any

import aiosmtplib
import sqlalchemy as sa

from bench.common import seed_requests
from hitl_mail import intake
from hitl_mail.config import load_config
from hitl_mail.models import OutboxMessage
from hitl_mail.outbound import Outbox
from hitl_mail.store import Store


def queue(config: Any, store: Store, count: int) -> list[OutboxMessage]:
    seeded = seed_requests(config.daemon.database_url, count)
    rows = [intake.notification_row(config, store.get(s.request_id)) for s in seeded]
    store.add(*rows)
    return rows


async def bare(config: Any, messages: list[tuple[bytes, str]]) -> float:
    settings = config.outbound
    client = aiosmtplib.SMTP(hostname=settings.host, port=settings.port, timeout=30)
    started = time.perf_counter()
    await client.connect()
    for raw, recipient in messages:
        await client.sendmail(settings.from_addr_spec, [recipient], raw)
    await client.quit()
    return time.perf_counter() - started


async def hitl(config: Any, store: Store) -> float:
    outbox = Outbox(store, config.outbound, timedelta(seconds=1))
    started = time.perf_counter()
    while await outbox.drain_once():
        pass
    await outbox.sender.close()
    return time.perf_counter() - started


async def main(job: dict[str, Any]) -> None:
    config = load_config(job["config"])
    store = Store(config.daemon.database_url)
    store.migrate()
    count = job["count"]
    runs: dict[str, list[float]] = {"bare": [], "hitl-mail": []}
    cpu: dict[str, list[float]] = {"bare": [], "hitl-mail": []}
    for _ in range(job["reps"]):
        rows = await asyncio.to_thread(queue, config, store, count)
        messages = [(row.raw, row.recipient) for row in rows]
        for name, send in (("bare", bare(config, messages)), ("hitl-mail", hitl(config, store))):
            before = time.process_time()
            runs[name].append(count / await send)
            cpu[name].append(1000 * (time.process_time() - before) / count)
    with store.engine.connect() as conn:
        sent = conn.execute(sa.text("SELECT count(*) FROM outbox WHERE status = 'sent'")).scalar()
    summary = {
        "count": count,
        "runs": runs,
        "cpu_ms_per_message": {name: min(values) for name, values in cpu.items()},
        "sent_rows": sent,
        "bytes": len(messages[0][0]),
    }
    print(json.dumps(summary))
    store.close()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as file:
        asyncio.run(main(json.load(file)))
