"""The processes `serve` starts: they end with it however it ends, and a stop at any moment of start-up is clean.

Each test runs `hitl-mail serve` as its own process with a mark of its own in
the environment, which every process it starts inherits (the SMTP listener,
the fork servers, the resume workers, multiprocessing's resource tracker),
and looks for them in /proc: as its descendants while it runs, by the mark
once it is gone (they are re-parented then).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    Setup,
    _accepts,
    descendants,
    marked,
    reply_to,
    running,
    send,
    wait_until,
)
from test_operations import serve_command

pytestmark = pytest.mark.slow

SHUTDOWN_WITHIN = 20.0  # the configuration's shutdown_timeout (10 s), and the SPEC's bound
ENDED_WITHIN = 10.0  # what is left of a killed daemon ends on its own within this


def start_marked(
    setup: Setup, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], tuple[str, str]]:
    """`serve` started with a mark of its own; returns at once (not waiting for anything)."""
    mark = ("HITL_MAIL_TEST_DAEMON", uuid.uuid4().hex)
    log = open(setup.tmp / f"daemon-{len(setup.processes)}.log", "wb")  # noqa: SIM115
    with log:
        daemon = subprocess.Popen(
            serve_command(setup.config),
            env={**setup.env, **(extra_env or {}), mark[0]: mark[1]},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    setup.processes.append(daemon)
    return daemon, mark


def still_running(pids: set[int], within: float) -> set[int]:
    """Those of `pids` still running after `within` seconds (fewer as they end)."""
    deadline = time.monotonic() + within
    while True:
        left = {pid for pid in pids if running(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def catches(pid: int, sig: int) -> bool:
    """The process has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    found = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    return found is not None and bool(int(found.group(1), 16) >> (sig - 1) & 1)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_scheduled_idle(pid: int) -> bool:
    try:
        return os.sched_getscheduler(pid) == os.SCHED_IDLE
    except OSError:
        return False


# -- killed --------------------------------------------------------------------------


def test_every_process_serve_started_ends_within_seconds_when_serve_is_killed_with_sigkill(
    setup: Setup,
) -> None:
    daemon, mark = start_marked(setup)
    wait_until(lambda: "ready:" in setup.daemon_log(), 60, what="the ready log line")
    info = setup.kickoff({"slow": 60})["callback_info"]
    [notification] = setup.sink.wait_for("notification", info["request_id"])
    send(setup.smtp_port, reply_to(notification, "approved"))
    [approved] = setup.wait_event("approved")  # one worker now sleeps in the flow method
    busy = approved["pid"]

    # resume_workers = 2, at SCHED_IDLE (the default priority): one busy, one idle.
    workers = wait_until(
        lambda: (
            (found := {p for p in descendants(daemon.pid) if is_scheduled_idle(p)})
            and busy in found
            and len(found) >= 3  # the two workers and the process they are forked from
            and found
        ),
        30,
        what="the resume workers",
    )
    started = descendants(daemon.pid) | marked(*mark)
    started.discard(daemon.pid)
    listener = int(re.findall(r"listener process (\d+)", setup.daemon_log())[0])
    assert listener in started
    assert len(started - workers) >= 3, started  # the listener, a fork server, the tracker

    daemon.kill()
    assert daemon.wait(timeout=10) == -signal.SIGKILL

    left = still_running(started | marked(*mark), ENDED_WITHIN)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if running(p)]
    assert not [e for e in setup.events() if e["event"] == "slow_done"]


# -- stopped during start-up ------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's `$NOTIFY_SOCKET`: (socket, its path)."""
    path = Path("/tmp") / f"hitl-n-{uuid.uuid4().hex[:12]}"  # sun_path holds 108 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        try:
            yield sock, str(path)
        finally:
            path.unlink(missing_ok=True)


def handler_installed(daemon: subprocess.Popen[bytes], setup: Setup, sock: socket.socket) -> None:
    wait_until(
        lambda: catches(daemon.pid, signal.SIGTERM) or daemon.poll() is not None,
        30,
        interval=0.001,
        what="a SIGTERM handler",
    )


def after(seconds: float) -> Callable[[subprocess.Popen[bytes], Setup, socket.socket], None]:
    """`seconds` after the process can catch SIGTERM (before, see the test after this one)."""

    def wait(daemon: subprocess.Popen[bytes], setup: Setup, sock: socket.socket) -> None:
        handler_installed(daemon, setup, sock)
        time.sleep(seconds)

    return wait


def port_accepts(daemon: subprocess.Popen[bytes], setup: Setup, sock: socket.socket) -> None:
    wait_until(
        lambda: _accepts(setup.smtp_port) or daemon.poll() is not None,
        60,
        interval=0.01,
        what="the SMTP port",
    )


def said_ready(daemon: subprocess.Popen[bytes], setup: Setup, sock: socket.socket) -> None:
    assert sock.recv(4096) == b"READY=1"


def workers_forking(daemon: subprocess.Popen[bytes], setup: Setup, sock: socket.socket) -> None:
    """The resume workers' zygote is importing crewAI (started, not ready)."""
    wait_until(
        lambda: (
            any(b"zygote_main" in cmdline(p) for p in descendants(daemon.pid))
            or daemon.poll() is not None
        ),
        60,
        interval=0.01,
        what="the resume workers' zygote",
    )


MOMENTS = {
    "as_soon_as_it_can_catch_it": handler_installed,
    "after_50ms": after(0.05),
    "after_200ms": after(0.2),
    "after_500ms": after(0.5),
    "after_1s": after(1.0),
    "when_its_smtp_port_accepts": port_accepts,
    "while_the_resume_workers_start": workers_forking,
    "right_after_ready": said_ready,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigterm_at_any_moment_of_start_up_exits_0_within_the_shutdown_timeout_leaving_no_process(
    setup: Setup, notify_socket: tuple[socket.socket, str], moment: str
) -> None:
    sock, path = notify_socket
    daemon, mark = start_marked(setup, {"NOTIFY_SOCKET": path})
    MOMENTS[moment](daemon, setup, sock)
    started = descendants(daemon.pid) | marked(*mark)

    stopped = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=SHUTDOWN_WITHIN + 10)

    log = setup.daemon_log()
    assert code == 0, log[-3000:]
    assert time.monotonic() - stopped < SHUTDOWN_WITHIN, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # The fork server and the resource tracker notice the daemon's exit a moment later.
    left = still_running(started | marked(*mark), 3.0)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if running(p)]


def test_sigterm_before_the_interpreter_runs_any_of_hitl_mail_leaves_no_process(
    setup: Setup,
) -> None:
    """Sent right after the process exists: Python's default action may still end it (-15).

    Until the interpreter has started and imported the command line (a few
    tens of milliseconds) no handler of ours can exist; nothing has started
    then either, so nothing is left and nothing was accepted.
    """
    daemon, mark = start_marked(setup)
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=SHUTDOWN_WITHIN + 10)
    assert code in (0, -signal.SIGTERM), setup.daemon_log()[-3000:]
    assert not still_running(marked(*mark), 3.0)
