"""Resume workers: memory (RSS and PSS, summed) and the time for a new worker to be ready.

    nice python -m bench.workers [--workers 2] [--resumes 20] [--no-spawn] [--output bench/RESULTS.md]

Starts the worker pool the daemon uses (`resume.worker_pool`: workers forked
from a zygote that has imported crewAI and the flow modules once) with N
workers, and, for comparison, the way workers used to start (each a spawned
interpreter importing crewAI by itself, `--no-spawn` leaves it out). Both
resume the same real paused `TrivialFlow`s (paused by MailProvider in a
process of its own, then marked answered) so the figures are those of
workers that have done real work:

- RSS and PSS (proportional set size: shared pages divided among the
  processes sharing them, from /proc/PID/smaps_rollup) of each worker, their
  sums, and the zygote's own;
- how long a new worker takes from being asked for (the fork request, or the
  spawn) to running its first call (it holds that call 0.3 s, so each of the
  N first calls lands on a different worker).

Writes its section of RESULTS.md (bench/results/workers.md, which a full
`bench.run` keeps; replaced on the next run) with the command, the date and the load average,
and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import BENCH, FLOW_CLASS, PYTHON, ROOT, child_env, free_port, write_config
from bench.report import write_standalone

HOLD = 0.3  # seconds each first call holds its worker
GOAL_PSS_FACTOR = 1.3  # PSS of all workers together <= 1.3 x one spawned worker's RSS
GOAL_READY_S = 0.5


def memory_kb(pid: int) -> dict[str, int]:
    """Rss and Pss of `pid` in kB, from smaps_rollup."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key.lower()] = int(rest.split()[0])
    return found


def held_call(seconds: float) -> tuple[int, float, float]:
    """In a worker: its pid, the moment it ran (CLOCK_MONOTONIC is shared by all processes)
    and the CPU time it had used until then (counted from its fork or spawn)."""
    began = time.monotonic()
    times = os.times()
    time.sleep(seconds)
    return os.getpid(), began, times.user + times.system


def pause_flows(config: Path, count: int) -> list[str]:
    """Pause `count` TrivialFlows through MailProvider (a process of its own); their request ids."""
    code = (
        "import json\n"
        "from bench.trivial_flow import TrivialFlow\n"
        "for _ in range(int(__import__('sys').argv[1])):\n"
        "    print(json.dumps(TrivialFlow().kickoff().callback_info['request_id']))\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code, str(count)],
        env=child_env(HITL_MAIL_CONFIG=str(config)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('"')]


def mark_answered(database_url: str, request_ids: list[str]) -> None:
    import sqlalchemy as sa

    from hitl_mail.models import FeedbackRequest, utcnow
    from hitl_mail.store import Store

    store = Store(database_url)
    table = FeedbackRequest.__table__  # type: ignore[attr-defined]
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.id.in_(request_ids))
            .values(
                status="answered", outcome="approved", feedback="approved", answered_at=utcnow()
            )
        )
    store.close()


async def measure_pool(
    pool: Any, workers: int, request_ids: list[str], fork: Any, zygote_pid: int | None
) -> dict[str, Any]:
    """Ask for the workers (`fork()`), time their first calls, resume, then read their memory."""
    loop = asyncio.get_running_loop()
    asked = time.monotonic()
    await fork()
    firsts = await asyncio.gather(
        *(loop.run_in_executor(pool, held_call, HOLD) for _ in range(workers))
    )
    ready = sorted(began - asked for _, began, _ in firsts)
    ready_cpu = sorted(cpu for _, _, cpu in firsts)
    from hitl_mail.resume import resume_request

    began = time.monotonic()
    results = await asyncio.gather(
        *(loop.run_in_executor(pool, resume_request, rid, 0) for rid in request_ids)
    )
    resumed = sum(1 for r in results if r.ok)
    resume_seconds = time.monotonic() - began
    pids = sorted({pid for pid, _, _ in firsts})
    memory = {pid: memory_kb(pid) for pid in pids}
    out: dict[str, Any] = {
        "workers": len(pids),
        "ready_s": ready,
        "ready_cpu_s": ready_cpu,
        "resumed": resumed,
        "resume_errors": [r.error for r in results if not r.ok][:2],
        "resumes_per_s": len(request_ids) / resume_seconds if resume_seconds else None,
        "rss_kb": [memory[p]["rss"] for p in pids],
        "pss_kb": [memory[p]["pss"] for p in pids],
    }
    out["rss_sum_kb"] = sum(out["rss_kb"])
    out["pss_sum_kb"] = sum(out["pss_kb"])
    if zygote_pid is not None:
        zygote = memory_kb(zygote_pid)
        out["zygote_rss_kb"], out["zygote_pss_kb"] = zygote["rss"], zygote["pss"]
        out["pss_sum_with_zygote_kb"] = out["pss_sum_kb"] + zygote["pss"]
    return out


async def forked(config: Any, workers: int, request_ids: list[str]) -> dict[str, Any]:
    """The daemon's pool: the zygote's import first (timed apart), then the workers."""
    from hitl_mail.resume import worker_pool

    pool = worker_pool(config)
    try:
        began = time.monotonic()
        # WorkerPool.start() in two steps, to time the zygote's import apart from the forks.
        pool.zygote.preload["flow_classes"] = [FLOW_CLASS]
        pool.zygote.ensure_running()
        ready_fd = pool.zygote.ready_fd
        assert ready_fd is not None
        pool.zygote.reading = True
        try:
            said = await asyncio.to_thread(os.read, ready_fd, 1)
        finally:
            os.close(ready_fd)
            pool.zygote.ready_fd, pool.zygote.reading = None, False
        assert said, "the zygote ended"
        zygote_ready = time.monotonic() - began

        async def fork() -> None:
            await asyncio.to_thread(pool._fork_workers)

        out = await measure_pool(pool, workers, request_ids, fork, pool.zygote.pid)
        out["zygote_ready_s"] = zygote_ready
        return out
    finally:
        pool.stop()


async def spawned(config: Any, workers: int, request_ids: list[str]) -> dict[str, Any]:
    """The way workers started before: each a spawned interpreter importing crewAI itself."""
    from hitl_mail.resume import init_worker

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(config,),
    )
    processes: list[Any] = []
    try:

        async def fork() -> None:
            def spawn_all() -> None:
                with pool._shutdown_lock:  # type: ignore[attr-defined]
                    for _ in range(workers):
                        pool._spawn_process()  # type: ignore[attr-defined]

            await asyncio.to_thread(spawn_all)
            processes.extend(pool._processes.values())  # type: ignore[attr-defined]

        return await measure_pool(pool, workers, request_ids, fork, None)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
            process.join(5)


def section(result: dict[str, Any], command: str) -> str:
    f, s = result["forked"], result.get("spawned")
    mb = 1024
    lines = [
        "## Resume workers: memory and start",
        "",
        f"Written by `{command}` on {result['date']} in {result['seconds']:.0f} s. "
        f"Load average before / after: {result['load_before']} / {result['load_after']} "
        "(a shared, loaded machine: times are upper bounds; memory does not depend on load).",
        "",
        f'{result["workers"]} workers (`resume_priority = "low"`), each resuming real paused `TrivialFlow`s '
        f"({result['resumes']} in all) before their memory is read. PSS divides each shared "
        "page among the processes sharing it.",
        "",
        "| workers | RSS each MB | PSS each MB | PSS of all workers MB | with the zygote MB "
        "| ready after asking, s | its CPU until ready, s | resumes/s |",
        "|---|---|---|---:|---:|---|---|---:|",
    ]

    def row(name: str, r: dict[str, Any]) -> str:
        each = lambda values: ", ".join(f"{v / mb:.0f}" for v in values)  # noqa: E731
        zygote = f"{r['pss_sum_with_zygote_kb'] / mb:.0f}" if "pss_sum_with_zygote_kb" in r else "–"
        ready = ", ".join(f"{v:.2f}" for v in r["ready_s"])
        cpu = ", ".join(f"{v:.2f}" for v in r["ready_cpu_s"])
        return (
            f"| {name} | {each(r['rss_kb'])} | {each(r['pss_kb'])} | {r['pss_sum_kb'] / mb:.0f} "
            f"| {zygote} | {ready} | {cpu} | {r['resumes_per_s']:.1f} |"
        )

    lines.append(row("forked from the zygote (the daemon's)", f))
    if s:
        lines.append(row("spawned, each importing crewAI (before)", s))
    lines += [
        "",
        f"The zygote itself was ready (crewAI and the flow modules imported, `gc.freeze`d) "
        f"{f['zygote_ready_s']:.1f} s after it was started; RSS {f['zygote_rss_kb'] / mb:.0f} MB, "
        f"PSS {f['zygote_pss_kb'] / mb:.0f} MB.",
        "",
        "| goal | target | measured | |",
        "|---|---|---|---|",
    ]
    baseline = max(s["rss_kb"]) if s else 290 * mb
    target = GOAL_PSS_FACTOR * baseline
    for label, value in (
        ("workers", f["pss_sum_kb"]),
        ("workers and their zygote", f["pss_sum_with_zygote_kb"]),
    ):
        lines.append(
            f"| PSS of all {label} | ≤ {GOAL_PSS_FACTOR} × one spawned worker's RSS "
            f"({target / mb:.0f} MB) | {value / mb:.0f} MB "
            f"| **{'met' if value <= target else 'missed'}** |"
        )
    worst, worst_cpu = max(f["ready_s"]), max(f["ready_cpu_s"])
    lines.append(
        f"| a new worker ready after being asked for | < {GOAL_READY_S} s "
        f"| {worst:.2f} s wall, {worst_cpu:.2f} s of its CPU (slowest) "
        f"| **{'met' if worst < GOAL_READY_S else 'missed'}**"
        f"{'' if worst < GOAL_READY_S else ' (wall, on this loaded machine)'} |"
    )
    return "\n".join(lines)


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from hitl_mail.config import load_config

    started = time.monotonic()
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="hitl-bench-workers-") as work:
        url = f"sqlite:///{Path(work) / 'bench.db'}"
        path = write_config(
            Path(work) / "hitl-mail.toml",
            database_url=url,
            smtp_port=free_port(),
            relay_port=free_port(),
            resume_workers=args.workers,
        )
        # "low", not the default "idle": at SCHED_IDLE on a busy machine the figures
        # would measure the other load. Memory is the same either way.
        path.write_text(
            path.read_text().replace("[daemon]\n", '[daemon]\nresume_priority = "low"\n')
        )
        config = load_config(path)
        from hitl_mail.store import Store

        Store(url).migrate()
        ways = 2 if args.spawn else 1
        ids = pause_flows(path, args.resumes * ways)
        mark_answered(url, ids)
        result: dict[str, Any] = {"workers": args.workers, "resumes": args.resumes}
        result["forked"] = await forked(config, args.workers, ids[: args.resumes])
        if args.spawn:
            result["spawned"] = await spawned(config, args.workers, ids[args.resumes :])
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["seconds"] = time.monotonic() - started
    result["load_before"], result["load_after"] = load_before, load()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resumes", type=int, default=20, help="resumes per pool")
    parser.add_argument("--no-spawn", dest="spawn", action="store_false")
    parser.add_argument("--output", default=str(BENCH / "RESULTS.md"))
    args = parser.parse_args()
    os.environ.update(child_env())
    sys.path.insert(0, str(ROOT))
    result = asyncio.run(run(args))
    command = "nice python -m bench.workers" + (" --no-spawn" if not args.spawn else "")
    if args.workers != 2:
        command += f" --workers {args.workers}"
    write_standalone("workers", section(result, command), Path(args.output))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
