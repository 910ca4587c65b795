"""Fixtures: real servers on loopback, a real database, real daemon and flow processes.

The database is SQLite by default; with HITL_MAIL_TEST_DB=postgres every test
gets a fresh PostgreSQL database on the server named by HITL_MAIL_TEST_PG_URL
(the suite is run once per backend by .ci/run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

TESTS = Path(__file__).parent
FLOWS = TESTS / "flows"
sys.path.insert(0, str(TESTS))

from llm_server import FakeLLMServer  # noqa: E402

from hitl_mail import outcomes  # noqa: E402
from hitl_mail.models import FeedbackRequest, RequestStatus, utcnow  # noqa: E402
from hitl_mail.resume import Resumer  # noqa: E402
from hitl_mail.store import Store  # noqa: E402

PG_URL = os.environ.get("HITL_MAIL_TEST_PG_URL", "")
BACKEND = os.environ.get("HITL_MAIL_TEST_DB", "sqlite")
QUIET_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "OTEL_SDK_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "OPENAI_API_KEY": "test-key",
}
os.environ.update(QUIET_ENV)
# Every process this session starts inherits the mark, however far it is re-parented:
# the session's end checks that none is left (`pytest_sessionfinish`).
TEST_RUN_MARK = ("HITL_MAIL_TEST_RUN", uuid.uuid4().hex)
os.environ[TEST_RUN_MARK[0]] = TEST_RUN_MARK[1]

# A daemon started in this process imports litellm in a background thread. On
# Python 3.11 that import racing pytest's own ast.parse (when it renders a
# failure) can raise "AST constructor recursion depth mismatch" in either
# thread, so import it here, once, before any test runs.
outcomes.preload()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def self_signed(directory: Path, common_name: str, *, ip: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as PEM files in `directory`: (cert, key).

    With `ip`, the certificate names that address and may act as its own CA,
    so a client can be told to trust it (verified TLS to a loopback relay).
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- database ---------------------------------------------------------------------


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    if BACKEND != "postgres":
        yield f"sqlite:///{tmp_path / 'hitl.db'}"
        return
    if not PG_URL:
        pytest.skip("HITL_MAIL_TEST_DB=postgres but HITL_MAIL_TEST_PG_URL is not set")
    import sqlalchemy as sa

    name = f"hitl_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated `Store` on the test database, for tests below the daemon."""
    store = Store(database_url)
    store.migrate()
    yield store
    store.close()


# -- mail sink --------------------------------------------------------------------


@dataclass
class MailSink:
    """A real aiosmtpd server on loopback that keeps every message it receives."""

    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append((envelope.mail_from or "", list(envelope.rcpt_tos)))
        self.messages.append(
            message_from_bytes(envelope.original_content or b"", policy=policy.default)
        )  # type: ignore[arg-type]
        return "250 OK"

    def start(self) -> None:
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, decode_data=False)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def of(self, event: str, request_id: str | None = None) -> list[EmailMessage]:
        return [
            m
            for m in self.messages
            if m["X-HITL-Event"] == event
            and (request_id is None or m["X-HITL-Request-Id"] == request_id)
        ]

    def wait_for(
        self, event: str, request_id: str | None = None, count: int = 1, timeout: float = 30.0
    ) -> list[EmailMessage]:
        return wait_until(
            lambda: (found := self.of(event, request_id)) and len(found) >= count and found,
            timeout,
            what=f"{count} {event} email(s) for {request_id}",
        )


@pytest.fixture
def mail_sink() -> Iterator[MailSink]:
    sink = MailSink(free_port())
    sink.start()
    yield sink
    sink.stop()


# -- LLM -------------------------------------------------------------------------------


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


# -- configuration ------------------------------------------------------------------------


SECRET = "test-secret-key-0123456789abcdef"


def write_config(
    path: Path, *, database_url: str, smtp_port: int, relay_port: int, llm_url: str, extra: str = ""
) -> Path:
    path.write_text(
        f"""
[daemon]
database_url = "{database_url}"
secret_key = "{SECRET}"
poll_interval = "100ms"
resume_workers = 2
shutdown_timeout = "10s"

[inbound]
host = "127.0.0.1"
port = {smtp_port}
reply_domain = "reply.example.com"
max_message_size = "200KB"

[outbound]
host = "127.0.0.1"
port = {relay_port}
from_address = "Reviews <reviews@example.com>"
timeout = "5s"
retry_initial = "500ms"
retry_max = "2s"

[llm]
model = "gpt-4o-mini"
api_base = "{llm_url}"
api_key = "test-key"
timeout = "5s"
retries = 1

[routing]
default_assignee = "owner@example.com"

[flows]
import_paths = ["{FLOWS}"]
{extra}
""",
        encoding="utf-8",
    )
    return path


@dataclass
class Setup:
    """Everything one end-to-end test works with."""

    tmp: Path
    config: Path
    smtp_port: int
    sink: MailSink
    llm: FakeLLMServer
    events_file: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HITL_MAIL_CONFIG": str(self.config),
            "HITL_TEST_EVENTS": str(self.events_file),
            "PYTHONPATH": str(FLOWS),
        }

    # daemon
    def start_daemon(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"daemon-{len(self.processes)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hitl_mail.cli", "serve", "--config", str(self.config)],
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(proc)
        wait_until(
            lambda: _accepts(self.smtp_port) or proc.poll() is not None, 60, what="daemon SMTP port"
        )
        assert proc.poll() is None, self.daemon_log()
        return proc

    def stop_daemon(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        proc.send_signal(sig)
        return proc.wait(timeout=30)

    def daemon_log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp.glob("daemon-*.log"))
        )

    # flows
    def kickoff(
        self, inputs: dict[str, Any] | None = None, flow: str = "ReviewFlow"
    ) -> dict[str, Any]:
        return self.kickoff_many(1, inputs, flow)[0]

    def kickoff_many(
        self, count: int, inputs: dict[str, Any] | None = None, flow: str = "ReviewFlow"
    ) -> list[dict[str, Any]]:
        """Start `count` flows in ONE process (crewAI's import is paid once) until each pauses."""
        args = f"json.loads({json.dumps(json.dumps(inputs or {}))}), {count}, {flow!r}"
        code = f"import review_flows, json; review_flows.kickoff({args})"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            timeout=180,
            cwd=self.tmp,
        )
        assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
        lines = [line for line in out.stdout.decode().splitlines() if line.startswith("{")]
        return [json.loads(line) for line in lines[-count:]]

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        return [
            json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()
        ]

    def wait_event(self, name: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        return wait_until(
            lambda: (
                len(found := [e for e in self.events() if e["event"] == name]) >= count and found
            ),
            timeout,
            what=f"flow event {name!r}\n{self.daemon_log()[-3000:]}",
        )

    # CLI
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hitl_mail.cli", *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def show(self, request_id: str) -> dict[str, Any]:
        out = self.cli("requests", "show", request_id, "--json")
        assert out.returncode == 0, out.stderr
        data: dict[str, Any] = json.loads(out.stdout)
        return data


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


@pytest.fixture
def setup(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> Iterator[Setup]:
    smtp_port = free_port()
    config = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=smtp_port,
        relay_port=mail_sink.port,
        llm_url=llm.url,
    )
    s = Setup(tmp_path, config, smtp_port, mail_sink, llm, tmp_path / "events.jsonl")
    yield s
    for proc in s.processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- in-process requests ----------------------------------------------------------------


def add_request(
    store: Store, request_id: str, status: str = RequestStatus.PENDING, **values: Any
) -> None:
    """A bare request row (no notification, no flow state) for tests of the store and stages."""
    store.add(
        FeedbackRequest(
            id=request_id,
            status=status,
            flow_id=f"flow-{request_id}",
            flow_class="review_flows.ReviewFlow",
            method_name="review",
            created_at=utcnow(),
            **values,
        )
    )


def request_context(**changes: Any) -> dict[str, Any]:
    """A pending context as crewAI builds it, for creating requests without running a flow."""
    context: dict[str, Any] = {
        "flow_id": "f1",
        "flow_class": "review_flows.ReviewFlow",
        "method_name": "review",
        "message": "Approve?",
        "method_output": "text",
        "emit": ["approved", "rejected", "needs_revision"],
        "default_outcome": None,
        "llm": "gpt-4o-mini",
        "metadata": {},
    }
    return {**context, **changes}


async def until(check: Callable[[], Any], what: str = "condition", timeout: float = 15.0) -> Any:
    """Poll `check` (a blocking call, run off the loop) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class ResumeParked(Resumer):
    """The real resume stage, parked: an answered request stays `answered`.

    Resuming is test_end_to_end's business; here it would only start worker
    processes (each importing crewAI) and move the status on under the asserts.
    """

    def warm_up(self) -> None:
        return None

    async def run(self, stopping: asyncio.Event) -> None:
        await stopping.wait()


# -- replying ---------------------------------------------------------------------------------


def reply_to(
    notification: EmailMessage,
    body: str,
    *,
    sender: str | None = None,
    headers: dict[str, str] | None = None,
    to: str | None = None,
) -> EmailMessage:
    """A reply as a mail client writes it: threaded, quoting the notification below."""
    # Unfolded, as mail clients write threading headers (never as RFC 2047 words).
    reply = EmailMessage(policy=policy.default.clone(max_line_length=998))
    reply["From"] = sender or str(notification["To"])
    reply["To"] = to or str(notification["Reply-To"])
    reply["Subject"] = "Re: " + str(notification["Subject"])
    reply["Message-ID"] = f"<{uuid.uuid4().hex}@client.example.org>"
    reply["In-Reply-To"] = str(notification["Message-ID"])
    reply["References"] = str(notification["Message-ID"])
    for name, value in (headers or {}).items():
        reply[name] = value
    quoted = "\n".join(
        "> " + line for line in "Approve the budget?\nReply with one of ...".splitlines()
    )
    reply.set_content(
        f"{body}\n\nOn Mon, 23 Nov 2026 at 10:02, Reviews <reviews@example.com> wrote:\n{quoted}\n"
    )
    return reply


def send(
    port: int,
    message: EmailMessage,
    *,
    envelope_from: str | None = None,
    recipients: list[str] | None = None,
) -> None:
    async def go() -> None:
        await aiosmtplib.send(
            message,
            hostname="127.0.0.1",
            port=port,
            sender=envelope_from if envelope_from is not None else None,
            recipients=recipients,
            timeout=30,
        )

    asyncio.run(go())


def send_async_many(port: int, messages: list[EmailMessage]) -> list[BaseException | None]:
    async def one(message: EmailMessage) -> BaseException | None:
        try:
            await aiosmtplib.send(message, hostname="127.0.0.1", port=port, timeout=30)
        except Exception as exc:
            return exc
        return None

    async def go() -> list[BaseException | None]:
        return list(await asyncio.gather(*(one(m) for m in messages)))

    return asyncio.run(go())


def run_in_thread(fn: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


# -- processes ---------------------------------------------------------------------------


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every running process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Children, grandchildren, ... of `pid`, running now."""
    children: dict[int, list[int]] = {}
    for child, parent in process_parents().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def marked(name: str, value: str) -> set[int]:
    """Running processes started with `name=value` in their environment, wherever they are now."""
    needle = f"{name}={value}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return {pid for pid in found if running(pid)}


def describe_process(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        parent = process_parents().get(pid)
    except OSError:
        return f"{pid} (ended)"
    return f"pid {pid} (parent {parent}): {cmdline.strip()[:300]}"


def _ends_with_this_process(pid: int) -> bool:
    """multiprocessing's fork server and resource tracker of this process: they end when it does."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return process_parents().get(pid) == os.getpid() and (
        b"from multiprocessing.forkserver import main" in cmdline
        or b"from multiprocessing.resource_tracker import main" in cmdline
    )


def leftover_processes(grace: float = 10.0) -> list[int]:
    """Processes this session started that are still running after `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        left = (marked(*TEST_RUN_MARK) | descendants(os.getpid())) - {os.getpid()}
        left = {pid for pid in left if not _safe(_ends_with_this_process, pid)}
        if not left or time.monotonic() > deadline:
            return sorted(left)
        time.sleep(0.2)


def _safe(check: Callable[[int], bool], pid: int) -> bool:
    try:
        return check(pid)
    except OSError:
        return True  # ended meanwhile: not left


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collect what tests left for the garbage collector, then fail the run if a process is left.

    Engines of stores a test did not close still hold pooled PostgreSQL
    connections; collected after the session, their ResourceWarning would fail
    a run whose tests all passed. Leaks inside a test still fail that test.

    Every process a test started (a daemon, its listener, resume workers, a
    flow) must have ended: one that outlives the suite would outlive a crashed
    daemon in production too.
    """
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    left = leftover_processes()
    if left:
        print("\nprocesses started by this test run are still running:", file=sys.stderr)
        for pid in left:
            print(f"  {describe_process(pid)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
