"""Item 4 (child process): start `App` over a database with 100,000 pending deadlines.

    python -m bench.timer_start CONFIG   → one JSON document on stdout

Prints the wall-clock moment `App.startup()` returned (ready: the SMTP
listener is accepting and READY=1 would have gone to systemd), how long
`startup()` itself took, then lets the stages run for a few seconds (the
timer stage's first look at the deadlines happens then) and reports this
process's peak resident memory, and, separately, that of each resume worker
once it has imported crewAI.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

STARTED = time.time()  # before the daemon's own imports


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def main(config_path: str) -> dict[str, object]:
    from hitl_mail import logs
    from hitl_mail.app import App
    from hitl_mail.config import load_config

    config = load_config(config_path)
    logs.setup(config.logging)
    app = App(config)
    begun = time.time()
    await app.startup()
    ready = time.time()
    ready_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await asyncio.sleep(3.0)  # the timer stage's first scan, the other stages' first polls
    loop = asyncio.get_running_loop()
    pids = await asyncio.gather(
        *(
            loop.run_in_executor(app.resumer.pool, os.getpid)
            for _ in range(config.daemon.resume_workers)
        )
    )
    workers = {pid: vm_hwm_kb(pid) for pid in set(pids)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pending_timers = await asyncio.to_thread(app.store.next_timer_due)
    await app.shutdown()
    return {
        "process_started": STARTED,
        "startup_began": begun,
        "ready": ready,
        "startup_seconds": ready - begun,
        "ready_rss_kb": ready_rss,
        "peak_rss_kb": peak,
        "worker_peak_rss_kb": list(workers.values()),
        "next_timer_due": pending_timers.isoformat() if pending_timers else None,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
