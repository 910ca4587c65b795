"""Turn the figures of one run (bench/results/latest.json) into bench/RESULTS.md.

The analysis that no run can measure by itself — what the profiles showed,
what was changed, what bounds a goal on this machine — is kept by hand in
bench/findings.md and included after the figures. A run made with
`--baseline` (the code before the changes) is shown beside this one when
bench/results/baseline.json exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def _n(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.0f}%"


def _ok(met: bool | None) -> str:
    return "–" if met is None else ("**met**" if met else "**missed**")


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def goals(items: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, bool | None]] = []
    if "1" in items:
        servers = items["1"]["servers"]
        bare = {m["clients"]: m for m in servers["bare aiosmtpd"]}
        for name, runs in servers.items():
            if name == "bare aiosmtpd":
                continue
            at8 = next(m for m in runs if m["clients"] == 8)
            ratio = _ratio(at8["rate"], bare[8]["rate"])
            rows.append(
                (
                    f"1. accept throughput, {name.split(', ')[1]}, 8 clients",
                    "≥ 50% of bare aiosmtpd",
                    f"{_n(at8['rate'])} vs {_n(bare[8]['rate'])} msg/s = {_pct(ratio)}",
                    ratio >= 0.5,
                )
            )
    if "2" in items:
        r = items["2"]
        ratio = _ratio(r["burst"]["drained_rate"], r["ceiling"]["rate"])
        rows.append(
            (
                "2. drained reply → resumed throughput",
                "≥ 80% of crewAI's own loop",
                f"{_n(r['burst']['drained_rate'], 1)} vs {_n(r['ceiling']['rate'], 1)} /s = {_pct(ratio)}",
                ratio >= 0.8,
            )
        )
        steady = r["steady"]
        rows.append(
            (
                "2. p99 250 → resumed at half that rate",
                "< 250 ms",
                f"{_n(steady['p99_ms'])} ms at {_n(steady['achieved_rate'], 1)}/s",
                steady["p99_ms"] < 250,
            )
        )
        burst = r["burst"]
        expected = burst["count"] + burst["probe_draining"]["sent"]
        lost = expected - burst["resumed"]
        rows.append(
            (
                f"2. burst of {burst['count']:,}: none lost",
                "every reply resumed and confirmed",
                f"{burst['resumed']:,}/{expected:,} resumed, {burst['confirmations']:,} confirmed",
                lost == 0 and burst["confirmations"] == expected and burst["inbound_left"] == 0,
            )
        )
        idle, draining = r["probe_idle"], burst["probe_draining"]
        rows.append(
            (
                "2. 250s while the backlog drains",
                "no slower than on the idle daemon",
                f"{_n(draining['rate'])} vs {_n(idle['rate'])} msg/s; p99 {_n(draining['p99_ms'])} vs {_n(idle['p99_ms'])} ms",
                draining["rate"] >= 0.8 * idle["rate"]
                and draining["p99_ms"] <= 1.5 * idle["p99_ms"],
            )
        )
        alone = r.get("edge_alone")
        if alone is not None:  # the same burst to the edge alone, in the same run
            edge_rate, against = alone["rate"], "the edge alone taking the same burst"
        elif "1" in items:  # results written before that measurement existed
            edge_rate = next(
                m for m in items["1"]["servers"]["hitl-mail edge, sqlite"] if m["clients"] == 8
            )["rate"]
            against = "the edge alone (item 1, SQLite, 8 clients)"
        else:
            edge_rate = None
        if edge_rate is not None:
            ratio = _ratio(burst["accept_rate"], edge_rate)
            rows.append(
                (
                    "2. burst accepted at SMTP speed",
                    f"as fast as {against}, within the 20 % these figures move between runs",
                    f"{_n(burst['accept_rate'])} vs {_n(edge_rate)} msg/s = {_pct(ratio)}",
                    ratio >= 0.8,
                )
            )
    if "3" in items:
        for backend, r in items["3"]["backends"].items():
            bare, hitl = max(r["runs"]["bare"]), max(r["runs"]["hitl-mail"])
            ratio = _ratio(hitl, bare)
            rows.append(
                (
                    f"3. outbound notifications, {backend}",
                    "≥ 80% of a bare aiosmtplib loop",
                    f"{_n(hitl)} vs {_n(bare)} msg/s = {_pct(ratio)}",
                    ratio >= 0.8,
                )
            )
    if "4" in items:
        r = items["4"]
        rows.append(
            (
                f"4. start with {r['requests']:,} pending deadlines",
                "ready within 10 s",
                f"{_n(r['spawn_to_ready'], 2)} s from spawn ({_n(r['startup_seconds'], 2)} s in `App.startup()`)",
                r["spawn_to_ready"] <= 10,
            )
        )
        rows.append(
            (
                "4. daemon peak memory",
                "< 300 MB",
                f"{_n(r['peak_rss_kb'] / 1024)} MB",
                r["peak_rss_kb"] / 1024 < 300,
            )
        )
    if "2" in items:
        llm = items["2"]["llm"]
        rows.append(
            (
                "5. LLM requests in a mixed workload",
                "one per free-text reply, none otherwise",
                f"{llm['llm_requests']} for {llm['replies']['free text']} free-text, "
                f"{llm['replies']['exact']} exact, {llm['replies']['empty']} empty",
                llm["llm_requests"] == llm["expected"],
            )
        )
    return rows


def section_inbound(r: dict[str, Any]) -> list[str]:
    bare = {m["clients"]: m for m in r["servers"]["bare aiosmtpd"]}
    out = [
        "## 1. Inbound accept throughput",
        "",
        f"Closed loop, {r['seconds']:.0f} s per point after a warm-up, best of {r['reps']} "
        "interleaved repetitions. Latency is from the end of DATA (the final `.` sent) to the reply. "
        "CPU is the server process's own user + system time per accepted message.",
        "",
        "| server | clients | msg/s | vs bare | p50 ms | p99 ms | server CPU ms/msg | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in r["servers"].items():
        for m in runs:
            out.append(
                f"| {name} | {m['clients']} | {_n(m['rate'])} | "
                f"{_pct(_ratio(m['rate'], bare[m['clients']]['rate']))} | {_n(m['p50_ms'], 2)} | "
                f"{_n(m['p99_ms'], 2)} | {_n(m['server_cpu_ms_per_msg'], 2)} | {m['errors']} |"
            )
    return [*out, ""]


def section_resume(r: dict[str, Any]) -> list[str]:
    c, s, b = r["ceiling"], r["steady"], r["burst"]
    idle, draining = r["probe_idle"], b["probe_draining"]
    return [
        "## 2. Reply → resumed",
        "",
        f'Ceiling: crewAI\'s own `TrivialFlow.from_pending(...).resume("")` loop, {c["workers"]} '
        f"processes (the daemon's `resume_workers`), {c['count']:,} flows: **{_n(c['rate'], 1)}/s** "
        f"(one restore + resume p50 {_n(c['p50_ms'], 1)} ms, p99 {_n(c['p99_ms'], 1)} ms).",
        "",
        "| measurement | figure |",
        "|---|---|",
        f"| steady load (half the ceiling) | {s['sent']:,} replies at {_n(s['achieved_rate'], 1)}/s |",
        f"| 250 → resumed, steady | p50 {_n(s['p50_ms'])} ms, p99 {_n(s['p99_ms'])} ms, max {_n(s['max_ms'])} ms |",
        f"| burst sent | {b['count']:,} replies, 8 clients: {b['accepted']:,} accepted at {_n(b['accept_rate'])}/s "
        f"(p50 {_n(b['accept_p50_ms'], 1)} ms, p99 {_n(b['accept_p99_ms'], 1)} ms), {b['errors']} errors |",
        *(
            [
                f"| the same burst to the edge alone | {a['sent']:,} replies, 8 clients, no daemon behind it: "
                f"{_n(a['rate'])}/s (p50 {_n(a['p50_ms'], 1)} ms, p99 {_n(a['p99_ms'], 1)} ms), {a['errors']} errors |"
            ]
            if (a := r.get("edge_alone"))
            else []
        ),
        f"| backlog when the burst ended | {b['backlog_after_burst']:,} stored replies not yet answered |",
        f"| drained | {b['resumed']:,} resumed, {b['failed']} failed, in {_n(b['drain_seconds'], 1)} s "
        f"from the first reply of the burst: **{_n(b['drained_rate'], 1)}/s** "
        f"({_pct(_ratio(b['drained_rate'], c['rate']))} of the ceiling) |",
        f"| none lost | {b['confirmations']:,} confirmations at the sink, {b['inbound_left']} stored replies left |",
        *(
            [
                f"| CPU per reply during the burst only | SMTP listener {_n(c_b['listener'], 2)} ms, "
                f"daemon process {_n(c_b['daemon'], 2)} ms, resume workers {_n(c_b['workers'], 2)} ms |"
            ]
            if (c_b := b.get("cpu_ms_per_reply_during_burst"))
            else []
        ),
        f"| CPU per reply during burst + drain | daemon process {_n(b.get('daemon_cpu_ms_per_reply'), 1)} ms "
        f"(answering, sending, recording), its SMTP listener and resume workers {_n(b.get('workers_cpu_ms_per_reply'), 1)} ms |",
        f"| 250s, idle daemon | {idle['sent']} replies, 8 clients: {_n(idle['rate'])}/s, p50 {_n(idle['p50_ms'], 1)} ms, p99 {_n(idle['p99_ms'], 1)} ms |",
        f"| 250s while draining | {draining['sent']} replies, 8 clients: {_n(draining['rate'])}/s, p50 {_n(draining['p50_ms'], 1)} ms, p99 {_n(draining['p99_ms'], 1)} ms |",
        "",
    ]


def section_outbound(r: dict[str, Any]) -> list[str]:
    out = [
        "## 3. Outbound notification throughput",
        "",
        f"{r['count']:,} notifications per run, one reused connection, best of {r['reps']} "
        "alternating runs.",
        "",
        "| database | bare aiosmtplib msg/s | hitl-mail msg/s | ratio | sender CPU ms/msg, bare / hitl-mail | message bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backend, x in r["backends"].items():
        bare, hitl = max(x["runs"]["bare"]), max(x["runs"]["hitl-mail"])
        cpu = x.get("cpu_ms_per_message", {})
        out.append(
            f"| {backend} | {_n(bare)} | {_n(hitl)} | {_pct(_ratio(hitl, bare))} | "
            f"{_n(cpu.get('bare'), 2)} / {_n(cpu.get('hitl-mail'), 2)} | {_n(x['bytes'])} |"
        )
    return [*out, ""]


def section_timers(r: dict[str, Any]) -> list[str]:
    workers = ", ".join(f"{_n(kb / 1024)} MB" for kb in r["worker_peak_rss_kb"])
    return [
        "## 4. Timer scale",
        "",
        f"{r['requests']:,} pending requests with an auto-response deadline each (SQLite; rows "
        f"inserted in bulk in {_n(r['seed_seconds'], 1)} s).",
        "",
        "| measurement | figure |",
        "|---|---|",
        f"| process spawn → ready | {_n(r['spawn_to_ready'], 2)} s |",
        f"| `App.startup()` | {_n(r['startup_seconds'], 2)} s |",
        f"| daemon peak RSS (ready + 3 s of running stages) | {_n(r['peak_rss_kb'] / 1024)} MB "
        f"(at ready: {_n(r['ready_rss_kb'] / 1024)} MB) |",
        f"| resume workers' peak RSS (crewAI imported; separate processes) | {workers} |",
        "",
    ]


def section_llm(r: dict[str, Any]) -> list[str]:
    llm = r["llm"]
    return [
        "## 5. LLM requests",
        "",
        "Counted by the fake OpenAI-compatible server (tests/llm_server.py), which is also "
        "`OPENAI_API_BASE` of the daemon and its workers, so a call crewAI made on resume "
        "would be counted too.",
        "",
        "| replies | count |",
        "|---|---:|",
        *(f"| {kind} | {n} |" for kind, n in llm["replies"].items()),
        f"| **LLM requests** | **{llm['llm_requests']}** (expected {llm['expected']}) |",
        f"| requests resumed | {llm['resumed']} |",
        "",
    ]


def before_after(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    rows_before = {g[0]: g[2] for g in goals(before.get("items", {}))}
    out = [
        "## Before and after the changes",
        "",
        f"`{before['command']}` with the code before the changes (`--baseline`), "
        f"{before['started']}; load average then {', '.join(f'{x:.1f}' for x in before['load_before'])}.",
        "",
        "| goal | before | after |",
        "|---|---|---|",
    ]
    for name, _, measured, _ in goals(now["items"]):
        out.append(f"| {name} | {rows_before.get(name, '–')} | {measured} |")
    return [*out, ""]


def write_report(results: dict[str, Any], path: Path) -> None:
    items = results["items"]
    v = results["versions"]
    m = results["machine"]
    lines = [
        "# hitl-mail benchmarks",
        "",
        f"Written by `{results['command']}` on {results['started']} in {results['seconds']:.0f} s "
        f"({'quick smoke run' if results['quick'] else 'full run'}).",
        "",
        *(
            [
                f"**Over the 10-minute budget:** {results['seconds']:.0f} s. Item 2's burst drains "
                "at the daemon's pace (below), and other work on this shared machine slowed it.",
                "",
            ]
            if results["seconds"] > 600
            else []
        ),
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_mb']:,} MB, Linux {m['kernel']}. "
        f"Load average before / after: {', '.join(f'{x:.1f}' for x in results['load_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in results['load_after'])} (a shared machine: other work ran "
        "beside this one, so absolute figures move between runs; ratios are measured side by side).",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        "Every server under test (bare aiosmtpd, hitl-mail's SMTP edge, `hitl-mail serve`, the "
        "relay sink, the fake LLM) runs in a process of its own, and so does the load generator "
        "(aiosmtplib, one reused connection per client, 3.4 KB multipart replies with a quoted "
        "notification, signature and DKIM/Received headers): on 2 cores they share the CPU, which "
        "is what a single-host deployment does too. Every load loop is bounded in count and time; "
        "all traffic is on 127.0.0.1. SQLite runs with WAL, `synchronous=FULL` and `BEGIN "
        "IMMEDIATE` (the daemon's settings).",
        "",
        "## Goals",
        "",
        "| goal | target | measured | |",
        "|---|---|---|---|",
        *(f"| {g} | {t} | {mes} | {_ok(ok)} |" for g, t, mes, ok in goals(items)),
        "",
    ]
    if "1" in items:
        lines += section_inbound(items["1"])
    if "2" in items:
        lines += section_resume(items["2"])
    if "3" in items:
        lines += section_outbound(items["3"])
    if "4" in items:
        lines += section_timers(items["4"])
    if "2" in items:
        lines += section_llm(items["2"])
    baseline = BENCH / "results" / "baseline.json"
    if (
        baseline.exists()
        and not results.get("baseline")
        and json.loads(baseline.read_text()).get("quick") == results["quick"]
    ):
        lines += before_after(results, json.loads(baseline.read_text()))
    for name in STANDALONE:  # each written by its own command (see write_standalone)
        written = BENCH / "results" / f"{name}.md"
        if written.exists():
            lines += [_marked(name, written.read_text()), ""]
    findings = BENCH / "findings.md"
    if findings.exists():
        lines += [findings.read_text().rstrip(), ""]
    path.write_text("\n".join(lines))


# Benchmarks run on their own, not by `bench.run`: each keeps its section of
# RESULTS.md in results/NAME.md, and a full run's rewrite puts them back.
STANDALONE = ("burst", "workers", "fuzz")


def _marked(name: str, text: str) -> str:
    return f"<!-- bench.{name} -->\n{text.strip()}\n<!-- /bench.{name} -->"


def write_standalone(name: str, text: str, path: Path | None = None) -> None:
    """Store a standalone benchmark's section and put it into RESULTS.md in place.

    The section replaces the one between its markers, or, the first time,
    goes before the hand-written findings (or at the end).
    """
    assert name in STANDALONE, name
    (BENCH / "results" / f"{name}.md").write_text(text.strip() + "\n")
    path = path or BENCH / "RESULTS.md"
    current = path.read_text() if path.exists() else ""
    begin, end = f"<!-- bench.{name} -->", f"<!-- /bench.{name} -->"
    if begin in current and end in current:
        head, _, rest = current.partition(begin)
        tail = rest.partition(end)[2].lstrip("\n")
    else:
        at = current.find("\n## What the profiles showed")
        head, tail = (current, "") if at < 0 else (current[: at + 1], current[at + 1 :])
    path.write_text(f"{head.rstrip()}\n\n{_marked(name, text)}\n\n{tail}".rstrip() + "\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--compare"]:  # before.json after.json → a Markdown table
        before_run, after_run = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        print("\n".join(before_after(after_run, before_run)))
    else:
        write_report(
            json.loads((BENCH / "results" / "latest.json").read_text()), BENCH / "RESULTS.md"
        )
