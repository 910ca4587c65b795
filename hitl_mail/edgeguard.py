"""The SMTP edge's abuse limits: connections overall and per client, failed recipients per client.

The SMTP listener (inbound.py) asks this bookkeeping, in its own process and
on its event loop, before it greets a connection and before it looks a
recipient up. Nothing here touches the database or blocks:

- at most `[inbound].max_connections` connections at once, whoever opens them
  (`421 4.7.0` and close beyond it);
- at most `max_connections_per_ip` of them from one client;
- a client that had `max_rcpt_failures_per_ip` recipients refused for not
  being ours (guessed tokens, relay attempts) within `rcpt_failure_window` gets
  a temporary 4xx for every further RCPT and connection until the oldest of
  those failures is that old: a token guesser is slowed to that many tries a
  window, and a sender who erred retries later and gets through.

A "client" is an IPv4 address, or an IPv6 /64 (one subscriber's allocation, so
that hopping addresses inside it buys nothing). Clients in `trusted_relays`
(the MTA in front, by default anything on loopback) are exempt from the
per-client limits, which would otherwise throttle every sender the relay
speaks for at once; the relay limits its own clients (see deploy/postfix/).
The global cap applies to them too.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from hitl_mail.config import InboundSettings

log = logging.getLogger(__name__)

TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_YOU = "421 4.7.0 Too many connections from your address, try again later"
THROTTLED_AT_CONNECT = "421 4.7.1 Too many unknown recipients from your address, try again later"

IPV6_CLIENT_PREFIX = 64


def client_of(peer: Any) -> str:
    """The client a peer address belongs to: an IPv4 address or an IPv6 /64, as text."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        address = ipaddress.ip_address(str(host).partition("%")[0])
    except ValueError:
        return str(host)  # not an IP (a Unix socket): one client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class EdgeGuard:
    """Connection counts and recipient failures, per client, for one listener process."""

    def __init__(
        self, settings: InboundSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.connections = 0
        self._per_client: dict[str, int] = {}
        self._failures: dict[str, deque[float]] = {}
        self._next_sweep = 0.0

    def is_trusted(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client.partition("/")[0])
        except ValueError:
            return False
        return any(address in network for network in self.settings.trusted_relays)

    def admit(self, client: str) -> str | None:
        """Count a new connection, or the 421 that refuses it (then nothing is counted)."""
        if self.connections >= self.settings.max_connections:
            return TOO_MANY_CONNECTIONS
        if not self.is_trusted(client):
            if self._per_client.get(client, 0) >= self.settings.max_connections_per_ip:
                return TOO_MANY_FROM_YOU
            if self.throttled(client):
                return THROTTLED_AT_CONNECT
        self.connections += 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        """A connection `admit` counted has closed."""
        self.connections -= 1
        left = self._per_client.get(client, 1) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)

    def throttled(self, client: str) -> bool:
        """The client had its quota of failed recipients within the window (trusted ones never do)."""
        failures = self._failures.get(client)
        if failures is None or len(failures) < self.settings.max_rcpt_failures_per_ip:
            return False
        return self.clock() - failures[0] < self._window()

    def failed(self, client: str) -> None:
        """A recipient from `client` was refused as not ours."""
        if self.is_trusted(client):
            return
        now = self.clock()
        failures = self._failures.get(client)
        if failures is None:
            failures = self._failures[client] = deque(maxlen=self.settings.max_rcpt_failures_per_ip)
        failures.append(now)
        if len(failures) == failures.maxlen and now - failures[0] < self._window():
            log.warning(
                "client %s: %d recipients refused within %s; its recipients and connections"
                " get a temporary 4xx until the window passes",
                client,
                len(failures),
                self.settings.rcpt_failure_window,
            )
        if now >= self._next_sweep:
            self._sweep(now)

    def _window(self) -> float:
        return self.settings.rcpt_failure_window.total_seconds()

    def _sweep(self, now: float) -> None:
        """Forget clients whose last failure is older than the window (memory stays bounded)."""
        window = self._window()
        for client in [c for c, f in self._failures.items() if now - f[-1] >= window]:
            del self._failures[client]
        self._next_sweep = now + window
