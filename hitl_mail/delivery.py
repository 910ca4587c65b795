"""POST what the HTTP outbox holds: signed webhook events and bridged answers, retried with backoff.

This stage's sole job is to empty `http_outbox` (httpqueue.py) into the
endpoints. Each destination (a `[[webhooks]]` name, or the bridge's callback
URLs) has a lane of its own: its own HTTP client, at most `LANE_SLOTS` POSTs
in flight, each bounded by the endpoint's `timeout`. A slow or dead endpoint
therefore fills only its own lane; mail and other webhooks go on.

Every attempt is signed afresh (SPEC 8: `X-Timestamp`, `X-Signature`) over
the row's fixed body, and recorded with an audit row (`webhook_attempt`,
`callback_attempt`). 2xx is delivered; any other answer below 500 is final;
5xx, timeouts and connection errors are retried with exponential backoff and
jitter until `retry_for` has passed since the first attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlmodel import Session

from hitl_mail import transitions
from hitl_mail.config import Config, WebhookSettings
from hitl_mail.httpqueue import Claimed, HttpQueue
from hitl_mail.models import HttpOutboxStatus, WebhookEvent, utcnow
from hitl_mail.store import Store, audit_event
from hitl_mail.waiting import Arrivals, idle, let_flood_pass
from hitl_mail.webhooks import CALLBACK, body_bytes, sample_payload, signed_headers

log = logging.getLogger(__name__)

ACTOR = "hitl-mail"
LANE_SLOTS = 4  # POSTs in flight per destination
ANSWER_KEPT = 1024  # bytes of an answer read, to show in the audit trail and `webhooks test`
SHUTDOWN_GRACE = 3.0  # seconds POSTs in flight get at shutdown; then their rows are given back
LEASE_MARGIN = timedelta(seconds=30)

DeliveryObserver = Callable[[str, str], None]  # (destination, "delivered" | "retry" | "failed")


@dataclass(frozen=True)
class Endpoint:
    """How to POST to one destination and for how long to retry."""

    name: str
    secret: str | None
    timeout: timedelta = timedelta(seconds=10)
    retry_initial: timedelta = timedelta(seconds=5)
    retry_max: timedelta = timedelta(minutes=10)
    retry_for: timedelta = timedelta(hours=1)

    @classmethod
    def of(cls, hook: WebhookSettings) -> Endpoint:
        return cls(
            hook.name, hook.secret, hook.timeout, hook.retry_initial, hook.retry_max, hook.retry_for
        )


def endpoints(config: Config) -> dict[str, Endpoint]:
    """Every destination rows may name: the configured webhooks and the bridge's callbacks."""
    found = {hook.name: Endpoint.of(hook) for hook in config.webhooks}
    found[CALLBACK] = Endpoint(CALLBACK, secret=None)
    return found


@dataclass(frozen=True)
class Answer:
    """What one POST got: an HTTP status and the start of the body, or why there was none."""

    status: int | None
    text: str
    final: bool = False  # no answer, and trying again cannot help (e.g. an unusable URL)

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return not self.final and (self.status is None or self.status >= 500)

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else self.text


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    *,
    secret: str | None,
    timeout: timedelta,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """One signed POST, bounded by `timeout` in all (a slow trickle of an answer included)."""
    sent = {**signed_headers(secret, body), **(headers or {})}
    try:
        async with (
            asyncio.timeout(timeout.total_seconds()),
            client.stream("POST", url, content=body, headers=sent) as response,
        ):
            text = await _first_part(response)
    except TimeoutError:
        return Answer(None, f"no answer within {timeout.total_seconds():g}s")
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        # Not the URL itself: a webhook URL often carries a secret in its path.
        return Answer(None, f"unusable URL ({type(exc).__name__})", final=True)
    except httpx.HTTPError as exc:
        return Answer(None, f"{type(exc).__name__}: {exc}".rstrip(": "))
    return Answer(response.status_code, text)


async def _first_part(response: httpx.Response) -> str:
    """The answer's first `ANSWER_KEPT` bytes as one printable line (the rest is not read)."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= ANSWER_KEPT:
            break
    text = data[:ANSWER_KEPT].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def retry_delay(endpoint: Endpoint, attempt: int) -> timedelta:
    """After attempt n: `retry_initial` doubled n-1 times, capped at `retry_max`, times 0.5 to 1."""
    base = min(endpoint.retry_initial * (2 ** min(attempt - 1, 30)), endpoint.retry_max)
    delay: timedelta = base * random.uniform(0.5, 1.0)
    return delay


def outcome(
    endpoint: Endpoint | None, row: Claimed, answer: Answer, started: datetime
) -> dict[str, Any]:
    """The row's new values after an attempt that started at `started`."""
    now = utcnow()
    first = row.first_attempt_at or started
    values: dict[str, Any] = {
        "attempts": row.attempts + 1,
        "first_attempt_at": first,
        "last_status": answer.status,
        "last_error": None if answer.delivered else _error(answer),
    }
    if answer.delivered:
        return {**values, "status": HttpOutboxStatus.DELIVERED, "delivered_at": now}
    if endpoint is None or not answer.retryable:
        return {**values, "status": HttpOutboxStatus.FAILED}
    if now - first >= endpoint.retry_for:
        gave_up = f"gave up after {row.attempts + 1} attempts: {values['last_error']}"
        return {**values, "status": HttpOutboxStatus.FAILED, "last_error": gave_up}
    next_at = now + retry_delay(endpoint, row.attempts + 1)
    return {**values, "status": HttpOutboxStatus.PENDING, "next_attempt_at": next_at}


def _error(answer: Answer) -> str:
    if answer.status is None:
        return answer.text[:500]
    return f"HTTP {answer.status}: {answer.text[:200]}".rstrip(": ")


class Lane:
    """One destination's deliveries: its own client and slots, so it never waits on another."""

    def __init__(
        self, name: str, endpoint: Endpoint | None, queue: HttpQueue, observe: DeliveryObserver
    ) -> None:
        self.name = name
        self.endpoint = endpoint  # None: no longer configured; its rows fail
        self.queue = queue
        self.wakeup = asyncio.Event()
        self._observe = observe
        self.events: Callable[[], transitions.Events | None] = lambda: None
        self._client = httpx.AsyncClient(follow_redirects=False)
        self._in_flight: dict[asyncio.Task[None], Claimed] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                self.wakeup.clear()  # before looking, so a wakeup meanwhile is not lost
                free = LANE_SLOTS - len(self._in_flight)
                claimed = (
                    await asyncio.to_thread(self.queue.claim, self.name, free, self._lease())
                    if free
                    else []
                )
                for row in claimed:
                    task = asyncio.create_task(self._deliver(row), name=f"deliver {row.id}")
                    self._in_flight[task] = row
                if free and len(claimed) == free:
                    continue  # there may be more whose turn it is
                await self._wait(stopping)
            await self._finish()
        finally:
            for task in self._in_flight:
                task.cancel()
            await self._client.aclose()

    async def _wait(self, stopping: asyncio.Event) -> None:
        """Until woken, stopping, or a delivery ends (its request's next event may be due)."""
        waiters = [
            asyncio.ensure_future(self.wakeup.wait()),
            asyncio.ensure_future(stopping.wait()),
        ]
        try:
            await asyncio.wait([*waiters, *self._in_flight], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._reap()

    def _reap(self) -> None:
        for task in [task for task in self._in_flight if task.done()]:
            del self._in_flight[task]
            task.result()  # a failure to record stops the stage (the row stays leased)

    async def _finish(self) -> None:
        """At shutdown: POSTs in flight get `SHUTDOWN_GRACE`; the rest are given back unsent."""
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=SHUTDOWN_GRACE)
        late = [row.id for task, row in self._in_flight.items() if not task.done()]
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._in_flight.clear()
        await asyncio.to_thread(self.queue.release, late)

    def _lease(self) -> timedelta:
        return (self.endpoint.timeout if self.endpoint else timedelta(0)) + LEASE_MARGIN

    async def _deliver(self, row: Claimed) -> None:
        started = utcnow()
        endpoint = self.endpoint
        if endpoint is None:
            answer = Answer(None, f"{self.name!r} is no longer configured", final=True)
        else:
            answer = await post(
                self._client,
                row.url,
                row.body,
                secret=endpoint.secret,
                timeout=endpoint.timeout,
                headers=_event_headers(row),
            )
        values = outcome(endpoint, row, answer, started)
        event = audit_event(row.request_id, self._audit_name(), ACTOR, detail=_detail(row, values))
        settle = self._settle(row, values)
        await asyncio.to_thread(self.queue.record, row.id, values, [event], settle)
        self._log(row, answer, values)
        self._observe(self.name, _result(values))

    def _audit_name(self) -> str:
        return "callback_attempt" if self.name == CALLBACK else "webhook_attempt"

    def _settle(self, row: Claimed, values: dict[str, Any]) -> Callable[[Session], object] | None:
        """A bridged answer's POST that ended resumes its request (or fails it), in the same commit."""
        request_id = row.request_id
        if self.name != CALLBACK or request_id is None:
            return None
        if values["status"] not in (HttpOutboxStatus.DELIVERED, HttpOutboxStatus.FAILED):
            return None
        events = self.events()
        return lambda session: transitions.callback_settled(
            session,
            request_id,
            delivered=values["status"] == HttpOutboxStatus.DELIVERED,
            attempts=values["attempts"],
            error=values.get("last_error"),
            events=events,
        )

    def _log(self, row: Claimed, answer: Answer, values: dict[str, Any]) -> None:
        result = _result(values)
        level = {"delivered": logging.INFO, "retry": logging.WARNING}.get(result, logging.ERROR)
        log.log(
            level,
            "request %s: %s %s to %s, attempt %d: %s (%s)",
            row.request_id,
            row.event,
            row.event_id,
            self.name,
            values["attempts"],
            answer.describe(),
            result,
        )


def _event_headers(row: Claimed) -> dict[str, str]:
    return {"X-HITL-Event": row.event, "X-HITL-Event-Id": row.event_id}


def _result(values: dict[str, Any]) -> str:
    status = values["status"]
    return {HttpOutboxStatus.DELIVERED: "delivered", HttpOutboxStatus.PENDING: "retry"}.get(
        status, "failed"
    )


def _detail(row: Claimed, values: dict[str, Any]) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "to": row.destination,
        "event": row.event,
        "event_id": row.event_id,
        "attempt": values["attempts"],
        "status_code": values["last_status"],
        "result": _result(values),
    }
    if values.get("last_error"):
        detail["error"] = values["last_error"]
    if "next_attempt_at" in values:
        detail["next_attempt_at"] = values["next_attempt_at"].isoformat()
    return detail


class Deliveries:
    """The delivery stage: find which destinations have rows due and wake their lanes."""

    def __init__(
        self,
        config: Config,
        store: Store,
        poll: timedelta,
        observe: DeliveryObserver | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.queue = HttpQueue(store)
        self.config = config
        self.endpoints = endpoints(config)
        self.poll = poll.total_seconds()
        self.arrivals = arrivals or Arrivals()  # replies the SMTP listener stored lately
        self.wakeup = asyncio.Event()
        self._observe = observe or (lambda destination, result: None)
        self._lanes: dict[str, tuple[Lane, asyncio.Task[None]]] = {}

    def reload(self, config: Config) -> None:
        """New secrets, timeouts and retry bounds apply from the next attempt."""
        self.config = config
        self.endpoints = endpoints(config)
        for name, (lane, _) in self._lanes.items():
            lane.endpoint = self.endpoints.get(name)

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                self.wakeup.clear()
                due = await asyncio.to_thread(self.queue.due_by_destination)
                now = utcnow()
                wait = self.poll
                for destination, at in due.items():
                    if at <= now:
                        self._lane(destination, stopping).wakeup.set()
                    else:
                        wait = min(wait, (at - now).total_seconds())
                self._check_lanes()
                await idle(self.wakeup, stopping, wait)
                await let_flood_pass(self.arrivals, stopping, "webhook delivery")
        except asyncio.CancelledError:  # past the shutdown budget: drop what is in flight
            for _, task in self._lanes.values():
                task.cancel()
            raise
        finally:
            await self._stop_lanes()

    def _lane(self, name: str, stopping: asyncio.Event) -> Lane:
        if name not in self._lanes:
            lane = Lane(name, self.endpoints.get(name), self.queue, self._observe)
            lane.events = lambda: transitions.events_of(self.config)
            task = asyncio.create_task(lane.run(stopping), name=f"lane {name}")
            task.add_done_callback(lambda _: self.wakeup.set())
            self._lanes[name] = (lane, task)
        return self._lanes[name][0]

    def _check_lanes(self) -> None:
        """A lane that failed (its database writes did) fails the stage: the App restarts it."""
        for lane, task in self._lanes.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"delivery lane {lane.name} failed") from task.exception()

    async def _stop_lanes(self) -> None:
        tasks = [task for _, task in self._lanes.values()]
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()


async def send_test(webhook: WebhookSettings) -> Answer:
    """POST a signed sample `new_request` event to `webhook` now (`hitl-mail webhooks test`)."""
    payload = sample_payload(webhook)
    headers = {"X-HITL-Event": WebhookEvent.NEW_REQUEST, "X-HITL-Event-Id": payload["event_id"]}
    async with httpx.AsyncClient(follow_redirects=False) as client:
        return await post(
            client,
            webhook.url,
            body_bytes(payload),
            secret=webhook.secret,
            timeout=webhook.timeout,
            headers=headers,
        )
