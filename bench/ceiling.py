"""crewAI's own restore-and-resume of `TrivialFlow` in a tight loop: the ceiling for item 2.

    python -m bench.ceiling JOB.json OUT.json

First it pauses one real `TrivialFlow` through `MailProvider` (so the
hitl-mail database named by $HITL_MAIL_CONFIG holds a genuine stored request:
its state and pending context are the template the daemon's requests are
cloned from). Then it stores `count` pending flows with that same state and
context in crewAI's own `SQLiteFlowPersistence`, starts `workers` processes
(the daemon's `resume_workers`: the same parallelism), lets each import
crewAI and resume one flow untimed (the first `Flow()` imports lancedb,
seconds), and then, all at once, each restores and resumes its share as fast
as it can: `TrivialFlow.from_pending(flow_id, persistence).resume("")`. The
empty feedback takes `default_outcome="approved"` with no LLM call, and the
same `@listen("approved")` method runs as in the daemon.

crewAI prints panels to stdout for every flow; they go wherever this
process's stdout goes (the daemon's workers print the same into its log).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import uuid
from typing import Any

CRASH_BUDGET = 600.0


def template(config_path: str) -> dict[str, Any]:
    """Pause one real flow through MailProvider; return its stored request's context and state."""
    from bench.trivial_flow import TrivialFlow
    from hitl_mail.config import load_config
    from hitl_mail.store import Store

    paused = TrivialFlow().kickoff()
    request_id = paused.callback_info["request_id"]
    store = Store(load_config(config_path).daemon.database_url)
    request = store.get(request_id)
    store.close()
    return {"request_id": request_id, "context": request.context, "state": request.state}


def seed(path: str, context: dict[str, Any], count: int) -> list[str]:
    from crewai.flow.async_feedback.types import PendingFeedbackContext
    from crewai.flow.persistence.sqlite import SQLiteFlowPersistence

    persistence = SQLiteFlowPersistence(path)
    ids = []
    for _ in range(count):
        flow_id = str(uuid.uuid4())
        pending = PendingFeedbackContext.from_dict({**context, "flow_id": flow_id})
        persistence.save_pending_feedback(flow_id, pending, {"id": flow_id})
        ids.append(flow_id)
    return ids


def worker(path: str, warm_id: str, ids: list[str], ready: Any, go: Any, out: Any) -> None:
    from crewai.flow.persistence.sqlite import SQLiteFlowPersistence

    from bench.trivial_flow import TrivialFlow

    persistence = SQLiteFlowPersistence(path)
    TrivialFlow.from_pending(warm_id, persistence).resume("")
    ready.release()
    go.wait()
    started = time.time()
    durations = []
    for flow_id in ids:
        t0 = time.perf_counter()
        result = TrivialFlow.from_pending(flow_id, persistence).resume("")
        durations.append(time.perf_counter() - t0)
        assert result == "done", result
    out.put({"pid": os.getpid(), "started": started, "ended": time.time(), "durations": durations})


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        job = json.load(file)
    made = template(job["config"])
    workers, count = job["workers"], job["count"]
    ids = seed(job["crewai_db"], made["context"], count + workers)
    warm, ids = ids[:workers], ids[workers:]
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=worker, args=(job["crewai_db"], warm[i], ids[i::workers], ready, go, out)
        )
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        if not ready.acquire(timeout=CRASH_BUDGET):
            raise SystemExit("a ceiling worker did not get ready")
    started = time.time()
    go.set()
    results = [out.get(timeout=CRASH_BUDGET) for _ in procs]
    for proc in procs:
        proc.join()
    ended = max(r["ended"] for r in results)
    durations = [d for r in results for d in r["durations"]]
    summary = {
        "template": made,
        "workers": workers,
        "count": len(durations),
        "seconds": ended - started,
        "rate": len(durations) / (ended - started),
        "durations_ms": [round(d * 1000, 3) for d in durations],
    }
    with open(sys.argv[2], "w", encoding="utf-8") as file:
        json.dump(summary, file)


if __name__ == "__main__":
    main()
