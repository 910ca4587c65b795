"""Tell systemd about the daemon's life cycle through the sd_notify protocol.

The protocol is one datagram per state change sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (sd_notify(3)); it is a few lines, so there is no dependency on
libsystemd. Every function is a no-op returning ``False`` when the daemon does not
run under systemd (the variable is unset), so callers never need to check first.

Typical use in ``hitl-mail serve``::

    ready()                      # after the listener is bound and the store migrated
    reloading(); ...; ready()    # around a SIGHUP reload
    stopping()                   # when SIGTERM arrives, before the bounded shutdown

and, when ``watchdog_interval()`` returns a number, ``watchdog()`` at half that
interval from a task on the event loop, so a wedged loop gets the service restarted.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

logger = logging.getLogger(__name__)


def _socket_address(raw: str) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` into an address ``socket.connect`` accepts."""
    if raw.startswith("@"):
        # A leading "@" names a socket in Linux's abstract namespace (unix(7)),
        # spelled with a NUL byte on the wire.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd >= 254 may also hand out "vsock:" addresses (for VMs); not ours to serve.
    return None


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` pairs) to systemd.

    Returns ``True`` when the datagram was sent, ``False`` when there is no
    notification socket or sending failed (logged, never raised: a lost status
    update must not take the daemon down).
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _socket_address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def ready() -> bool:
    """Report that start-up (or a reload) has finished: ``Type=notify`` units become active."""
    return notify("READY=1")


def stopping() -> bool:
    """Report that a clean shutdown has begun."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Report that a configuration reload has begun; send ``ready()`` when it is done.

    ``MONOTONIC_USEC`` is what systemd >= 253 requires with ``Type=notify-reload`` to
    tell this reload from an earlier one; older versions ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def status(text: str) -> bool:
    """Set the one-line status ``systemctl status`` shows."""
    # A newline would start a new KEY=VALUE pair and could forge one.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog() -> bool:
    """Ping the service watchdog (``WatchdogSec=``)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``watchdog()``, or ``None`` when not enabled.

    Mirrors sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer and,
    when ``$WATCHDOG_PID`` is set, it must name this process (not a parent's).
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec / 1_000_000
