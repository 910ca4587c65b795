"""Count what the daemon does and serve it, with liveness and readiness, over HTTP.

Two pieces, both owned by the `App` and passed explicitly (no module-level registry):

- `Metrics` holds a private Prometheus `CollectorRegistry`. Stages call its event
  methods (`email_sent`, `reply_refused`, …); the number of requests by status and
  the readiness flag are pulled from callbacks the App provides, at scrape time.
- `HealthServer` is a deliberately small asyncio HTTP/1.1 server (GET and HEAD,
  ``Connection: close``, 8 KiB request head, 5 s to send it) for ``/metrics``,
  ``/healthz`` (the event loop answers) and ``/readyz`` (the App says ready).
  It binds loopback unless told otherwise; it has no authentication.

`probe()` is the client side, for ``hitl-mail health`` and container health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

__all__ = [
    "EMAIL_KINDS",
    "LLM_RESULTS",
    "REFUSAL_REASONS",
    "REQUEST_STATUSES",
    "HealthServer",
    "Metrics",
    "probe",
]

logger = logging.getLogger(__name__)

# Label values exported at 0 from the start, so dashboards and alerts such as
# `increase(hitl_replies_refused_total{reason="bad_token"}[1h]) > 10` see a series
# before the first event. Other values are accepted as they come.
REQUEST_STATUSES = ("pending", "answered", "resumed", "resume_failed")
EMAIL_KINDS = ("notification", "confirmation", "error", "auto-response")
REFUSAL_REASONS = (
    "foreign_domain",
    "bad_token",
    "oversize",
    "wrong_sender",
    "expired",
    "machine_mail",
    "duplicate",
)
LLM_RESULTS = ("ok", "invalid", "error", "timeout")

# An answer can take from a minute to the 7-day token lifetime.
TIME_TO_ANSWER_BUCKETS = (
    60.0,
    5 * 60.0,
    15 * 60.0,
    30 * 60.0,
    3600.0,
    2 * 3600.0,
    4 * 3600.0,
    8 * 3600.0,
    12 * 3600.0,
    86400.0,
    2 * 86400.0,
    3 * 86400.0,
    7 * 86400.0,
)

RequestCounts = Callable[[], Mapping[str, int]]
Readiness = Callable[[], bool]

# The classic text format; generate_latest() writes it whatever the Accept header.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8 * 1024
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
# /metrics calls the App's request-count callback (a database query) in a thread.
RENDER_TIMEOUT = 10.0
MAX_CONNECTIONS = 32


def _not_ready() -> bool:
    return False


def _no_requests() -> Mapping[str, int]:
    return {}


_UP_HELP = "1 while the hitl-mail daemon process runs."
_READY_HELP = "1 when the daemon is ready: store migrated, SMTP listener bound."
_REQUESTS_HELP = "Feedback requests in the database, by status."


class _ScrapeTimeCollector:
    """Values read from the App when Prometheus scrapes, not kept in the registry."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        # Names only: registering must not call the App's callbacks (the database
        # may not be migrated yet when the Metrics object is built).
        return [
            GaugeMetricFamily("hitl_up", _UP_HELP),
            GaugeMetricFamily("hitl_ready", _READY_HELP),
            GaugeMetricFamily("hitl_requests", _REQUESTS_HELP, labels=["status"]),
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("hitl_up", _UP_HELP, value=1)
        yield GaugeMetricFamily("hitl_ready", _READY_HELP, value=int(self._metrics.is_ready()))
        counts = self._metrics.request_counts()
        if counts is None:
            return
        family = GaugeMetricFamily("hitl_requests", _REQUESTS_HELP, labels=["status"])
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family


class Metrics:
    """The daemon's Prometheus metrics in a registry of their own.

    ``request_counts`` returns the number of requests by status; it is called at
    every scrape from a worker thread, so it may query the database synchronously
    (``Store.counts_by_status``). ``ready`` must be cheap and thread-safe (read a flag).
    """

    def __init__(
        self,
        *,
        request_counts: RequestCounts = _no_requests,
        ready: Readiness = _not_ready,
        request_statuses: Iterable[str] = REQUEST_STATUSES,
    ) -> None:
        self._request_counts = request_counts
        self._ready = ready
        self._request_statuses = tuple(request_statuses)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.emails_sent = Counter(
            "hitl_emails_sent", "Emails handed to the relay, by kind.", ["kind"], registry=registry
        )
        self.emails_failed = Counter(
            "hitl_emails_failed",
            "Failed send attempts, by kind; permanent=true when the email is given up.",
            ["kind", "permanent"],
            registry=registry,
        )
        self.replies_accepted = Counter(
            "hitl_replies_accepted", "Replies accepted by the SMTP listener.", registry=registry
        )
        self.replies_refused = Counter(
            "hitl_replies_refused",
            "Replies refused or ignored, by reason.",
            ["reason"],
            registry=registry,
        )
        self.resumes = Counter("hitl_resumes", "Flows resumed successfully.", registry=registry)
        self.resume_failures = Counter(
            "hitl_resume_failures", "Attempts to resume a flow that failed.", registry=registry
        )
        self.llm_calls = Counter(
            "hitl_llm_calls", "LLM outcome decisions, by result.", ["result"], registry=registry
        )
        self.time_to_answer_seconds = Histogram(
            "hitl_time_to_answer_seconds",
            "Seconds from a request being stored to its answer.",
            buckets=TIME_TO_ANSWER_BUCKETS,
            registry=registry,
        )
        self._prefill()
        registry.register(_ScrapeTimeCollector(self))

    def _prefill(self) -> None:
        for kind in EMAIL_KINDS:
            self.emails_sent.labels(kind=kind)
            for permanent in ("true", "false"):
                self.emails_failed.labels(kind=kind, permanent=permanent)
        for reason in REFUSAL_REASONS:
            self.replies_refused.labels(reason=reason)
        for result in LLM_RESULTS:
            self.llm_calls.labels(result=result)

    # -- events, one method per thing that happened ---------------------------------

    def email_sent(self, kind: str) -> None:
        self.emails_sent.labels(kind=kind).inc()

    def email_failed(self, kind: str, *, permanent: bool) -> None:
        self.emails_failed.labels(kind=kind, permanent="true" if permanent else "false").inc()

    def reply_accepted(self) -> None:
        self.replies_accepted.inc()

    def reply_refused(self, reason: str) -> None:
        self.replies_refused.labels(reason=reason).inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def resume_failed(self) -> None:
        self.resume_failures.inc()

    def llm_call(self, result: str) -> None:
        self.llm_calls.labels(result=result).inc()

    def answered(self, seconds: float) -> None:
        """A request got its answer ``seconds`` after it was stored."""
        self.time_to_answer_seconds.observe(max(0.0, seconds))

    # -- scrape-time values ----------------------------------------------------------

    def is_ready(self) -> bool:
        try:
            return bool(self._ready())
        except Exception:
            logger.exception("readiness callback failed; reporting not ready")
            return False

    def request_counts(self) -> dict[str, int] | None:
        """Counts by status, known statuses at 0; ``None`` when the callback failed."""
        try:
            counts = dict(self._request_counts())
        except Exception:
            logger.exception("request-count callback failed; hitl_requests left out")
            return None
        return {status: 0 for status in self._request_statuses} | counts

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return bytes(generate_latest(self.registry))


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _text(status: HTTPStatus, text: str | None = None) -> _Response:
    return _Response(status, ((text or status.phrase.lower()) + "\n").encode())


_INDEX = "hitl-mail: /metrics (Prometheus), /healthz (liveness), /readyz (readiness)"


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over a minimal HTTP/1.1 server."""

    def __init__(self, metrics: Metrics, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._metrics = metrics
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 9125) -> int:
        """Listen on ``host:port`` (port 0: any free one); return the bound port."""
        if self._server is not None:
            raise RuntimeError("HealthServer already started")
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        bound = int(self._server.sockets[0].getsockname()[1])
        logger.info("health endpoint listening on http://%s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening and end open connections; returns within a few seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=WRITE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WRITE_TIMEOUT):
                await server.wait_closed()
        logger.info("health endpoint stopped")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > self._max_connections:
                reply: bytes | None = _text(HTTPStatus.SERVICE_UNAVAILABLE, "busy").encode()
            else:
                reply = await self._respond(reader)
            if reply is not None:
                writer.write(reply)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
        except (OSError, TimeoutError) as exc:
            logger.debug("health connection dropped: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> bytes | None:
        """The encoded response to one request; ``None`` when the client went away."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE).encode()
        except TimeoutError:
            return _text(HTTPStatus.REQUEST_TIMEOUT).encode()
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(HTTPStatus.BAD_REQUEST).encode()
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            allow = (("Allow", "GET, HEAD"),)
            return _Response(HTTPStatus.METHOD_NOT_ALLOWED, b"", headers=allow).encode()
        response = await self._route(target.split("?", 1)[0])
        return response.encode(head_only=method == "HEAD")

    async def _route(self, path: str) -> _Response:
        if path == "/metrics":
            return await self._scrape()
        if path == "/healthz":
            return _text(HTTPStatus.OK, "ok")
        if path == "/readyz":
            if self._metrics.is_ready():
                return _text(HTTPStatus.OK, "ready")
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready")
        if path == "/":
            return _text(HTTPStatus.OK, _INDEX)
        return _text(HTTPStatus.NOT_FOUND)

    async def _scrape(self) -> _Response:
        try:
            async with asyncio.timeout(RENDER_TIMEOUT):
                body = await asyncio.to_thread(self._metrics.render)
        except TimeoutError:
            logger.warning("metrics took longer than %ss to render", RENDER_TIMEOUT)
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "metrics timed out")
        return _Response(HTTPStatus.OK, body, content_type=METRICS_CONTENT_TYPE)


def probe(url: str, timeout: float = 5.0) -> bool:
    """True when ``url`` (e.g. ``http://127.0.0.1:9125/readyz``) answers 2xx in time."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except (OSError, ValueError):
        # URLError, refused connections and timeouts are all OSError subclasses;
        # ValueError covers a malformed URL beyond its scheme.
        return False
