"""Items 2 and 5: from the 250 to the resumed flow, against crewAI's own resume loop; LLM calls.

One run on SQLite, in this order:

1. the ceiling: crewAI's own restore-and-resume of `TrivialFlow` (ceiling.py),
   alone on the machine, with the daemon's parallelism (`resume_workers`);
2. the edge alone (no daemon behind it) taking a burst of the same size
   and shape: the SMTP speed step 5's burst is held to;
   `hitl-mail serve` as a real process, with the relay sink and the fake LLM
   server in processes of their own, and requests cloned from the flow the
   ceiling paused (same class, same stored state and pending context);
3. a warm-up (each resume worker's first flow imports lancedb), then item 5's
   mixed workload (exact options, empty replies, free text) with every LLM
   request counted by the fake server, including any crewAI would make;
4. a steady load at half the ceiling's rate: 250 → resumed per reply;
5. a burst of replies sent as fast as the load generator can, then, while
   the backlog drains, a probe of more replies to see whether the 250s slow
   down; drained throughput and a count that nothing was lost.

The load generator always runs in its own process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    PYTHON,
    ROOT,
    Child,
    Seeded,
    child_env,
    children_cpu,
    descendants_cpu,
    free_port,
    loadgen,
    percentile,
    reply_items,
    reply_template,
    seed_requests,
    wait_for,
    write_config,
)

FREE_TEXT = [
    "Looks fine to me, go ahead with it",
    "I'd rather we did not, the travel line is too high",
    "Happy with this one. Thanks for putting it together",
]


def replies_job(
    port: int, seeded: list[Seeded], first_lines: list[str], **bounds: Any
) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "template": reply_template(),
        "items": reply_items(seeded, first_lines),
        "cycle": False,
        "record": True,
        "clients": bounds.pop("clients", 8),
        "mode": bounds.pop("mode", "closed"),
        "max_count": bounds.pop("max_count", len(seeded)),
        "max_seconds": bounds.pop("max_seconds", 120.0),
        **bounds,
    }


class Daemon:
    """`hitl-mail serve` and what it talks to: a relay sink and a fake LLM, each a process."""

    def __init__(self, work: Path, url: str) -> None:
        self.work = work
        self.url = url
        self.sink_record = work / "sink.txt"
        self.sink = Child(
            [PYTHON, "-m", "bench.servers", "sink", "0", str(self.sink_record)], work / "sink.log"
        )
        self.llm = Child(
            [
                PYTHON,
                str(ROOT / "tests" / "llm_server.py"),
                "--port",
                "0",
                "--record",
                str(work / "llm.jsonl"),
            ],
            work / "llm.log",
        )
        self.smtp_port = free_port()
        self.llm_port = self._llm_port()
        self.config = write_config(
            work / "hitl-mail.toml",
            database_url=url,
            smtp_port=self.smtp_port,
            relay_port=self.sink.wait_port(),
            llm_url=f"http://127.0.0.1:{self.llm_port}/v1",
        )
        self.proc: Child | None = None
        self.engine = sa.create_engine(url)

    def _llm_port(self) -> int:
        assert self.llm.proc.stdout is not None
        return int(self.llm.proc.stdout.readline().decode().strip().split()[-1])

    def start(self) -> None:
        llm = f"http://127.0.0.1:{self.llm_port}/v1"
        env = child_env(HITL_MAIL_CONFIG=str(self.config), OPENAI_API_BASE=llm, OPENAI_BASE_URL=llm)
        self.proc = Child(
            [PYTHON, "-m", "hitl_mail.cli", "serve", "--config", str(self.config)],
            self.work / "daemon.log",
            env=env,
            port_line=False,
        )
        wait_for(self._accepts, 60, what="the daemon's SMTP port")

    def _accepts(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.smtp_port), timeout=0.5).close()
        except OSError:
            if self.proc is not None and self.proc.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited; see {self.work / 'daemon.log'}") from None
            return False
        return True

    def llm_requests(self) -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.llm_port}/_requests", timeout=10) as r:
            return len(json.load(r))

    def statuses(self, ids: list[str]) -> dict[str, tuple[str, float | None, float | None]]:
        """id → (status, answered_at, resumed_at) as Unix times."""
        from hitl_mail.models import FeedbackRequest

        table = FeedbackRequest.__table__  # type: ignore[attr-defined]
        found: dict[str, tuple[str, float | None, float | None]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 900):
                chunk = ids[start : start + 900]
                rows = conn.execute(
                    sa.select(
                        table.c.id, table.c.status, table.c.answered_at, table.c.resumed_at
                    ).where(table.c.id.in_(chunk))
                )
                for row in rows:
                    found[row.id] = (row.status, _unix(row.answered_at), _unix(row.resumed_at))
        return found

    def wait_resumed(
        self, ids: list[str], timeout: float
    ) -> dict[str, tuple[str, float | None, float | None]]:
        def done() -> dict[str, Any] | None:
            found = self.statuses(ids)
            finished = [s for s in found.values() if s[0] in ("resumed", "resume_failed")]
            return found if len(finished) == len(ids) else None

        try:
            return wait_for(done, timeout, interval=0.5, what=f"{len(ids)} resumes")
        except TimeoutError:
            self.dump_stacks()
            raise

    def dump_stacks(self) -> None:
        """On a stall, what every thread of the daemon is doing, into the work folder."""
        import shutil
        import subprocess

        spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))
        if spy and self.proc is not None:
            dump = subprocess.run(
                [spy, "dump", "--subprocesses", "-p", str(self.proc.proc.pid)],
                capture_output=True,
                timeout=60,
            )
            (self.work / "daemon-stall.txt").write_bytes(dump.stdout + dump.stderr)

    def inbound_backlog(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM inbound WHERE status = 'new'")
                ).scalar_one()
            )

    def sink_events(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.sink_record.exists():
            for line in self.sink_record.read_text().splitlines():
                event, _, request_id = line.partition(" ")
                counts[f"{event} {request_id}"] = counts.get(f"{event} {request_id}", 0) + 1
        return counts

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far of `serve` itself, its SMTP listener, and its resume workers."""
        import re

        assert self.proc is not None
        found = re.search(r"listener process (\d+)", (self.work / "daemon.log").read_text())
        listener = int(found.group(1)) if found else -1
        others = descendants_cpu(self.proc.proc.pid)
        return {
            "daemon": self.proc.cpu_seconds(),
            "listener": others.pop(listener, 0.0),
            "workers": sum(others.values()),  # and the fork server, idle
        }

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.sink.stop()
        self.llm.stop()
        self.engine.dispose()


def _unix(value: Any) -> float | None:
    if value is None:
        return None
    from datetime import UTC

    return float((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


def latencies(
    replies: list[list[Any]], found: dict[str, tuple[str, float | None, float | None]]
) -> list[float]:
    """Milliseconds from each reply's 250 to its request's `resumed_at`."""
    out = []
    for request_id, t250 in replies:
        resumed = found.get(request_id, ("", None, None))[2]
        if resumed is not None:
            out.append(1000 * (resumed - t250))
    return out


def run(work: Path, *, quick: bool) -> dict[str, Any]:
    url = f"sqlite:///{work / 'daemon.db'}"
    sizes: dict[str, Any] = {
        "ceiling": 150 if quick else 400,
        "warmup": 12,
        "mixed": 10 if quick else 30,
        "probe": 200 if quick else 300,
        "steady_seconds": 8.0 if quick else 12.0,
        "burst": 1000 if quick else 10_000,
    }
    out: dict[str, Any] = {"sizes": sizes}
    daemon = Daemon(work, url)
    try:
        # 1. the ceiling, alone on the machine (the daemon is not started yet)
        job = work / "ceiling.job.json"
        job.write_text(
            json.dumps(
                {
                    "config": str(daemon.config),
                    "crewai_db": str(work / "crewai.db"),
                    "count": sizes["ceiling"],
                    "workers": 2,
                }
            )
        )
        env_note = child_env(HITL_MAIL_CONFIG=str(daemon.config))
        import subprocess

        with open(work / "ceiling.log", "wb") as log:
            subprocess.run(
                [PYTHON, "-m", "bench.ceiling", str(job), str(work / "ceiling.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env_note,
                cwd=ROOT,
                timeout=300,
                check=True,
            )
        ceiling = json.loads((work / "ceiling.json").read_text())
        durations = ceiling.pop("durations_ms")
        out["ceiling"] = {
            "rate": ceiling["rate"],
            "count": ceiling["count"],
            "workers": ceiling["workers"],
            "p50_ms": percentile(durations, 50),
            "p99_ms": percentile(durations, 99),
        }
        context = ceiling["template"]["context"]

        # 2. requests cloned from the paused flow, then the daemon
        def seeded(n: int) -> list[Seeded]:
            return seed_requests(url, n, context=context)

        warm, mixed_exact, mixed_empty, mixed_free = (
            seeded(sizes["warmup"]),
            seeded(sizes["mixed"]),
            seeded(sizes["mixed"]),
            seeded(sizes["mixed"]),
        )
        steady_n = int(ceiling["rate"] * 0.5 * sizes["steady_seconds"]) + 10
        idle_probe, steady, burst, drain_probe = (
            seeded(sizes["probe"]),
            seeded(steady_n),
            seeded(sizes["burst"]),
            seeded(sizes["probe"]),
        )
        # 2b. the SMTP speed the burst is held to: the edge alone (no daemon
        # behind it) taking a burst of the same size and shape, on its own database
        out["edge_alone"] = edge_alone_burst(work, sizes["burst"])

        daemon.start()
        port = daemon.smtp_port

        # 3. warm-up, then item 5
        loadgen(replies_job(port, warm, ["approved"]), work, "warmup")
        daemon.wait_resumed([s.request_id for s in warm], 60)
        llm_before = daemon.llm_requests()
        mixed = {"exact": mixed_exact, "empty": mixed_empty, "free text": mixed_free}
        lines = {
            "exact": ["approved", "Rejected.", "APPROVED"],
            "empty": [""],
            "free text": FREE_TEXT,
        }
        for kind, rows in mixed.items():
            loadgen(replies_job(port, rows, lines[kind]), work, f"mixed-{kind.replace(' ', '-')}")
        mixed_ids = [s.request_id for rows in mixed.values() for s in rows]
        found = daemon.wait_resumed(mixed_ids, 120)
        out["llm"] = {
            "replies": {kind: len(rows) for kind, rows in mixed.items()},
            "llm_requests": daemon.llm_requests() - llm_before,
            "expected": len(mixed_free),
            "resumed": sum(1 for s in found.values() if s[0] == "resumed"),
        }

        # 4. 250 latency on the idle daemon, then the steady load
        probe = loadgen(replies_job(port, idle_probe, ["approved"]), work, "probe-idle")
        out["probe_idle"] = accept_figures(probe)
        daemon.wait_resumed([s.request_id for s in idle_probe], 120)
        rate = ceiling["rate"] * 0.5
        steady_run = loadgen(
            replies_job(
                port,
                steady,
                ["approved"],
                mode="paced",
                rate=rate,
                max_seconds=sizes["steady_seconds"],
            ),
            work,
            "steady",
        )
        found = daemon.wait_resumed([r[0] for r in steady_run["replies"]], 120)
        lat = latencies(steady_run["replies"], found)
        out["steady"] = {
            "target_rate": rate,
            "sent": steady_run["ok"],
            "achieved_rate": steady_run["ok"] / sizes["steady_seconds"],
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            "resumed": len(lat),
        }

        # 5. the burst, a probe while it drains, then the count
        assert daemon.proc is not None
        cpu_main, cpu_workers = daemon.proc.cpu_seconds(), children_cpu(daemon.proc.proc.pid)
        burst_started, cpu_before = time.time(), daemon.cpu_by_role()
        burst_run = loadgen(
            replies_job(port, burst, ["approved"], max_seconds=300.0), work, "burst", timeout=400
        )
        cpu_burst = {
            role: 1000 * (seconds - cpu_before[role]) / max(burst_run["ok"], 1)
            for role, seconds in daemon.cpu_by_role().items()
        }
        backlog_after_burst = daemon.inbound_backlog()
        probe = loadgen(replies_job(port, drain_probe, ["approved"]), work, "probe-draining")
        backlog_after_probe = daemon.inbound_backlog()
        ids = [s.request_id for s in burst] + [s.request_id for s in drain_probe]
        found = daemon.wait_resumed(ids, 600)
        resumed_times = sorted(s[2] for s in found.values() if s[2] is not None)
        cpu_main = daemon.proc.cpu_seconds() - cpu_main
        cpu_workers = children_cpu(daemon.proc.proc.pid) - cpu_workers
        sink = daemon.sink_events()
        out["burst"] = {
            "count": len(burst),
            "accepted": burst_run["ok"],
            "accept_rate": burst_run["ok"] / burst_run["elapsed"],
            "accept_p50_ms": percentile(burst_run["latency_ms"], 50),
            "accept_p99_ms": percentile(burst_run["latency_ms"], 99),
            "errors": burst_run["errors"] + burst_run["refused"],
            "backlog_after_burst": backlog_after_burst,
            "backlog_after_probe": backlog_after_probe,
            "probe_draining": accept_figures(probe),
            "resumed": sum(1 for s in found.values() if s[0] == "resumed"),
            "failed": sum(1 for s in found.values() if s[0] != "resumed"),
            "confirmations": sum(1 for i in ids if sink.get(f"confirmation {i}", 0) >= 1),
            "drain_seconds": resumed_times[-1] - burst_started,
            "drained_rate": len(resumed_times) / (resumed_times[-1] - burst_started),
            "inbound_left": daemon.inbound_backlog(),
            "cpu_ms_per_reply_during_burst": cpu_burst,
            "daemon_cpu_ms_per_reply": 1000 * cpu_main / len(ids),
            "workers_cpu_ms_per_reply": 1000 * cpu_workers / len(ids),
        }
    finally:
        daemon.stop()
    return out


def edge_alone_burst(work: Path, count: int) -> dict[str, Any]:
    """`count` replies to hitl-mail's SMTP edge alone (bench.servers edge), 8 clients, as the burst."""
    url = f"sqlite:///{work / 'edge-alone.db'}"
    seeded = seed_requests(url, count)
    config = write_config(work / "edge-alone.toml", database_url=url, smtp_port=0, relay_port=9)
    edge = Child([PYTHON, "-m", "bench.servers", "edge", str(config)], work / "edge-alone.log")
    try:
        port = edge.wait_port()
        run = loadgen(
            replies_job(port, seeded, ["approved"], max_seconds=300.0),
            work,
            "burst-edge-alone",
            timeout=400,
        )
    finally:
        edge.stop()
    return accept_figures(run)


def accept_figures(result: dict[str, Any]) -> dict[str, Any]:
    """A load generator's run as sent, rate, p50/p99 from end of DATA to the reply, errors."""
    return {
        "sent": result["ok"],
        "rate": result["ok"] / result["elapsed"],
        "p50_ms": percentile(result["latency_ms"], 50),
        "p99_ms": percentile(result["latency_ms"], 99),
        "errors": result["errors"] + result["refused"],
    }
