"""Count what the daemon does and serve it, with liveness and readiness, over HTTP.

Two pieces, both owned by the `App` and passed explicitly (no module-level registry):

- `Metrics` holds a private Prometheus `CollectorRegistry`. Stages call its event
  methods (`email_sent`, `reply_refused`, …); the number of requests by status and
  the readiness flag are pulled from callbacks the App provides, at scrape time.
- `health_routes` serves ``/metrics`` (prometheus-client's ASGI app),
  ``/healthz`` (the event loop answers) and ``/readyz`` (the App says ready)
  as Starlette routes, GET and HEAD. The ``[http]`` server mounts them; the
  `HealthServer` serves them alone on the ``[health]`` port, under uvicorn
  (web.py: 8 KiB request head, 5 s to send it, ``Connection: close``). Neither
  has authentication: bind them to loopback or a private network.

`probe()` is the client side, for ``hitl-mail health`` and container health checks.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_asgi_app
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from hitl_mail.web import CloseConnections, WebServer

__all__ = [
    "EMAIL_KINDS",
    "LLM_RESULTS",
    "REFUSAL_REASONS",
    "REQUEST_STATUSES",
    "HealthServer",
    "Metrics",
    "health_routes",
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
    "unauthenticated",  # [inbound.authentication] not passed
    "expired",
    "machine_mail",
    "duplicate",
    # Refused by the SMTP edge's rules and limits (inbound.py, edgeguard.py).
    "bare_address",
    "link_expired",
    "request_closed",
    "request_busy",
    "too_many_recipients",
    "throttled",
    "too_many_connections",
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

READ_TIMEOUT = 5.0  # seconds a client has to send its request head
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
        counts = self._metrics.scraped_counts
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
        self.scraped_counts: dict[str, int] | None = None  # set by refresh(), before each scrape
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
        self.http_attempts = Counter(
            "hitl_webhook_attempts",
            "POSTs of webhook events and bridged answers, by destination and result"
            " (delivered, retry, failed).",
            ["destination", "result"],
            registry=registry,
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

    def reply_accepted(self, count: int = 1) -> None:
        self.replies_accepted.inc(count)

    def reply_refused(self, reason: str) -> None:
        self.replies_refused.labels(reason=reason).inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def resume_failed(self) -> None:
        self.resume_failures.inc()

    def llm_call(self, result: str) -> None:
        self.llm_calls.labels(result=result).inc()

    def webhook_attempt(self, destination: str, result: str) -> None:
        self.http_attempts.labels(destination=destination, result=result).inc()

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

    def refresh(self) -> None:
        """Read the request counts now (blocking: call it off the event loop); scrapes show them."""
        self.scraped_counts = self.request_counts()

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format, counts read now."""
        self.refresh()
        return bytes(generate_latest(self.registry))


_INDEX = "hitl-mail: /metrics (Prometheus), /healthz (liveness), /readyz (readiness)"
_NO_STORE = {"Cache-Control": "no-store"}


class _Scrape:
    """prometheus-client's ASGI app, with the App's request counts read off the loop first.

    ``make_asgi_app`` renders the registry synchronously; the counts come from a
    database query, so they are refreshed in a worker thread (bounded by
    ``RENDER_TIMEOUT``) and the collector only reads the refreshed values.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._app = make_asgi_app(registry=metrics.registry)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout(RENDER_TIMEOUT):
                await asyncio.to_thread(self._metrics.refresh)
        except TimeoutError:
            logger.warning("metrics took longer than %ss to render", RENDER_TIMEOUT)
            response = PlainTextResponse("metrics timed out\n", 503, headers=_NO_STORE)
            await response(scope, receive, send)
            return
        await self._app(scope, receive, _with_length(send))


def _with_length(send: Any) -> Any:
    """Hold the response start until the one body message, to send a Content-Length.

    prometheus-client's app sends none, so uvicorn would answer chunked; plain
    HTTP/1.1 clients (and ``curl --http1.0`` health checks) read a sized body.
    """
    start: dict[str, Any] = {}

    async def sized(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if start:
            body = message.get("body", b"")
            headers = [*start.get("headers", []), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": [*headers, (b"cache-control", b"no-store")]})
            start.clear()
        await send(message)

    return sized


def health_routes(metrics: Metrics) -> list[Route]:
    """``/metrics``, ``/healthz``, ``/readyz`` and ``/`` (GET and HEAD), for any Starlette app."""

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok\n", headers=_NO_STORE)

    async def readyz(request: Request) -> PlainTextResponse:
        if metrics.is_ready():
            return PlainTextResponse("ready\n", headers=_NO_STORE)
        return PlainTextResponse("not ready\n", 503, headers=_NO_STORE)

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse(_INDEX + "\n", headers=_NO_STORE)

    methods = ["GET", "HEAD"]
    return [
        Route("/metrics", _Scrape(metrics), methods=methods),
        Route("/healthz", healthz, methods=methods),
        Route("/readyz", readyz, methods=methods),
        Route("/", index, methods=methods),
    ]


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` alone on their own port (``[health]``).

    The same routes as the ``[http]`` server, on a Starlette app under uvicorn
    (web.py); every response closes its connection, as probes expect.
    """

    def __init__(self, metrics: Metrics, *, max_connections: int = MAX_CONNECTIONS) -> None:
        app = CloseConnections(Starlette(routes=health_routes(metrics)))
        # READ_TIMEOUT is read per connection, so it can be changed while serving.
        self._web = WebServer(
            app,
            max_connections=max_connections,
            read_timeout=lambda: READ_TIMEOUT,
            lenient_host=True,
            name="health",
        )

    async def start(self, host: str = "127.0.0.1", port: int = 9125) -> int:
        """Listen on ``host:port`` (port 0: any free one); return the bound port."""
        return await self._web.start(host, port)

    async def stop(self) -> None:
        """Stop listening and end open connections; returns within a few seconds."""
        await self._web.stop()


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
