"""Make every process the daemon starts end with the daemon, however the daemon ends.

A child re-parented to PID 1 after the daemon was SIGKILLed (or OOM-killed)
would otherwise live on: a resume worker blocks on its call queue forever,
and the SMTP listener only notices through its pipe. Outside a systemd cgroup
(a container without an init, supervisord, a shell) every crash-restart would
leak another set. Each child calls `die_with_parent()` first thing: the
kernel's parent-death signal (Linux `PR_SET_PDEATHSIG`), and, where that is
not available, a thread that watches the parent's pid.

Linux sends the parent-death signal when the *thread* that forked the child
ends, not the whole process: a child must be started from a long-lived thread
of its parent (the event loop's, for the daemon), never from a short-lived
worker thread. For children of a fork server the "parent" is the fork
server, which itself ends when the daemon does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_EVERY = 1.0  # seconds between looks at the parent, where prctl is missing


def die_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Arrange for `sig` to reach this process when its parent ends.

    `expected_parent` is the pid the caller knows as the parent (the daemon's,
    passed down): if the parent is already gone when this runs (it died
    between the fork and here), the process ends at once instead of waiting
    for a signal that will never come.

    SIGKILL is the default because a child has nothing to finish that the
    next daemon does not do again: its work is in leased rows.
    """
    parent = expected_parent if expected_parent is not None else os.getppid()
    if not _prctl_pdeathsig(sig):
        _watch(parent, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _prctl_pdeathsig(sig: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch(parent: int, sig: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()
