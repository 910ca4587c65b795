"""The load generator: SMTP clients on reused connections, in a process of its own.

    python -m bench.loadgen JOB.json   → one JSON document on stdout

The job names the server (`host`, `port`), the number of concurrent
`clients` (each one aiosmtplib connection, reused for every message), the
reply `template` and its `items` (see common.reply_template / reply_items),
and the bounds: at most `max_count` messages and `max_seconds` of sending,
whichever comes first. `mode` is `closed` (each client sends its next
message as soon as the last was answered) or `paced` (message i is due at
start + i / `rate`; clients wait for it).

Per message it records the time from the end of DATA (the final `.` sent) to
the server's reply, and the wall-clock time of that reply (for item 2's
"250 → resumed"). Messages answered in the first `warmup_seconds` are sent but
not counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings


class Job:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.template: str = spec["template"]
        self.items: list[list[str]] = spec["items"]
        self.max_count: int = spec["max_count"]
        self.cycle: bool = spec.get("cycle", True)
        if not self.cycle:
            self.max_count = min(self.max_count, len(self.items))
        self.tag = f"{os.getpid()}-{int(time.time() * 1000)}"
        self.next_index = itertools.count()
        self.results: list[tuple[str, float, float, float, int]] = []  # id, end, lat, wall, code
        self.errors: list[str] = []

    def message(self, index: int) -> tuple[str, str, str, bytes]:
        request_id, rcpt, sender, thread, first_line = self.items[index % len(self.items)]
        data = self.template.format(
            mid=f"{self.tag}-{index}",
            rcpt=rcpt,
            sender=sender,
            thread=thread,
            first_line=first_line,
        )
        return request_id, sender, rcpt, wire_bytes(data.encode())


def wire_bytes(data: bytes) -> bytes:
    """The DATA payload as sent: CRLF line endings, dot-stuffed, ending in `.` (RFC 5321 4.5.2)."""
    data = normalize_message_line_endings(data)
    return PERIOD_REGEX.sub(b"..", data) + b".\r\n"


async def transaction(
    client: aiosmtplib.SMTP, sender: str, rcpt: str, data: bytes
) -> tuple[int, float]:
    """MAIL, RCPT, DATA; returns the final reply code and seconds from end of DATA to it.

    aiosmtplib's `data()` hides the moment the final `.` leaves, so its two
    steps are written out here.
    """
    await client.mail(sender)
    await client.rcpt(rcpt)
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    assert protocol is not None
    protocol._response_pending = True  # what execute_command sets before each write
    protocol.write(data)
    ended = time.perf_counter()
    reply = await protocol.read_response(timeout=client.timeout)
    return reply.code, time.perf_counter() - ended


async def client_loop(job: Job, started: float, deadline: float) -> None:
    spec = job.spec
    client = aiosmtplib.SMTP(hostname=spec["host"], port=spec["port"], timeout=60)
    await client.connect()
    try:
        while (index := next(job.next_index)) < job.max_count:
            if spec.get("mode") == "paced":
                due = started + index / spec["rate"]
                if due > deadline:
                    return
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            elif time.perf_counter() > deadline:
                return
            request_id, sender, rcpt, data = job.message(index)
            try:
                code, latency = await transaction(client, sender, rcpt, data)
            except aiosmtplib.SMTPException as exc:
                job.errors.append(f"{type(exc).__name__}: {exc}")
                if not client.is_connected:
                    await client.connect()
                else:
                    await client.rset()
                continue
            job.results.append((request_id, time.perf_counter(), latency, time.time(), code))
    finally:
        if client.is_connected:
            await client.quit()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    job = Job(spec)
    started = time.perf_counter()
    deadline = started + spec["max_seconds"]
    await asyncio.gather(*(client_loop(job, started, deadline) for _ in range(spec["clients"])))
    ended = time.perf_counter()
    warm = started + spec.get("warmup_seconds", 0.0)
    counted = [r for r in job.results if r[1] >= warm and r[4] == 250]
    window = max(ended - warm, 1e-9)
    return {
        "clients": spec["clients"],
        "sent": len(job.results) + len(job.errors),
        "ok": sum(1 for r in job.results if r[4] == 250),
        "refused": sum(1 for r in job.results if r[4] != 250),
        "errors": len(job.errors),
        "first_errors": job.errors[:5],
        "elapsed": ended - started,
        "counted": len(counted),
        "rate": len(counted) / window,
        "latency_ms": [round(r[2] * 1000, 3) for r in counted],
        "replies": [[r[0], r[3]] for r in job.results if r[4] == 250] if spec.get("record") else [],
    }


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        spec = json.load(file)
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
