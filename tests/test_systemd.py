"""sd_notify against a real datagram socket, and the shipped unit checked by systemd."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hitl_mail import systemd

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_SYSUSERS = shutil.which("systemd-sysusers")


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path and named by $NOTIFY_SOCKET, as systemd does."""
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip("tmp_path too long for an AF_UNIX socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A socket in Linux's abstract namespace, named "@…" in $NOTIFY_SOCKET."""
    name = f"hitl-mail-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_ready_stopping_and_reloading_reach_the_notify_socket(
    notify_socket: socket.socket,
) -> None:
    assert systemd.ready() is True
    assert _receive(notify_socket) == "READY=1"
    assert systemd.stopping() is True
    assert _receive(notify_socket) == "STOPPING=1"
    assert systemd.reloading() is True
    lines = _receive(notify_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", lines[1])


def test_reloading_carries_the_current_monotonic_clock(notify_socket: socket.socket) -> None:
    # systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC (Type=notify-reload).
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.reloading()
    sent = int(_receive(notify_socket).split("MONOTONIC_USEC=")[1])
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= sent <= after


def test_an_abstract_namespace_socket_receives_ready(
    abstract_notify_socket: socket.socket,
) -> None:
    assert systemd.ready() is True
    assert _receive(abstract_notify_socket) == "READY=1"


def test_status_and_watchdog_are_single_datagrams(notify_socket: socket.socket) -> None:
    assert systemd.status("3 pending\nWATCHDOG=trigger")
    assert _receive(notify_socket) == "STATUS=3 pending WATCHDOG=trigger"
    assert systemd.watchdog()
    assert _receive(notify_socket) == "WATCHDOG=1"


def test_without_notify_socket_every_call_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.stopping() is False
    assert systemd.reloading() is False
    assert systemd.watchdog() is False


def test_a_vanished_notify_socket_returns_false_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.ready() is False


def test_watchdog_interval_follows_watchdog_usec_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None


# -- the unit file ----------------------------------------------------------------------


def _verifiable_copy(tmp_path: Path) -> Path:
    """The shipped unit and drop-in, with executables this machine lacks replaced.

    `systemd-analyze verify` fails when an Exec*= binary is missing. The path of
    hitl-mail itself depends on the install (a venv under /opt), and /bin/kill on
    procps being installed, so a stub stands in for whatever is absent; every other
    line is verified exactly as shipped. User=hitl-mail need not exist: verify does
    not resolve users (they are looked up when the service starts).
    """
    stub = tmp_path / "bin" / "hitl-mail"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)

    def replace_missing(match: re.Match[str]) -> str:
        binary = match.group(2)
        return match.group(1) + (binary if os.access(binary, os.X_OK) else str(stub))

    unit = (DEPLOY / "hitl-mail.service").read_text()
    unit = re.sub(r"^(Exec\w+=[-@:+!]*)(/\S+)", replace_missing, unit, flags=re.MULTILINE)
    units = tmp_path / "units"
    dropins = units / "hitl-mail.service.d"
    dropins.mkdir(parents=True)
    (units / "hitl-mail.service").write_text(unit)
    shutil.copy(
        DEPLOY / "hitl-mail.service.d" / "bind-port-25.conf.example",
        dropins / "bind-port-25.conf",
    )
    return units / "hitl-mail.service"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt: systemd)")
def test_the_shipped_unit_and_its_drop_in_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = _verifiable_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and only warns, so its messages about our files
    # count as failures too; lines about other units on the host are not ours to judge.
    ours = [
        line for line in result.stderr.splitlines() if str(tmp_path) in line or "hitl-mail" in line
    ]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_the_shipped_unit_asks_for_notify_and_the_sandbox() -> None:
    unit = (DEPLOY / "hitl-mail.service").read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in unit.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["StateDirectory"] == "hitl-mail"
    assert settings["ProtectSystem"] == "strict"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert settings["TimeoutStopSec"] == "30s"


@pytest.mark.skipif(SYSTEMD_SYSUSERS is None, reason="systemd-sysusers not installed")
def test_the_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    assert SYSTEMD_SYSUSERS is not None
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [SYSTEMD_SYSUSERS, f"--root={tmp_path}", str(DEPLOY / "sysusers.d" / "hitl-mail.conf")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^hitl-mail:x:\d+:\d+:[^:]*:/var/lib/hitl-mail:", passwd, re.MULTILINE)


def test_the_production_config_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from hitl_mail.config import load_config

    monkeypatch.setenv("HITL_MAIL_SECRET", "a-test-secret-for-the-deploy-example-0123")
    config = load_config(DEPLOY / "hitl-mail.toml")
    assert config.daemon.database_url == "sqlite:////var/lib/hitl-mail/hitl-mail.db"
    assert config.inbound.host == "127.0.0.1"
    assert config.health.host == "127.0.0.1"
