"""A burst of replies against `hitl-mail serve`, as a black box, beside bare aiosmtpd in the same run.

    python -m bench.burst [--sizes 400 10000] [--backends sqlite postgres] [--keep]

What a mail relay does when it flushes its queue after an outage: N replies,
3.4 KB each, over 8 reused connections, sent as fast as the server answers.
For each backend and size, in this order:

1. `hitl-mail serve` is started and warmed up (each resume worker resumes a
   flow first); N pending requests are cloned from a really paused
   `TrivialFlow`;
2. bare aiosmtpd (its handler only answers 250) takes a burst of the same
   size and shape: the SMTP stack's own pace on this machine, now (serve
   idles meanwhile; the CPU it took is recorded);
3. serve takes the burst: accept rate and end-of-DATA → 250 p50/p99, as the
   load generator sees them;
4. every request is waited for: resumed, and confirmed by exactly one email
   to the relay sink, with exactly one `answered` audit row (nothing lost,
   nothing doubled).

Bursts of a few hundred repeat 2-4 three times (`rounds_for`); the median
round is reported. The accept ratio is serve's rate over bare aiosmtpd's. Results go to
`bench/results/burst.json` and to the "Bursts" section of `RESULTS.md`
(`bench/results/burst.md`, which a full `bench.run` keeps). Every process is the benchmark's own; every
loop is bounded in count and time; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    BENCH,
    PYTHON,
    ROOT,
    Child,
    child_env,
    loadgen,
    postgres_available,
    postgres_database,
    seed_requests,
)
from bench.reply_resume import Daemon, accept_figures, replies_job
from bench.report import write_standalone

CLIENTS = 8
GOAL_RATIO = 0.6
WARMUP = 12
RESULTS = BENCH / "results" / "burst.json"


def template(work: Path, config: Path) -> dict[str, Any]:
    """Pause one real `TrivialFlow` through MailProvider; its stored context, for cloning."""
    out = work / "template.json"
    code = (
        "import json, sys; from bench.ceiling import template; "
        "json.dump(template(sys.argv[1]), open(sys.argv[2], 'w'))"
    )
    with open(work / "template.log", "wb") as log:
        subprocess.run(
            [PYTHON, "-c", code, str(config), str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(HITL_MAIL_CONFIG=str(config)),
            cwd=ROOT,
            timeout=300,
            check=True,
        )
    return dict(json.loads(out.read_text())["context"])


def bare_burst(work: Path, size: int, label: str) -> dict[str, Any]:
    """Bare aiosmtpd taking `size` replies of the same shape (their tokens are never read)."""
    bare = Child([PYTHON, "-m", "bench.servers", "bare", "0"], work / f"bare-{label}.log")
    try:
        port = bare.wait_port()
        url = f"sqlite:///{work / f'bare-{label}.db'}"
        seeded = seed_requests(url, size)
        run = loadgen(
            replies_job(port, seeded, ["approved"], clients=CLIENTS, max_seconds=300.0),
            work,
            f"bare-{label}",
            timeout=400,
        )
    finally:
        bare.stop()
    return accept_figures(run)


def serve_burst(
    work: Path, url: str, size: int, context: dict[str, Any], rounds: int, label: str
) -> list[dict[str, Any]]:
    """`rounds` bursts of `size` replies, each to as many new pending requests, each beside
    bare aiosmtpd taking a burst of the same size just before it; per round, both figures."""
    daemon = Daemon(work, url)
    warm = seed_requests(url, WARMUP, context=context)
    out: list[dict[str, Any]] = []
    try:
        daemon.start()
        loadgen(replies_job(daemon.smtp_port, warm, ["approved"]), work, "warmup")
        daemon.wait_resumed([s.request_id for s in warm], 120)
        for round_ in range(rounds):
            burst = seed_requests(url, size, context=context)
            idle_before = sum(daemon.cpu_by_role().values())
            bare = bare_burst(work, size, f"{label}-{round_}")
            # serve is up and idle meanwhile: what it took from bare's machine, for the record.
            bare["serve_idle_cpu_ms"] = 1000 * (sum(daemon.cpu_by_role().values()) - idle_before)
            run = loadgen(
                replies_job(
                    daemon.smtp_port, burst, ["approved"], clients=CLIENTS, max_seconds=300.0
                ),
                work,
                f"burst-{round_}",
                timeout=400,
            )
            ids = [s.request_id for s in burst]
            found = daemon.wait_resumed(ids, 900)
            sink = daemon.sink_events()
            answered = answered_rows(daemon.engine, ids)
            served = accept_figures(run)
            served.update(
                {
                    "resumed": sum(1 for s in found.values() if s[0] == "resumed"),
                    "confirmed_once": sum(1 for i in ids if sink.get(f"confirmation {i}", 0) == 1),
                    "confirmed_twice_or_more": sum(
                        1 for i in ids if sink.get(f"confirmation {i}", 0) > 1
                    ),
                    "answered_once": sum(1 for i in ids if answered.get(i, 0) == 1),
                    "answered_twice_or_more": sum(1 for i in ids if answered.get(i, 0) > 1),
                }
            )
            out.append({"bare": bare, "serve": served, "ratio": served["rate"] / bare["rate"]})
    finally:
        daemon.stop()
    return out


def answered_rows(engine: sa.Engine, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), 900):
            rows = conn.execute(
                sa.text(
                    "SELECT request_id, count(*) FROM audit WHERE event = 'answered' "
                    "AND request_id IN :ids GROUP BY request_id"
                ).bindparams(sa.bindparam("ids", expanding=True)),
                {"ids": ids[start : start + 900]},
            )
            counts.update({row[0]: int(row[1]) for row in rows})
    return counts


@contextlib.contextmanager
def database(backend: str, work: Path, label: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work / f'{label}.db'}"
    else:
        with postgres_database(label) as url:
            yield url


def rounds_for(size: int) -> int:
    """A burst of a few hundred lasts half a second: one run is too short a sample of a
    machine whose pace drifts by a third from minute to minute, so it is taken three
    times and the median round reported. A burst of thousands is one run."""
    return 3 if size <= 1000 else 1


def run(sizes: list[int], backends: list[str], work: Path) -> dict[str, Any]:
    context_config = work / "template.toml"
    from bench.common import write_config

    write_config(
        context_config, database_url=f"sqlite:///{work / 'template.db'}", smtp_port=0, relay_port=9
    )
    context = template(work, context_config)
    results: dict[str, Any] = {}
    for backend in backends:
        for size in sizes:
            label = f"{backend}-{size}"
            case = work / label
            case.mkdir()
            with database(backend, case, f"burst_{size}") as url:
                rounds = serve_burst(case, url, size, context, rounds_for(size), label)
            median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
            results[label] = {
                "backend": backend,
                "size": size,
                "bare": median["bare"],
                "serve": median["serve"],
                "ratio": median["ratio"],
                "rounds": rounds,
            }
            each = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
            resumed = sum(r["serve"]["resumed"] for r in rounds)
            print(
                f"{label}: median of {len(rounds)}: serve {median['serve']['rate']:.0f}/s vs bare "
                f"{median['bare']['rate']:.0f}/s = {median['ratio']:.2f} (rounds: {each}); "
                f"resumed {resumed}/{size * len(rounds)}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 10_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    args = parser.parse_args()
    backends = [b for b in args.backends if b == "sqlite" or postgres_available()]
    work = Path(tempfile.mkdtemp(prefix="hitl-burst-"))
    started = time.time()
    load_before = os.getloadavg()
    try:
        cases = run(args.sizes, backends, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    document = {
        "command": "python -m bench.burst " + " ".join(sys.argv[1:]),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "seconds": time.time() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "clients": CLIENTS,
        "cases": cases,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1))
    write_standalone("burst", section(document))
    print(f"written to {RESULTS} and RESULTS.md")


def section(document: dict[str, Any]) -> str:
    """The "Bursts" section of RESULTS.md."""
    lines = [
        "## Bursts against `hitl-mail serve`, beside bare aiosmtpd",
        "",
        f"Written by `{document['command']}` on {document['started']} in "
        f"{document['seconds']:.0f} s. Load average before / after: "
        f"{', '.join(f'{x:.1f}' for x in document['load_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in document['load_after'])}.",
        "",
        f"{document['clients']} clients on reused connections, 3.4 KB replies, sent as fast as "
        "the server answers; `serve` holds as many pending requests as the burst has replies "
        "and has warmed its resume workers up. Goal: accept ratio >= "
        f"{GOAL_RATIO} of bare aiosmtpd in the same run, every request resumed, confirmed and "
        "answered exactly once.",
        "",
        "A burst of a few hundred is taken three times (each round: bare aiosmtpd, then "
        "`serve`, against new pending requests) and the median round is shown; the counts "
        "add up every round.",
        "",
        "| backend | burst | bare msg/s (p50 / p99 ms) | serve msg/s (p50 / p99 ms) | ratio "
        "| each round | resumed | confirmed once | answered once | doubled | goal |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for case in document["cases"].values():
        bare, serve, size = case["bare"], case["serve"], case["size"]
        rounds = case.get("rounds") or [case]
        total = {
            key: sum(r["serve"][key] for r in rounds)
            for key in (
                "resumed",
                "confirmed_once",
                "answered_once",
                "confirmed_twice_or_more",
                "answered_twice_or_more",
            )
        }
        sent = size * len(rounds)
        doubled = total["confirmed_twice_or_more"] + total["answered_twice_or_more"]
        whole = total["resumed"] == total["confirmed_once"] == total["answered_once"] == sent
        met = case["ratio"] >= GOAL_RATIO and whole and doubled == 0
        each = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
        lines.append(
            f"| {case['backend']} | {size:,} "
            f"| {bare['rate']:,.0f} ({bare['p50_ms']:.1f} / {bare['p99_ms']:.1f}) "
            f"| {serve['rate']:,.0f} ({serve['p50_ms']:.1f} / {serve['p99_ms']:.1f}) "
            f"| {case['ratio']:.2f} | {each} "
            f"| {total['resumed']:,}/{sent:,} | {total['confirmed_once']:,} "
            f"| {total['answered_once']:,} | {doubled} "
            f"| **{'met' if met else 'missed'}** |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
