"""Imported by the daemon's fork server only (a preload): it outlives a stop signal sent to every process.

The SMTP listener and the parse workers are forked from multiprocessing's
fork server, and end when it ends (`children.die_with_parent`). A terminal or
a service manager may send SIGTERM or SIGHUP to every process of the daemon
(the stdlib's fork server already ignores SIGINT): the daemon then stops its
children itself, in order, and the fork server ends when the daemon does (its
"alive" pipe closes). Children forked from it inherit these dispositions and
set their own.
"""

from __future__ import annotations

import signal

for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)
