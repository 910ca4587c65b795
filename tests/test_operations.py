"""Operating the real daemon: reload, an MTA in front, metrics, exit codes, systemd.

Every test runs `hitl-mail serve` as its own process, as an operator or systemd
would, and observes it only from outside: SMTP, HTTP, the notify socket, the
command line, exit codes and the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import Setup, free_port, reply_to, send, wait_until
from postfix import PostfixRelay, skip_reason
from prometheus_client.parser import text_string_to_metric_families

from hitl_mail import cli
from hitl_mail.config import load_config
from hitl_mail.timers import Timers

pytestmark = pytest.mark.slow

POSTFIX_SKIP = skip_reason()
# The SPEC's bound for a clean shutdown after SIGTERM or SIGINT.
SHUTDOWN_WITHIN = 20.0


def serve_command(config: Path) -> list[str]:
    """`hitl-mail serve` through the installed console script, as an operator runs it."""
    script = Path(sys.executable).with_name("hitl-mail")
    program = [str(script)] if script.exists() else [sys.executable, "-m", "hitl_mail.cli"]
    return [*program, "serve", "--config", str(config)]


def stop(setup: Setup, daemon: subprocess.Popen[bytes], sig: int) -> tuple[int, float]:
    """Send `sig`; the exit code and how long the daemon took to exit."""
    started = time.monotonic()
    code = setup.stop_daemon(daemon, sig)
    return code, time.monotonic() - started


def settle(observe: Callable[[], Any], expected: Any, timeout: float = 30.0) -> Any:
    """Poll `observe()` until it equals `expected` or `timeout` passes; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = observe()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


# -- SIGHUP ---------------------------------------------------------------------------


def test_sighup_reloads_routing_without_dropping_an_open_smtp_connection(setup: Setup) -> None:
    setup.llm.rules = {"detail": "needs_revision"}
    daemon = setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    assert info["assigned_to"] == "owner@example.com"
    [first] = setup.sink.wait_for("notification", info["request_id"])

    with asyncio.Runner() as runner:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=setup.smtp_port, timeout=30)
        runner.run(client.connect())
        try:
            assert runner.run(client.ehlo()).code == 250

            config = setup.config.read_text()
            rerouted = config.replace(
                'default_assignee = "owner@example.com"',
                'default_assignee = "new-owner@example.com"',
            )
            assert rerouted != config
            setup.config.write_text(rerouted)
            daemon.send_signal(signal.SIGHUP)
            wait_until(
                lambda: "configuration reloaded" in setup.daemon_log(),
                30,
                what=f"the reload in the daemon log\n{setup.daemon_log()[-3000:]}",
            )

            # The connection opened before the reload carries the reply after it.
            refused, response = runner.run(
                client.send_message(reply_to(first, "Needs more detail on the costs"))
            )
            assert refused == {}
            assert response.startswith("2"), response
            assert runner.run(client.quit()).code == 221
        finally:
            client.close()

    [confirmation] = setup.sink.wait_for("confirmation", info["request_id"])
    assert confirmation["X-HITL-Outcome"] == "needs_revision"
    # The flow looped back to review inside the daemon's resume worker: the new request
    # was routed with the daemon's reloaded configuration.
    second = setup.sink.wait_for("notification", count=2, timeout=60)[1]
    second_id = second["X-HITL-Request-Id"]
    assert second_id != info["request_id"]
    assert second["To"] == "new-owner@example.com"
    assert setup.show(second_id)["assigned_to"] == "new-owner@example.com"
    assert daemon.poll() is None
    assert stop(setup, daemon, signal.SIGTERM)[0] == 0


# -- behind Postfix ---------------------------------------------------------------------


@pytest.mark.skipif(POSTFIX_SKIP is not None, reason=POSTFIX_SKIP or "")
def test_a_reply_sent_to_postfix_reaches_the_daemon_through_the_transport_map_and_resumes_the_flow(
    setup: Setup,
) -> None:
    from test_postfix_relay import shipped_files, shipped_settings

    setup.start_daemon()
    # deploy/postfix as shipped: relay the reply domain through the transport map, and
    # ask the daemon at RCPT time whether it takes the token (reject_unverified_recipient).
    settings = shipped_settings() | {"mynetworks": "", "address_verify_poll_delay": "1s"}
    with PostfixRelay(
        reply_domain="reply.example.com",
        target_port=setup.smtp_port,
        settings=settings,
        files=shipped_files(),
    ) as relay:
        info = setup.kickoff()["callback_info"]
        rid = info["request_id"]
        [notification] = setup.sink.wait_for("notification", rid)

        send(relay.port, reply_to(notification, "approved"))

        try:
            [approved] = setup.wait_event("approved")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n-- postfix log --\n{relay.log()}") from None
        assert approved["feedback"] == "approved"
        [confirmation] = setup.sink.wait_for("confirmation", rid)
        assert confirmation["X-HITL-Outcome"] == "approved"
        assert confirmation["To"] == "owner@example.com"
        log = relay.wait_for_log("status=sent", 10.0)
        assert f"relay=127.0.0.1[127.0.0.1]:{setup.smtp_port}" in log
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="resumed")


# -- metrics ----------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


EXPECTED_AFTER_THE_SCRIPT = {
    ("hitl_requests", "status=resumed"): 1,
    ("hitl_requests", "status=pending"): 1,
    ("hitl_emails_sent_total", "kind=notification"): 2,
    ("hitl_emails_sent_total", "kind=confirmation"): 1,
    ("hitl_replies_accepted_total", ""): 2,
    ("hitl_replies_refused_total", "reason=foreign_domain"): 1,
    ("hitl_replies_refused_total", "reason=wrong_sender"): 1,
    ("hitl_resumes_total", ""): 1,
    ("hitl_time_to_answer_seconds_count", ""): 1,
}


def observed(port: int) -> dict[tuple[str, str], float | None]:
    samples = scrape(port)
    values = {}
    for name, label in EXPECTED_AFTER_THE_SCRIPT:
        labels = dict([label.split("=")]) if label else {}
        values[name, label] = sample(samples, name, **labels)
    return values


def test_the_metrics_endpoint_reports_the_counts_of_a_scripted_run(
    setup: Setup, tmp_path: Path
) -> None:
    health_port = free_port()
    text = setup.config.read_text()
    setup.config.write_text(
        text + f'\n[health]\nenabled = true\nhost = "127.0.0.1"\nport = {health_port}\n'
    )
    daemon = setup.start_daemon()
    wait_until(lambda: _status(health_port, "/readyz") == 200, 30, what="/readyz answering 200")

    answered, ignored = setup.kickoff_many(2)
    answered_id = answered["callback_info"]["request_id"]
    ignored_id = ignored["callback_info"]["request_id"]
    [to_answer] = setup.sink.wait_for("notification", answered_id)
    [to_ignore] = setup.sink.wait_for("notification", ignored_id)

    send(setup.smtp_port, reply_to(to_answer, "approved"))
    send(setup.smtp_port, reply_to(to_ignore, "approved", sender="intruder@example.org"))
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        send(
            setup.smtp_port,
            reply_to(to_ignore, "approved", to="someone@elsewhere.example"),
        )

    setup.wait_event("approved")
    wait_until(lambda: setup.show(answered_id)["status"] == "resumed", 30, what="resumed")
    wait_until(
        lambda: "reply_wrong_sender" in [e["event"] for e in setup.show(ignored_id)["audit"]],
        30,
        what="the wrong sender's reply recorded",
    )
    setup.sink.wait_for("confirmation", answered_id)
    expected = EXPECTED_AFTER_THE_SCRIPT
    assert settle(lambda: observed(health_port), expected) == expected
    assert setup.show(ignored_id)["status"] == "pending"

    assert _status(health_port, "/readyz") == 200
    health = setup.cli("health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.strip() == "ready"

    code, took = stop(setup, daemon, signal.SIGTERM)
    assert code == 0, setup.daemon_log()[-3000:]
    assert took < SHUTDOWN_WITHIN, setup.daemon_log()[-3000:]
    assert setup.cli("health").returncode == 1  # nobody answers any more


def _status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except OSError:
        return None


# -- exit codes -------------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[Callable[[int], None]]:
    """Occupy 127.0.0.1:<port> with a listening socket, as another program would."""
    sockets: list[socket.socket] = []

    def take(port: int) -> None:
        sock = socket.socket()
        sockets.append(sock)
        sock.bind(("127.0.0.1", port))
        sock.listen()

    yield take
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("which", ["smtp", "health"])
def test_serve_exits_2_with_a_clear_message_when_its_port_is_taken(
    setup: Setup, taken_port: Callable[[int], None], which: str
) -> None:
    health_port = free_port()
    setup.config.write_text(
        setup.config.read_text()
        + f'\n[health]\nenabled = true\nhost = "127.0.0.1"\nport = {health_port}\n'
    )
    port = setup.smtp_port if which == "smtp" else health_port
    taken_port(port)

    started = time.monotonic()
    result = subprocess.run(
        serve_command(setup.config),
        env=setup.env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert time.monotonic() - started < 30
    assert "cannot start" in output
    assert "address already in use" in output.lower()
    assert str(port) in output
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_exits_0_after_a_clean_shutdown_on_sigterm_and_sigint(
    setup: Setup, sig: signal.Signals
) -> None:
    daemon = setup.start_daemon()
    wait_until(lambda: "ready:" in setup.daemon_log(), 30, what="the ready log line")
    code, took = stop(setup, daemon, sig)
    log = setup.daemon_log()
    assert code == 0, log[-3000:]
    assert took < SHUTDOWN_WITHIN, log[-3000:]
    assert "stopped" in log
    assert "Traceback" not in log, log[-3000:]


def test_a_stage_that_fails_stops_serve_with_exit_1_so_the_service_manager_restarts_it(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Timers, stopping: asyncio.Event) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Timers, "run", broken)  # the fault; everything else is the real daemon
    caplog.set_level(logging.INFO, logger="hitl_mail")

    code = asyncio.run(cli.serve(load_config(setup.config), str(setup.config)))

    assert code == 1
    assert "the Timers stage failed" in caplog.text
    assert "disk on fire" in caplog.text
    assert "stopped" in caplog.text


def start_with_listener(setup: Setup) -> tuple[subprocess.Popen[bytes], int]:
    """`serve` started and ready, and the pid of its SMTP listener process (from the ready line)."""
    daemon = setup.start_daemon()
    wait_until(lambda: "ready:" in setup.daemon_log(), 30, what="the ready log line")
    found = re.search(r"listener process (\d+)", setup.daemon_log())
    assert found is not None, setup.daemon_log()[-3000:]
    return daemon, int(found.group(1))


def test_when_the_smtp_listener_process_dies_serve_exits_1_so_the_service_manager_restarts_it(
    setup: Setup,
) -> None:
    daemon, listener = start_with_listener(setup)

    os.kill(listener, signal.SIGKILL)

    assert daemon.wait(timeout=SHUTDOWN_WITHIN) == 1
    log = setup.daemon_log()
    assert "the SMTP listener process ended (exit code -9)" in log, log[-3000:]
    assert "stopped" in log


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):  # a process that ended meanwhile
            continue
    return found


@pytest.mark.parametrize("priority", ["idle", "low"])
def test_the_smtp_listener_gets_the_cpu_before_the_daemons_stages_and_its_workers(
    setup: Setup, priority: str
) -> None:
    text = setup.config.read_text()
    setup.config.write_text(text.replace("[daemon]", f'[daemon]\nresume_priority = "{priority}"'))
    daemon, listener = start_with_listener(setup)
    base = niceness(listener)  # what serve was started with

    def lowered(pid: int) -> bool:
        if priority == "idle":  # only CPU time nothing else wants
            return os.sched_getscheduler(pid) == os.SCHED_IDLE
        return niceness(pid) == base + 7  # 5 below the stages

    def workers() -> list[int]:  # resume_workers = 2, forked from a zygote of the daemon's
        zygotes = [c for c in children(daemon.pid) if lowered(c)]
        found = [w for z in zygotes for w in children(z) if lowered(w)]
        return found if len(found) == 2 else []

    wait_until(workers, 60, what=f"two resume workers at priority {priority!r}")

    def parse_workers() -> list[int]:  # the listener's siblings, forked by the same fork server
        fork_server = int(Path(f"/proc/{listener}/stat").read_text().rsplit(")", 1)[1].split()[1])
        found = [c for c in children(fork_server) if c != listener]
        return found if len(found) == 2 else []

    for parser in wait_until(parse_workers, 30, what="two parse workers"):
        assert niceness(parser) == base + 2  # the daemon's stages' priority, below the listener
    assert niceness(listener) == base
    assert os.sched_getscheduler(listener) == os.SCHED_OTHER
    assert niceness(daemon.pid) == base + 2
    assert os.sched_getscheduler(daemon.pid) == os.SCHED_OTHER


def test_a_signal_to_every_process_of_the_daemon_still_shuts_it_down_cleanly(
    setup: Setup,
) -> None:
    """As Ctrl-C in a terminal, or a service manager that signals the whole group, does."""
    with open(setup.tmp / "daemon-group.log", "wb") as log:
        daemon = subprocess.Popen(
            serve_command(setup.config),
            env=setup.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    setup.processes.append(daemon)
    wait_until(lambda: "ready:" in setup.daemon_log(), 30, what="the ready log line")

    started = time.monotonic()
    os.killpg(daemon.pid, signal.SIGTERM)

    assert daemon.wait(timeout=30) == 0, setup.daemon_log()[-3000:]
    assert time.monotonic() - started < SHUTDOWN_WITHIN
    output = setup.daemon_log()
    assert "stopped" in output
    assert "listener process ended" not in output
    assert "Traceback" not in output, output[-3000:]


# -- systemd ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's `$NOTIFY_SOCKET`: (socket, its path)."""
    with tempfile.TemporaryDirectory(prefix="hitl-n-", dir="/tmp") as short:
        # sun_path holds 108 bytes; pytest's tmp_path, named after the test, may not fit.
        path = tmp_path / "notify"
        if len(str(path)) >= 100:
            path = Path(short) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(30)
            yield sock, str(path)


def _next(sock: socket.socket, daemon: subprocess.Popen[bytes]) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_the_real_daemon_tells_systemd_ready_reloading_and_stopping(
    setup: Setup, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    daemon = setup.start_daemon(env={**setup.env, "NOTIFY_SOCKET": path})

    assert _next(sock, daemon) == ["READY=1"]

    # As `systemctl reload` may, the moment the service is active.
    daemon.send_signal(signal.SIGHUP)
    reloading = _next(sock, daemon)
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert _next(sock, daemon) == ["READY=1"]
    assert daemon.poll() is None

    daemon.send_signal(signal.SIGTERM)
    assert _next(sock, daemon) == ["STOPPING=1"]
    assert daemon.wait(timeout=30) == 0
    assert "configuration reloaded" in setup.daemon_log()
