"""What every benchmark shares: configuration files, seeded rows, reply bytes, child processes, figures.

Rows are seeded in bulk with SQLAlchemy core (`seed_requests`, `seed_timers`):
creating 100,000 requests one `intake.create_request` at a time would take
longer than the whole run may. The rows are what `intake` would have written:
a pending request with its signed token, notification Message-ID and, for
item 2, the flow state and pending context of a real paused `TrivialFlow`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
SECRET = "bench-secret-key-0123456789abcdef"
ASSIGNEE = "owner@example.com"
REPLY_DOMAIN = "reply.example.com"
FLOW_CLASS = "bench.trivial_flow.TrivialFlow"
PG_ADMIN_URL = os.environ.get(
    "HITL_MAIL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
QUIET_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "OPENAI_API_KEY": "bench-key",
    "PYTHONPATH": str(ROOT),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every benchmark process.

    With $HITL_MAIL_BENCH_CODE (set by `run.py --baseline DIR`), `hitl_mail`
    is imported from DIR instead of this checkout: the same benchmarks on
    the code before a change.
    """
    env = {**os.environ, **QUIET_ENV, **extra}
    code = os.environ.get("HITL_MAIL_BENCH_CODE")
    if code:
        env["PYTHONPATH"] = f"{code}{os.pathsep}{ROOT}"
        # `python -m` puts the working directory (this checkout) first on sys.path,
        # ahead of PYTHONPATH, so without this the checkout's hitl_mail would win.
        env["PYTHONSAFEPATH"] = "1"
    return env


# -- configuration ------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    database_url: str,
    smtp_port: int,
    relay_port: int,
    llm_url: str = "http://127.0.0.1:9/v1",
    resume_workers: int = 2,
    extra: str = "",
) -> Path:
    path.write_text(
        f"""
[daemon]
database_url = "{database_url}"
secret_key = "{SECRET}"
resume_workers = {resume_workers}
shutdown_timeout = "10s"

[inbound]
host = "127.0.0.1"
port = {smtp_port}
reply_domain = "{REPLY_DOMAIN}"

[outbound]
host = "127.0.0.1"
port = {relay_port}
from_address = "Reviews <reviews@example.com>"
timeout = "10s"

[llm]
model = "gpt-4o-mini"
api_base = "{llm_url}"
api_key = "bench-key"
timeout = "10s"
retries = 0

[routing]
default_assignee = "{ASSIGNEE}"

[flows]
import_paths = ["{ROOT}"]
{extra}
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def postgres_database(label: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one benchmark, dropped afterwards."""
    import sqlalchemy as sa

    name = f"hitl_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def postgres_available() -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        engine.connect().close()
        engine.dispose()
    except Exception:
        return False
    return True


# -- seeded rows ----------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """One pending request as a replier sees it."""

    request_id: str
    reply_to: str
    notification_id: str


def migrate(database_url: str) -> None:
    """Create or upgrade the schema with the hitl_mail under test (a `--baseline` may be older)."""
    subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys; from hitl_mail.store import Store; Store(sys.argv[1]).migrate()",
            database_url,
        ],
        env=child_env(),
        cwd=ROOT,
        check=True,
        timeout=120,
    )


def seed_requests(
    database_url: str,
    count: int,
    *,
    context: dict[str, Any] | None = None,
    deadline_in: timedelta | None = None,
    chunk: int = 5000,
) -> list[Seeded]:
    """Insert `count` pending requests (and, with `deadline_in`, one auto timer each)."""
    import sqlalchemy as sa

    from hitl_mail import compose, tokens
    from hitl_mail.models import FeedbackRequest, Timer, utcnow
    from hitl_mail.store import Store

    migrate(database_url)
    store = Store(database_url)
    now = utcnow()
    base = context or {
        "flow_class": "nowhere.Flow",
        "method_name": "review",
        "message": "Approve?",
        "method_output": "A short draft.",
        "emit": ["approved", "rejected"],
        "default_outcome": "approved",
        "llm": "gpt-4o-mini",
        "metadata": {},
    }
    seeded: list[Seeded] = []
    requests = FeedbackRequest.__table__  # type: ignore[attr-defined]
    timers = Timer.__table__  # type: ignore[attr-defined]
    with store.engine.begin() as conn:
        for start in range(0, count, chunk):
            rows, timer_rows = [], []
            for i in range(start, min(start + chunk, count)):
                request_id = tokens.new_request_id()
                flow_id = str(uuid.uuid4())
                token = tokens.mint(request_id, ASSIGNEE, [SECRET], now)
                notification_id = compose.make_message_id("example.com")
                # Deadlines spread over a day, so none falls due during the benchmark.
                deadline = now + deadline_in + timedelta(seconds=i) if deadline_in else None
                rows.append(
                    {
                        "id": request_id,
                        "status": "pending",
                        "flow_id": flow_id,
                        "flow_class": base["flow_class"],
                        "method_name": base["method_name"],
                        "message": base["message"],
                        "method_output": base["method_output"],
                        "emit": base["emit"],
                        "default_outcome": base["default_outcome"],
                        "llm": base["llm"],
                        "request_metadata": {},
                        "state": {"id": flow_id},
                        "context": {**base, "flow_id": flow_id},
                        "assigned_to": ASSIGNEE,
                        "token": token,
                        "notification_id": notification_id,
                        "created_at": now,
                        "deadline": deadline,
                        "auto_outcome": "rejected" if deadline else None,
                        "resume_attempts": 0,
                    }
                )
                if deadline is not None:
                    timer_rows.append(
                        {"request_id": request_id, "kind": "auto", "due_at": deadline}
                    )
                seeded.append(Seeded(request_id, f"reply+{token}@{REPLY_DOMAIN}", notification_id))
            conn.execute(sa.insert(requests), rows)
            if timer_rows:
                conn.execute(sa.insert(timers), timer_rows)
    store.close()
    return seeded


# -- reply bytes ----------------------------------------------------------------------

_QUOTED = """Reviews <reviews@example.com> wrote:
> TrivialFlow.review is waiting for your answer.
>
> Approve?
>
> A short draft of the quarterly budget: servers 1,200; licences 3,400;
> travel 900; training 1,100. Total 6,600, within the approved envelope.
>
> | item      | cost  |
> |-----------|-------|
> | servers   | 1,200 |
> | licences  | 3,400 |
> | travel    |   900 |
> | training  | 1,100 |
>
> Reply with one of: approved, rejected.
> Anything else you write is read by a model and mapped to one of them.
>
> This link expires in 7 days. Request id and token are in the reply address.
"""


def reply_template() -> str:
    """A realistic ~3 KB reply (text and HTML, signature, quoted notification) with slots.

    Slots: {mid} {rcpt} {sender} {thread} {first_line}. Written out once; each
    message is one `str.format`, so the load generator spends no time on MIME.
    """
    signature = "--\nAnn Example\nHead of Finance, Example Corp\n+1 555 0100\n"
    quoted_html = "".join(f"<div>{line[2:] or '<br>'}</div>\n" for line in _QUOTED.splitlines()[1:])
    html = (
        '<html><head><meta http-equiv=3D"content-type" content=3D"text/html; '
        'charset=3DUTF-8"></head><body>\n<p>{first_line}</p>\n'
        '<div class=3D"moz-signature">' + signature.replace("\n", "<br>\n") + "</div>\n"
        '<div class=3D"moz-cite-prefix">On Mon, 23 Nov 2026 at 10:02, Reviews wrote:</div>\n'
        '<blockquote type=3D"cite">\n' + quoted_html + "</blockquote></body></html>\n"
    )
    text = "{first_line}\n\n" + signature + "\nOn Mon, 23 Nov 2026 at 10:02, " + _QUOTED
    boundary = "------------bench0123456789abcdef"
    return (
        "Received: from mail.client.example.org (mail.client.example.org [192.0.2.25])\n"
        "\tby mx.example.com (Postfix) with ESMTPS id 4Zx1Lq2Hc9z9sWq\n"
        "\tfor <{rcpt}>; Mon, 23 Nov 2026 10:04:12 +0000 (UTC)\n"
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=client.example.org;\n"
        "\ts=s2026; t=1795428251; h=from:to:subject:date:message-id:in-reply-to;\n"
        "\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\n"
        "\tb=dzdVyOfAKCdLXdJOc9G2q8LoXSlEniSbav+yuU4zGeeruD00lszZVoG4ZHRNiYzR\n"
        "\t aZ4kW1sL2B8xDCp0wQ3JvnTfR9Wm7Hq1Yb5Ec6Uk8Io2Pa3Sd4Fg5Hj6Kl7Zx8Cv9Bn0M\n"
        "\t q1We2Rt3Yu4Io5Pa6Sd7Fg8Hj9Kl0Zx1Cv2Bn3Mq4We5Rt6Yu7Io8Pa9Sd0Fg1Hj2Kl=\n"
        "From: Ann Example <{sender}>\n"
        "To: {rcpt}\n"
        "Subject: Re: [Review] TrivialFlow.review: Approve?\n"
        "Date: Mon, 23 Nov 2026 10:04:11 +0000\n"
        "Message-ID: <{mid}@client.example.org>\n"
        "In-Reply-To: {thread}\n"
        "References: {thread}\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Thunderbird/128.5.0\n"
        "Content-Language: en-GB\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\n\n'
        "This is a multi-part message in MIME format.\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=UTF-8; format=flowed\n"
        "Content-Transfer-Encoding: 7bit\n\n" + text + f"\n--{boundary}\n"
        "Content-Type: text/html; charset=UTF-8\n"
        "Content-Transfer-Encoding: quoted-printable\n\n" + html + f"\n--{boundary}--\n"
    )


def reply_items(seeded: Sequence[Seeded], first_lines: Sequence[str]) -> list[list[str]]:
    """Load-generator items: [request id, reply address, sender, thread id, first line]."""
    return [
        [s.request_id, s.reply_to, ASSIGNEE, s.notification_id, first_lines[i % len(first_lines)]]
        for i, s in enumerate(seeded)
    ]


# -- child processes ----------------------------------------------------------------


class Child:
    """A benchmark process: started, read for a `PORT n` line, stopped with SIGTERM."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, port_line: bool = True
    ) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        # Only a child that prints nothing after its `PORT n` line may write to a pipe:
        # one nobody drains blocks its writer (crewAI's console panels, for one).
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE if port_line else self._log,
            stderr=self._log,
            env=env or child_env(),
            cwd=ROOT,
        )
        self.port = 0

    def wait_port(self, timeout: float = 60.0) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("PORT "):
                self.port = int(line.split()[1])
                return self.port
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"{self.log_path.name}: no port\n{self.log_path.read_text()[-2000:]}")

    def cpu_seconds(self) -> float:
        return process_cpu(self.proc.pid)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    """CPU seconds of the live descendants of `pid`: the daemon's resume workers, and its
    SMTP listener (a child of the daemon's fork server)."""
    return sum(descendants_cpu(pid).values())


def descendants_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each live descendant of `pid`, by pid."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        parent[child] = int(fields[1])
        cpu[child] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for child, seconds in cpu.items():
        ancestor = parent.get(child, 0)
        while ancestor > 1 and ancestor != pid:
            ancestor = parent.get(ancestor, 0)
        if ancestor == pid:
            found[child] = seconds
    return found


def run_json(args: list[str], *, timeout: float, log: Path | None = None) -> Any:
    """Run a benchmark child that prints one JSON document on stdout; return it."""
    out = subprocess.run(args, capture_output=True, timeout=timeout, env=child_env(), cwd=ROOT)
    if log is not None:
        log.write_bytes(out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{args[1:4]} failed:\n{out.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(out.stdout)


def loadgen(job: dict[str, Any], work: Path, name: str, timeout: float = 300.0) -> Any:
    """Run the load generator in its own process on `job` (see loadgen.py)."""
    path = work / f"{name}.job.json"
    path.write_text(json.dumps(job))
    return run_json(
        [PYTHON, "-m", "bench.loadgen", str(path)], timeout=timeout, log=work / f"{name}.log"
    )


# -- figures --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def wait_for(predicate: Any, timeout: float, interval: float = 0.25, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
