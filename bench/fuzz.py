"""Inbound fuzzing: `python -m bench.fuzz --cases 100000 [--seed 1] [--write]`.

Throws generated, mutated and deliberately hostile messages at
``replies.parse_reply`` (the whole inbound parse: strict From, charset
screen, MIME, decoding, new text) in this process, one after another, and
reports how many cases ran, how many were refused as malformed or had no
readable sender, how many raised (must be 0), the slowest case (CPU time,
what it was, its size) and the peak memory: the largest allocation peak
inside ``parse_reply`` that tracemalloc saw (it traces the large cases, or
every case with ``--trace``), and the process's maximum RSS, which also holds
what building the cases took.

Every case is reproducible on its own: case N of seed S is built from
``random.Random(f"{S}:{N}")``, so ``--case N`` rebuilds and re-runs just it.
Kinds: ``mutated`` (a reply of tests/replies/ with 1-8 mutations: hostile
byte strings inserted, ranges deleted or repeated, bytes flipped, cut short,
charset labels swapped), ``generated`` (a random MIME tree: nested multiparts
with broken or missing boundaries, attached messages, text parts in allowed,
unknown and forbidden charsets, base64 on one long line, NUL and 8-bit bytes)
and ``hostile`` (each known costly construction at a random size up to
~1 MB: punycode bodies, parameter bombs, deep nesting, huge headers, many
parts, header floods, spoofed senders). About 1 % of cases are large.

Bounded: each case gets ``--case-limit`` seconds of CPU (an overrun counts
as a failure, reported like a crash), the run stops at ``--time-limit``
seconds of wall time and says so. ``--write`` stores the figures in
bench/results/fuzz.json and the report in bench/results/fuzz.md, which
bench/report.py puts into RESULTS.md (and ``--write`` puts it there now).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import re
import resource
import signal
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from hitl_mail.replies import parse_reply

BENCH = Path(__file__).resolve().parent
CORPUS = BENCH.parent / "tests" / "replies"
SEEDS = [path.read_bytes() for path in sorted(CORPUS.glob("**/*.eml"))]
ALLOWED = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis", "gb18030"]
ALLOWED += ["iso-2022-jp", "big5", "euc-kr", "utf-16", "utf-32", "latin1", "UTF8", "cp1251"]
UNKNOWN = ["x-unknown", "unknown-8bit", "utf8mb4", "", "x-" + "a" * 60, "=?", "'"]
FORBIDDEN = ["punycode", "idna", "unicode_escape", "raw_unicode_escape", "rot13", "utf-7"]
FORBIDDEN += ["base64", "zlib_codec", "uu", "hex", "bz2", "quopri", "palmos", "mbcs"]
SCRIPTS = ["approved ", "Approuvé ", "承認します ", "Одобрено ", "批准 ", "✓ ", "> quoted\n", "\n"]
SPOOFS = [
    b"Jane <jane@example.org>", b"=?utf-8?q?Boss_=3Cboss=40corp=2Ecom=3E?= <m@x.example>",
    b"boss@corp.com <m@x.example>", b"boss@corp.com, m@x.example", b"Team: boss@corp.com;",
    b"(boss@corp.com) m@x.example", b'"boss@corp.com"@x.example', b"a@b\x00c", b"\xff <a@b.c>",
]  # fmt: skip
HOSTILE_BYTES = [
    b"\x00", b"\r", b"\n", b"\r\n\r\n", b"\xff\xfe", b"\xc3", b"=?punycode?q?abc?=", b"=?utf-8?b?",
    b"charset=idna", b'boundary="', b"--", b"(", b")", b'"', b"<", b">", b"@", b";" * 100,
    b"\r\nContent-Type: multipart/mixed; boundary=x\r\n", b"\r\nContent-Type: message/rfc822\r\n",
    b"\r\nFrom: boss@corp.com\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n", b"\r\n\t",
    b"=\r\n", b"\r\n--x\r\n", b"=?utf-8?q?=C3?=", b"<blockquote>", b"&#", b"\r\n> ",
]  # fmt: skip
HEAD = b"From: Jane <jane@example.org>\r\nTo: reply+t@reply.example.com\r\nSubject: Re: x\r\n"


@dataclass
class Case:
    kind: str
    what: str
    raw: bytes
    large: bool = False


# --- cases ----------------------------------------------------------------------------------


def build(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}:{index}")
    large = rng.random() < 0.01
    roll = rng.random()
    if roll < 0.5:
        case = mutated(rng, large)
    elif roll < 0.8:
        case = Case("generated", "MIME tree", HEAD + tree(rng, depth=0, large=large))
    else:
        name, make = rng.choice(HOSTILE)
        size = rng.randint(50_000, 1_000_000) if large else rng.randint(10, 20_000)
        case = Case("hostile", f"{name} (n={size})", make(rng, size))
    case.large = large
    return case


def mutated(rng: random.Random, large: bool) -> Case:
    seed = rng.randrange(len(SEEDS))
    raw = bytearray(SEEDS[seed])
    steps = []
    for _ in range(rng.randint(1, 8)):
        at, span = rng.randint(0, len(raw)), rng.randint(0, 300)
        op = rng.choice(["insert", "delete", "flip", "repeat", "cut", "charset", "nul"])
        steps.append(op)
        if op == "insert":
            raw[at:at] = rng.choice(HOSTILE_BYTES)
        elif op == "delete":
            del raw[at : at + span]
        elif op == "flip" and at < len(raw):
            raw[at] = rng.randrange(256)
        elif op == "repeat":
            raw[at:at] = bytes(raw[at : at + span]) * rng.randint(1, 3000 if large else 30)
        elif op == "cut":
            del raw[at:]
        elif op == "charset":
            label = rng.choice(ALLOWED + UNKNOWN + FORBIDDEN).encode()
            raw[:] = re.sub(rb"charset=\"?[^\s\";]*", b"charset=" + label, bytes(raw), count=1)
        elif op == "nul":
            raw[at:at] = b"\x00" * span
    return Case("mutated", f"corpus #{seed} + {'/'.join(steps)}", bytes(raw[:4_000_000]))


def words(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(SCRIPTS) for _ in range(count))


def tree(rng: random.Random, *, depth: int, large: bool) -> bytes:
    roll = rng.random()
    if depth < 6 and roll < 0.3:
        boundary = rng.choice(["b", "=_Part_1", "x" * 70, "", " sp ", '"q"', "b" * 200])
        written = rng.choice([boundary, boundary, boundary + "x", boundary.upper()]).encode()
        parts = [tree(rng, depth=depth + 1, large=large) for _ in range(rng.randint(0, 4))]
        subtype = rng.choice(["mixed", "alternative", "related", "report", "digest"])
        head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
        body = b"".join(b"--" + written + b"\r\n" + part for part in parts)
        closing = b"--" + written + b"--\r\n" if rng.random() < 0.7 else b""
        return head + b"preamble\r\n" + body + closing
    if depth < 6 and roll < 0.4:
        inner = tree(rng, depth=depth + 1, large=large)
        return b"Content-Type: message/rfc822\r\n\r\n" + HEAD + inner
    charset = rng.choice(ALLOWED + UNKNOWN + FORBIDDEN)
    text = words(rng, rng.randint(0, 40))
    try:
        body = text.encode(charset or "utf-8")
    except (LookupError, UnicodeError, TypeError):
        body = text.encode("utf-8")
    body += rng.choice([b"", b"\x00", b"\xff\xfe\x80", b"\r", b"\n.\n"])
    encoding = rng.choice(["8bit", "base64", "one-line-base64", "quoted-printable", "x-uuencode"])
    if encoding == "base64":
        body = base64.encodebytes(body * rng.randint(1, 50))
    elif encoding == "one-line-base64":
        body, encoding = base64.b64encode(body * rng.randint(1, 30_000 if large else 300)), "base64"
    elif encoding == "quoted-printable":
        body = body.replace(b"=", b"=3D") + b"=\r\n=ZZ=4"
    subtype = rng.choice(["plain", "plain", "html", "csv"])
    fields = f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
    fields += f"Content-Transfer-Encoding: {encoding}\r\n"
    if rng.random() < 0.1:
        fields += f"Subject: =?{rng.choice(ALLOWED + UNKNOWN + FORBIDDEN)}?q?Re=3A_x?=\r\n"
    return fields.encode() + b"\r\n" + body + b"\r\n"


def punycode_body(r: random.Random, n: int) -> bytes:
    chunk = bytes(r.choice(b"abcdefghij-") for _ in range(min(n, 4096)))
    return HEAD + b"Content-Type: text/plain; charset=punycode\r\n\r\n" + chunk * (n // 4096 + 1)


def parameter_bomb(r: random.Random, n: int) -> bytes:
    return HEAD + b'Content-Type: multipart/mixed; boundary="' + b";" * n + b'"\r\n\r\nx'


def rfc2231_boundary(r: random.Random, n: int) -> bytes:
    value = b"ab-" * (n // 3)
    return HEAD + b"Content-Type: multipart/mixed; boundary*=punycode''" + value + b"\r\n\r\nx"


def nested_multiparts(r: random.Random, n: int) -> bytes:
    levels = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(r.randint(1, 300))
    )
    return HEAD + levels + b"\r\nok\r\n" + b"\r\n" * n


def nested_messages(r: random.Random, n: int) -> bytes:
    return HEAD + b"Content-Type: message/rfc822\r\n\r\n" * min(n, 5000) + b"ok"


def huge_from(r: random.Random, n: int) -> bytes:
    return b"From: " + r.choice([b"a", b"a@", b"(", b"<", b'"', b"=?a?q?"]) * n + b"\r\n\r\nx"


def huge_references(r: random.Random, n: int) -> bytes:
    return HEAD + b"References: " + r.choice([b"<a@b> ", b"a", b"a@", b"<"]) * n + b"\r\n\r\nx"


def huge_subject(r: random.Random, n: int) -> bytes:
    word = r.choice([b"=?utf-8?q?a?= ", b"=?a?q?", b"=?utf-8?b?!!?= ", b"=?x-bogus?q?a?="])
    return b"From: a@b.example\r\nSubject: " + word * (n // 8 + 1) + b"\r\n\r\nx"


def header_flood(r: random.Random, n: int) -> bytes:
    return HEAD + b"X-A: b\r\n" * (n // 8 + 1) + b"\r\nok"


def nul_flood(r: random.Random, n: int) -> bytes:
    return HEAD + b"\x00" * n + b"\r\n\r\n" + b"\x00" * n


def long_base64_line(r: random.Random, n: int) -> bytes:
    body = base64.b64encode(b"approved " * (n // 9 + 1))
    return HEAD + b"Content-Transfer-Encoding: base64\r\n\r\n" + body


def many_parts(r: random.Random, n: int) -> bytes:
    parts = b"--b\r\n\r\nx\r\n" * (n // 11 + 1)
    return HEAD + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"


def tag_bomb(r: random.Random, n: int) -> bytes:
    tag = r.choice([b"<div>", b"<a ", b"<!--", b"<blockquote>", b"&#", b'<p id="'])
    return HEAD + b"Content-Type: text/html\r\n\r\n" + tag * (n // 4 + 1)


def header_garbage(r: random.Random, n: int) -> bytes:
    junk = bytes(byte | 0x80 for byte in r.randbytes(min(n, 20_000)))
    return HEAD + b"X-Junk: " + junk + b"\r\n\r\nok"


def quoted_history(r: random.Random, n: int) -> bytes:
    return HEAD + b"\r\nok\r\n" + b"> On Mon, x wrote:\r\n" * (n // 20 + 1)


def spoofed_senders(r: random.Random, n: int) -> bytes:
    froms = b"".join(b"From: " + r.choice(SPOOFS) + b"\r\n" for _ in range(r.randint(1, 3)))
    return froms + b"Subject: x\r\n\r\napproved\r\n"


def uuencoded(r: random.Random, n: int) -> bytes:
    lines = b"M" + b"a" * 60 + b"\r\n" * (n // 62 + 1)
    return (
        HEAD + b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n" + lines + b"end\r\n"
    )


HOSTILE: list[tuple[str, Callable[[random.Random, int], bytes]]] = [
    ("punycode body", punycode_body),
    ("quoted ';' parameter bomb", parameter_bomb),
    ("RFC 2231 punycode boundary", rfc2231_boundary),
    ("nested multiparts + lines", nested_multiparts),
    ("nested message/rfc822", nested_messages),
    ("huge From", huge_from),
    ("huge References", huge_references),
    ("huge Subject of encoded words", huge_subject),
    ("header flood", header_flood),
    ("NUL flood", nul_flood),
    ("one long base64 line", long_base64_line),
    ("many parts", many_parts),
    ("HTML tag bomb", tag_bomb),
    ("8-bit header garbage", header_garbage),
    ("long quoted history", quoted_history),
    ("spoofed senders", spoofed_senders),
    ("uuencoded body", uuencoded),
]


# --- running --------------------------------------------------------------------------------


class Overrun(Exception):
    pass


def _overrun(signum: int, frame: FrameType | None) -> None:
    raise Overrun


def run_case(case: Case, limit: float) -> tuple[float, Any, str | None]:
    """CPU seconds, the ParsedReply (or None), and the error's traceback if it raised."""
    signal.setitimer(signal.ITIMER_PROF, limit)
    start = time.process_time()
    try:
        reply = parse_reply(case.raw, envelope_from="jane@example.org")
        error = None
    except BaseException as exc:  # a crash is what we count
        if isinstance(exc, KeyboardInterrupt):
            raise
        reply, error = None, traceback.format_exc(limit=-4)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return time.process_time() - start, reply, error


@dataclass
class Tally:
    """What the cases came to."""

    counts: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[tuple[float, int, str, int]] = field(default_factory=list)  # 5, slowest last
    cpu: float = 0.0

    def add(self, index: int, case: Case, seconds: float, reply: Any, error: str | None) -> None:
        self.cpu += seconds
        self.kinds[case.kind] += 1
        self.counts["cases"] += 1
        self.counts["bytes"] += len(case.raw)
        what = f"{case.kind}: {case.what}"
        if error is not None:
            self.counts["crashes"] += 1
            self.crashes.append({"case": index, "what": what, "error": error})
        else:
            self.counts["malformed"] += reply.malformed is not None
            self.counts["no_sender"] += reply.from_address is None
            self.counts["with_text"] += bool(reply.first_line)
        if len(self.slowest) < 5 or seconds > self.slowest[0][0]:
            self.slowest = sorted([*self.slowest, (seconds, index, what, len(case.raw))])[-5:]


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    signal.signal(signal.SIGPROF, _overrun)
    started, wall = datetime.now(UTC), time.monotonic()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tally, stopped = Tally(), None
    traced: tuple[int, int, str] = (0, -1, "-")  # the largest peak: bytes, case, what
    for index in range(args.cases):
        if time.monotonic() - wall > args.time_limit:
            stopped = f"time limit of {args.time_limit:.0f} s reached after {index:,} cases"
            break
        case = build(args.seed, index)
        tally.add(index, case, *run_case(case, args.case_limit))
        if args.trace or case.large:  # again, traced: tracing slows what the timing measured
            tracemalloc.start()
            run_case(case, args.case_limit * 10)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            traced = max(traced, (peak, index, f"{case.kind}: {case.what}"))
        if args.progress and index and index % args.progress == 0:
            print(f"  {index:,} cases, {time.monotonic() - wall:.0f} s", file=sys.stderr)
    return {
        "command": "python -m bench.fuzz " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - wall, 1),
        "cpu_seconds": round(tally.cpu, 1),
        "seed": args.seed,
        "counts": dict(tally.counts),
        "kinds": dict(tally.kinds),
        "crashes": tally.crashes[:20],
        "slowest": [
            {"seconds": round(s, 4), "case": i, "what": w, "bytes": b}
            for s, i, w, b in reversed(tally.slowest)
        ],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "start_rss_mb": round(rss_start / 1024, 1),
        "traced_peak_mb": round(traced[0] / 2**20, 1),
        "traced_peak_case": {"case": traced[1], "what": traced[2]},
        "traced": "every case" if args.trace else "the large cases",
        "stopped": stopped,
        "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}",
        "load": [round(x, 1) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def report(r: dict[str, Any]) -> str:
    c, kinds = r["counts"], ", ".join(f"{k} {v:,}" for k, v in sorted(r["kinds"].items()))
    slowest = [
        f"{s['seconds'] * 1000:,.0f} ms CPU: case {s['case']}, {s['what']}, {s['bytes']:,} bytes"
        for s in r["slowest"]
    ]
    at = r["traced_peak_case"]
    memory = (
        f"{r['traced_peak_mb']:,} MB at most allocated inside `parse_reply` (traced on"
        f" {r['traced']}; case {at['case']}, {at['what']}); the process's max RSS"
        f" {r['peak_rss_mb']:,} MB ({r['start_rss_mb']:,} MB after imports; building the"
        " cases counts there too)"
    )
    lines = [
        "## Inbound fuzzing",
        "",
        f"`{r['command']}` on {r['started']}: {r['seconds']:,.0f} s wall, {r['cpu_seconds']:,.0f} s"
        f" CPU inside `parse_reply` ({r['machine']}, load average {r['load'][0]} at the end;"
        f" Python {r['python']}). Case N is rebuilt and re-run alone with"
        f" `python -m bench.fuzz --seed {r['seed']} --case N`; bench/fuzz.py describes the kinds.",
        "",
        "| | |",
        "|---|---|",
        f"| cases | {c.get('cases', 0):,} ({kinds}), {c.get('bytes', 0) / 2**20:,.0f} MiB in all |",
        f"| refused as malformed | {c.get('malformed', 0):,} |",
        f"| no readable sender (refused as wrong_sender) | {c.get('no_sender', 0):,} |",
        f"| with a first line | {c.get('with_text', 0):,} |",
        f"| crashes and overruns | **{c.get('crashes', 0)}** |",
        f"| slowest case | {slowest[0] if slowest else '-'} |",
        f"| peak memory | {memory} |",
        "",
        "The next slowest: " + "; ".join(slowest[1:]) + ".",
    ]
    if r["stopped"]:
        lines += ["", f"**Stopped early:** {r['stopped']}."]
    for crash in r["crashes"]:
        lines += ["", f"Crash in case {crash['case']} ({crash['what']}):", "```", crash["error"]]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def write(r: dict[str, Any], text: str) -> None:
    from bench.report import write_standalone

    (BENCH / "results" / "fuzz.json").write_text(json.dumps(r, indent=2) + "\n")
    write_standalone("fuzz", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--case", type=int, help="rebuild and run this one case, and say what it is"
    )
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds of wall time")
    parser.add_argument("--case-limit", type=float, default=10.0, help="CPU seconds per case")
    parser.add_argument("--trace", action="store_true", help="tracemalloc each case (slower)")
    parser.add_argument("--progress", type=int, default=10_000)
    parser.add_argument("--write", action="store_true", help="store results, update RESULTS.md")
    args = parser.parse_args()
    if args.case is not None:
        signal.signal(signal.SIGPROF, _overrun)
        case = build(args.seed, args.case)
        seconds, reply, error = run_case(case, args.case_limit)
        print(
            f"case {args.case}: {case.kind}: {case.what}, {len(case.raw):,} bytes, {seconds:.4f} s"
        )
        print(error or reply)
        return
    results = fuzz(args)
    text = report(results)
    print(text)
    if args.write:
        write(results, text)
    sys.exit(1 if results["counts"].get("crashes") else 0)


if __name__ == "__main__":
    main()
