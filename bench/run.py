"""Run every benchmark and write bench/RESULTS.md: `python -m bench.run [--quick] [--only N ...]`.

Items (see bench/README.md): 1 inbound accept throughput, 2 reply → resumed
(with 5, LLM calls, in the same daemon run), 3 outbound sending, 4 timer
scale. Every server under test and every load generator is a process of its
own; every load loop is bounded in count and in time; everything talks over
127.0.0.1 only. Work files go to a temporary folder (removed afterwards
unless --keep); the raw figures to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import inbound_accept, reply_resume
from bench.common import (
    BENCH,
    PYTHON,
    free_port,
    postgres_available,
    postgres_database,
    run_json,
    seed_requests,
    write_config,
)
from bench.report import write_report

TIMERS = 100_000


def outbound(work: Path, *, quick: bool, backends: tuple[str, ...]) -> dict[str, Any]:
    from bench.common import Child

    count, reps = (300, 1) if quick else (600, 2)
    sink = Child([PYTHON, "-m", "bench.servers", "sink", "0", ""], work / "outbound-sink.log")
    results: dict[str, Any] = {"count": count, "reps": reps, "backends": {}}
    try:
        port = sink.wait_port()
        for backend in backends:
            with _database(backend, work, "outbound") as url:
                config = write_config(
                    work / f"outbound-{backend}.toml",
                    database_url=url,
                    smtp_port=0,
                    relay_port=port,
                )
                job = work / f"outbound-{backend}.job.json"
                job.write_text(json.dumps({"config": str(config), "count": count, "reps": reps}))
                results["backends"][backend] = run_json(
                    [PYTHON, "-m", "bench.outbound_send", str(job)],
                    timeout=300,
                    log=work / f"outbound-{backend}.log",
                )
    finally:
        sink.stop()
    return results


def timers(work: Path, *, quick: bool) -> dict[str, Any]:
    count = 20_000 if quick else TIMERS
    url = f"sqlite:///{work / 'timers.db'}"
    began = time.perf_counter()
    seed_requests(url, count, deadline_in=timedelta(hours=1))
    seeded_in = time.perf_counter() - began
    config = write_config(
        work / "timers.toml", database_url=url, smtp_port=free_port(), relay_port=free_port()
    )
    spawned = time.time()
    result = run_json(
        [PYTHON, "-m", "bench.timer_start", str(config)], timeout=300, log=work / "timers.log"
    )
    result["spawn_to_ready"] = result["ready"] - spawned
    result["requests"] = count
    result["seed_seconds"] = seeded_in
    return result


class _database:
    def __init__(self, backend: str, work: Path, label: str) -> None:
        self.backend, self.work, self.label = backend, work, label
        self._pg: Any = None

    def __enter__(self) -> str:
        if self.backend == "postgresql":
            self._pg = postgres_database(self.label)
            return str(self._pg.__enter__())
        return f"sqlite:///{self.work / (self.label + '.db')}"

    def __exit__(self, *exc: object) -> None:
        if self._pg is not None:
            self._pg.__exit__(*exc)


def versions() -> dict[str, str]:
    names = ("hitl-mail", "aiosmtpd", "aiosmtplib", "crewai", "SQLAlchemy", "psycopg", "litellm")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    import sqlite3

    found["sqlite"] = sqlite3.sqlite_version
    try:
        import sqlalchemy as sa

        from bench.common import PG_ADMIN_URL

        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            found["postgresql"] = str(conn.execute(sa.text("SHOW server_version")).scalar())
        engine.dispose()
    except Exception:
        found["postgresql"] = "-"
    return found


def machine() -> dict[str, Any]:
    memory = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) // 1024
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return {"cpus": os.cpu_count(), "cpu": model, "memory_mb": memory, "kernel": platform.release()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--only", nargs="*", choices=["1", "2", "3", "4"], help="items to run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, DBs)")
    parser.add_argument("--output", default=str(BENCH / "RESULTS.md"))
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="import hitl_mail from DIR (e.g. `git archive HEAD hitl_mail | tar -x -C DIR`) "
        "and save the figures as bench/results/baseline.json, shown beside later runs",
    )
    args = parser.parse_args()
    if args.baseline:
        os.environ["HITL_MAIL_BENCH_CODE"] = str(Path(args.baseline).resolve())
    only = set(args.only or ["1", "2", "3", "4"])
    backends = ("sqlite", "postgresql") if postgres_available() else ("sqlite",)
    work = Path(tempfile.mkdtemp(prefix="hitl-bench-"))
    started = time.time()
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "baseline": bool(args.baseline),
        "machine": machine(),
        "versions": versions(),
        "load_before": os.getloadavg(),
        "backends": backends,
        "items": {},
        "durations": {},
    }
    steps = [
        ("1", lambda: inbound_accept.run(work, quick=args.quick, backends=backends)),
        ("2", lambda: reply_resume.run(work, quick=args.quick)),
        ("3", lambda: outbound(work, quick=args.quick, backends=backends)),
        ("4", lambda: timers(work, quick=args.quick)),
    ]
    try:
        for key, step in steps:
            if key not in only:
                continue
            print(f"bench: item {key} …", flush=True)
            began = time.time()
            results["items"][key] = step()
            results["durations"][key] = time.time() - began
            print(f"bench: item {key} done in {results['durations'][key]:.0f}s", flush=True)
    finally:
        results["load_after"] = os.getloadavg()
        results["seconds"] = time.time() - started
        (BENCH / "results").mkdir(exist_ok=True)
        name = "baseline.json" if args.baseline else "latest.json"
        if args.quick and not args.baseline:
            name = "latest-quick.json"
        (BENCH / "results" / name).write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"bench: work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.baseline:
        print(f"bench: baseline figures saved ({results['seconds']:.0f}s in all)")
        return
    write_report(results, Path(args.output))
    print(f"bench: {args.output} written ({results['seconds']:.0f}s in all)")


if __name__ == "__main__":
    main()
