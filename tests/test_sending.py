"""Sending, in process: a relay that is down is retried, one that refuses for good is not,
and a request nobody can be routed to is kept visible instead of mailed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import MailSink, ResumeParked, free_port, request_context, until, write_config
from llm_server import FakeLLMServer

from hitl_mail import app as app_module
from hitl_mail import intake
from hitl_mail.app import App
from hitl_mail.config import Config, load_config
from hitl_mail.models import AuditEvent, FeedbackRequest
from hitl_mail.routing import RoutingError
from hitl_mail.store import Store

T = TypeVar("T")

CONTEXT: dict[str, Any] = request_context()
NO_SUCH_USER = "550 5.1.1 no such user"


def events_named(store: Store, request_id: str, name: str) -> list[AuditEvent]:
    return [event for event in store.trail(request_id) if event.event == name]


@dataclass
class Relay:
    """A configuration pointing at `port`, where the test decides what (if anything) listens."""

    port: int
    config: Config

    def create(self, store: Store) -> FeedbackRequest:
        return intake.create_request(self.config, store, dict(CONTEXT), state={})


@pytest.fixture
def relay(tmp_path: Path, database_url: str, llm: FakeLLMServer) -> Relay:
    port = free_port()  # nothing listens here until a test starts something
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=port,
        llm_url=llm.url,
    )
    return Relay(port, load_config(path))


@pytest.fixture(autouse=True)
def no_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)


@pytest.fixture
def late_sink(relay: Relay) -> Iterator[MailSink]:
    """A mail sink for the relay port, not yet started."""
    sink = MailSink(relay.port)
    yield sink
    sink.stop()


async def test_a_notification_is_retried_while_the_relay_is_down_and_sent_once_when_it_is_up(
    relay: Relay, late_sink: MailSink
) -> None:
    async with App(relay.config) as app:
        request = relay.create(app.store)
        await until(
            lambda: len(events_named(app.store, request.id, "email_retry")) >= 2,
            "two retries while the relay is down",
        )

        late_sink.start()

        [notification] = await until(
            lambda: late_sink.of("notification", request.id), "the notification"
        )
        await until(lambda: events_named(app.store, request.id, "email_sent"), "email_sent")
        await asyncio.sleep(1.5)  # past the longest backoff: a duplicate would have come by now
        trail = [e for e in app.store.trail(request.id) if e.event.startswith("email_")]

    assert len(late_sink.of("notification", request.id)) == 1
    assert notification["To"] == "owner@example.com"
    kinds = [e.event for e in trail]
    assert kinds[-1] == "email_sent"
    assert kinds.count("email_sent") == 1
    assert set(kinds[:-1]) == {"email_retry"}
    assert len(kinds) >= 3
    attempts = [e.detail["attempt"] for e in trail]
    assert attempts == list(range(1, len(trail) + 1))
    assert all(e.detail["error"] for e in trail[:-1])


class Refusing:
    """A relay that refuses every message for good, at RCPT or at the end of DATA."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.attempts = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.stage == "RCPT":
            self.attempts += 1
            return NO_SUCH_USER
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        return NO_SUCH_USER


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
async def test_a_relay_that_refuses_for_good_records_email_failed_with_its_reason_and_no_retry(
    relay: Relay, stage: str
) -> None:
    refusing = Refusing(stage)
    controller = Controller(refusing, hostname="127.0.0.1", port=relay.port)
    controller.start()
    try:
        async with App(relay.config) as app:
            request = relay.create(app.store)
            [failed] = await until(
                lambda: events_named(app.store, request.id, "email_failed"), "email_failed"
            )
            await asyncio.sleep(1.0)  # longer than retry_initial: a retry would show by now
            [row] = app.store.outbox_for(request.id)
            retries = events_named(app.store, request.id, "email_retry")
    finally:
        controller.stop()

    assert "550" in failed.detail["error"]
    assert "no such user" in failed.detail["error"]
    assert failed.detail["attempt"] == 1
    assert retries == []
    assert refusing.attempts == 1
    assert (row.status, row.attempts) == ("failed", 1)
    assert "550" in (row.last_error or "")


def test_a_request_routed_to_an_invalid_address_is_kept_as_unroutable_and_not_mailed(
    tmp_path: Path, database_url: str
) -> None:
    rule = """
[[routing.rules]]
name = "Reviews go to the manager"
assign_from_input = "manager.email"
"""
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=free_port(),
        llm_url="http://127.0.0.1:9/v1",
        extra=rule,
    )
    config = load_config(path)
    store = Store(config.daemon.database_url)
    store.migrate()
    try:
        with pytest.raises(RoutingError, match="not an email address"):
            intake.create_request(
                config, store, dict(CONTEXT), state={"manager": {"email": "not an address"}}
            )

        [kept] = store.requests("unroutable")
        assert kept.assigned_to is None
        assert "manager.email" in (kept.last_error or "")
        assert "not an address" in (kept.last_error or "")
        [routing_failed] = events_named(store, kept.id, "routing_failed")
        assert "Reviews go to the manager" in routing_failed.detail
        assert store.outbox_for(kept.id) == []
        assert store.requests("pending") == []
    finally:
        store.close()


async def test_sending_waits_while_a_flood_of_replies_arrives_and_sends_once_it_has_passed(
    relay: Relay, late_sink: MailSink, database_url: str
) -> None:
    """Every stage leaves the machine to the SMTP listener during a burst (waiting.py)."""
    from hitl_mail.outbound import Outbox
    from hitl_mail.waiting import Arrivals

    late_sink.start()
    store = Store(database_url)
    store.migrate()
    arrivals = Arrivals()
    outbox = Outbox(
        store, relay.config.outbound, relay.config.daemon.poll_interval, arrivals=arrivals
    )
    loop = asyncio.get_running_loop()

    async def flood(seconds: float) -> None:  # a flood however slowly a loaded machine runs this
        until_ = loop.time() + seconds
        while loop.time() < until_:
            arrivals.note(100)
            await asyncio.sleep(0.002)

    flooding = asyncio.create_task(flood(1.2))
    await until(arrivals.flooding, "a flood")
    request = relay.create(store)  # its notification is due now
    stopping = asyncio.Event()
    running = asyncio.create_task(outbox.run(stopping))
    try:
        await asyncio.sleep(0.8)
        sent_during = late_sink.of("notification", request.id)
        await flooding
        await until(lambda: late_sink.of("notification", request.id), "the notification")
    finally:
        stopping.set()
        await running
        store.close()
    assert sent_during == []  # it waited for the flood to pass
