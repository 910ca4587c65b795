"""Replies, in process: what the SMTP edge refuses, what the answering stage records, who is told.

Each test runs the real `App` (SMTP listener, answering and sending stages) on
loopback against a real database, sends real SMTP, and asserts on what a user
or an operator could observe: SMTP reply codes, the request's status, its
audit trail, and the mail that reached the relay (`mail_sink`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest
import sqlalchemy as sa
from conftest import (
    BACKEND,
    MailSink,
    ResumeParked,
    add_request,
    free_port,
    reply_to,
    request_context,
    until,
    write_config,
)
from llm_server import FakeLLMServer
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select

from hitl_mail import answering, intake, outcomes, tokens, waiting
from hitl_mail import app as app_module
from hitl_mail.app import App
from hitl_mail.config import Config, load_config
from hitl_mail.models import (
    AuditEvent,
    FeedbackRequest,
    InboundMessage,
    OutboxMessage,
    OutboxStatus,
    RequestStatus,
    utcnow,
)
from hitl_mail.resume import Resumer
from hitl_mail.store import Store
from hitl_mail.waiting import Arrivals

T = TypeVar("T")

ASSIGNEE = "owner@example.com"
FORGER = "mallory@attacker.example.net"
OPTIONS = ["approved", "rejected", "needs_revision"]
CONTEXT: dict[str, Any] = request_context(emit=OPTIONS)
# Serialise as a mail client does: no folding, so long Message-IDs stay msg-ids
# (the stdlib would otherwise rewrite them as RFC 2047 encoded words).
CLIENT = policy.SMTP.clone(max_line_length=None)


@dataclass
class Daemon:
    """A running `App` and what a test needs around it."""

    app: App
    config: Config
    sink: MailSink
    llm: FakeLLMServer

    @property
    def store(self) -> Store:
        return self.app.store

    @property
    def port(self) -> int:
        return self.app.smtp_port

    def create(self, **context: Any) -> FeedbackRequest:
        return intake.create_request(self.config, self.store, {**CONTEXT, **context}, state={})

    async def notified(self, **context: Any) -> tuple[FeedbackRequest, EmailMessage]:
        """A new pending request and the notification the assignee received for it."""
        request = self.create(**context)
        [notification] = await until(
            lambda: self.sink.of("notification", request.id), "the notification"
        )
        return request, notification

    def events(self, request_id: str) -> list[str]:
        return [event.event for event in self.store.trail(request_id)]

    async def event(self, request_id: str, name: str, count: int = 1) -> list[AuditEvent]:
        def found() -> list[AuditEvent]:
            events = [e for e in self.store.trail(request_id) if e.event == name]
            return events if len(events) >= count else []

        return await until(found, f"{count} {name!r} event(s) for request {request_id}")

    async def settled(self, request_id: str) -> list[OutboxMessage]:
        """Every mail queued for the request so far, once none is still waiting to be sent."""

        def done() -> list[OutboxMessage]:
            rows = self.store.outbox_for(request_id)
            return [] if any(r.status == OutboxStatus.QUEUED for r in rows) else rows

        return await until(done, f"the outbox of request {request_id} to drain")

    def mail_to(self, address: str) -> list[EmailMessage]:
        return [
            message
            for (_, recipients), message in zip(
                self.sink.envelopes, self.sink.messages, strict=True
            )
            if address in [r.lower() for r in recipients]
        ]

    def inbound(self) -> list[InboundMessage]:
        with self.store.session() as session:
            return list(session.exec(select(InboundMessage).order_by(InboundMessage.id)))  # type: ignore[arg-type]


@pytest.fixture
def config(tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer) -> Config:
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=mail_sink.port,
        llm_url=llm.url,
    )
    return load_config(path)


@pytest.fixture
async def daemon(
    config: Config, mail_sink: MailSink, llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemon]:
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)
    async with App(config) as app:
        yield Daemon(app, config, mail_sink, llm)
    await outcomes.close_llm_clients()


async def deliver(
    port: int, message: EmailMessage | bytes, *, mail_from: str, rcpt: list[str]
) -> aiosmtplib.SMTPResponse:
    """One SMTP transaction; returns the server's answer to the end of DATA."""
    raw = message if isinstance(message, bytes) else message.as_bytes(policy=CLIENT)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as smtp:
        await smtp.mail(mail_from)
        for address in rcpt:
            await smtp.rcpt(address)
        return await smtp.data(raw)


async def answer(daemon: Daemon, reply: EmailMessage, *, mail_from: str = ASSIGNEE) -> None:
    response = await deliver(daemon.port, reply, mail_from=mail_from, rcpt=[str(reply["To"])])
    assert response.code == 250


def replace(message: EmailMessage, **headers: str | None) -> EmailMessage:
    """Set (or, with None, remove) headers; names use `_` for `-`."""
    for name, value in headers.items():
        header = name.replace("_", "-")
        del message[header]
        if value is not None:
            message[header] = value
    return message


def options_in(mail: EmailMessage) -> bool:
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    return all(option in text for option in OPTIONS)


# -- refused at the SMTP edge -------------------------------------------------------------


async def refused_at_rcpt(daemon: Daemon, recipient: str) -> aiosmtplib.SMTPRecipientRefused:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10) as smtp:
        await smtp.ehlo()
        await smtp.mail(ASSIGNEE)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await smtp.rcpt(recipient)
    return refused.value


async def test_answering_reads_a_request_without_its_flow_state(daemon: Daemon) -> None:
    request = intake.create_request(
        daemon.config, daemon.store, CONTEXT, state={"draft": "x" * 100_000}
    )

    light = daemon.store.find(request.id, with_state=False)

    assert light is not None
    assert (light.emit, light.assigned_to, light.message) == (
        OPTIONS,
        ASSIGNEE,
        request.message,
    )
    with pytest.raises(SQLAlchemyError):
        _ = light.state  # never loaded: answering has no use for it
    assert daemon.store.get(request.id).state == {"draft": "x" * 100_000}


async def test_a_recipient_in_another_domain_is_refused_so_the_listener_is_never_an_open_relay(
    daemon: Daemon,
) -> None:
    refused = await refused_at_rcpt(daemon, "someone@elsewhere.example.net")
    assert refused.code == 550
    assert "relay" in refused.message.lower()
    assert daemon.inbound() == []


async def test_a_forged_token_is_refused_at_rcpt(daemon: Daemon) -> None:
    request = daemon.create()
    forged = tokens.mint(request.id, ASSIGNEE, ["not-our-secret-key-0123456789"])
    assert tokens.looks_like_token(forged)  # well-formed: only the signature is wrong

    refused = await refused_at_rcpt(daemon, f"reply+{forged}@reply.example.com")

    assert refused.code == 550
    assert daemon.inbound() == []


async def test_a_token_minted_for_another_address_is_refused_at_rcpt(daemon: Daemon) -> None:
    request = daemon.create()
    for_forger = tokens.mint(request.id, FORGER, daemon.config.secret_keys)

    refused = await refused_at_rcpt(daemon, f"reply+{for_forger}@reply.example.com")

    assert refused.code == 550


@pytest.mark.skipif(BACKEND != "postgres", reason="the edge's own connections are PostgreSQL's")
async def test_lost_database_connections_are_replaced_and_the_reply_is_answered_once(
    daemon: Daemon,
) -> None:
    """As when PostgreSQL restarts: the edge opens new connections. A statement cut off
    in mid-flight costs a 451 (test_edgestore.py), which a sender retries."""
    request, notification = await daemon.notified()
    reply = reply_to(notification, "approved")
    recipient = str(reply["To"])
    assert (
        await deliver(daemon.port, reply_to(notification, "x"), mail_from=FORGER, rcpt=[recipient])
    ).code == 250
    engine = sa.create_engine(daemon.config.daemon.database_url)
    with engine.connect() as conn:
        ended = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'hitl-mail-edge' AND datname = current_database()"
            )
        ).scalar_one()
    engine.dispose()
    assert ended == 2  # the edge's read and write connections

    codes = []
    for _ in range(3):  # as a sending MTA retries a 4xx
        try:
            sent = await deliver(daemon.port, reply, mail_from=ASSIGNEE, rcpt=[recipient])
            codes.append(sent.code)
            break
        except (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError) as refused:
            codes.append(refused.code)
    assert codes[-1] == 250
    assert set(codes[:-1]) <= {451}

    await daemon.event(request.id, "answered")
    assert daemon.store.get(request.id).outcome == "approved"
    assert [m.dedupe_key for m in daemon.inbound()].count(f"mid:{reply['Message-ID']}") == 1


@pytest.mark.parametrize(
    "recipient",
    [
        "reply+garbage@reply.example.com",
        "reply+" + "!" * 48 + "@reply.example.com",
        "someone-else@reply.example.com",
    ],
)
async def test_a_local_part_that_carries_no_token_is_refused_at_rcpt(
    daemon: Daemon, recipient: str
) -> None:
    refused = await refused_at_rcpt(daemon, recipient)
    assert refused.code == 550


async def test_a_message_larger_than_max_message_size_is_refused_with_552(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    big = reply_to(notification, "approved\n" + "x" * 76 * 3000)  # ~230 KB > 200KB
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10) as smtp:
        await smtp.ehlo()
        assert smtp.esmtp_extensions["size"] == "200000"
        await smtp.mail(ASSIGNEE)
        await smtp.rcpt(str(notification["Reply-To"]))
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp.data(big.as_bytes(policy=CLIENT))
    assert refused.value.code == 552
    assert daemon.inbound() == []
    assert daemon.store.get(request.id).status == "pending"


# -- matched ------------------------------------------------------------------------------


def mixed_case(text: str) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(text))


@pytest.mark.parametrize("case", [str.upper, str.lower, mixed_case])
async def test_the_token_is_matched_whatever_the_letter_case_of_the_recipient(
    daemon: Daemon, case: Callable[[str], str]
) -> None:
    request, notification = await daemon.notified()
    recipient = case(str(notification["Reply-To"]))

    await answer(daemon, reply_to(notification, "Approved", to=recipient))

    await daemon.event(request.id, "answered")
    answered = daemon.store.get(request.id)
    assert (answered.status, answered.outcome, answered.source) == ("answered", "approved", "email")


# -- not recorded, and nobody but the token's address is mailed ---------------------------


async def test_a_reply_from_another_address_records_nothing_and_never_mails_that_address(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()

    await answer(daemon, reply_to(notification, "Approved", sender=FORGER), mail_from=FORGER)

    [refusal] = await daemon.event(request.id, "reply_wrong_sender")
    assert refusal.detail["from"] == FORGER
    assert daemon.store.get(request.id).status == "pending"
    queued = await daemon.settled(request.id)
    assert {row.recipient for row in queued} == {ASSIGNEE}
    assert daemon.mail_to(FORGER) == []
    [warning] = daemon.sink.of("error", request.id)
    assert warning["X-HITL-Error"] == "wrong_sender"
    assert warning["To"] == ASSIGNEE
    assert daemon.sink.of("confirmation", request.id) == []


SPOOFED_FROMS = {
    "encoded-display-name": [
        b"From: =?utf-8?q?Owner_=3Cowner=40example=2Ecom=3E?= <mallory@attacker.example.net>"
    ],
    "address-as-display-name": [b"From: owner@example.com <mallory@attacker.example.net>"],
    "two-mailboxes": [b"From: owner@example.com, mallory@attacker.example.net"],
    "group": [b"From: Team: owner@example.com;"],
    "second-from-header": [b"From: owner@example.com", b"From: mallory@attacker.example.net"],
    "address-in-a-comment": [b"From: mallory@attacker.example.net (owner@example.com)"],
    "quoted-local-part": [b'From: "owner@example.com"@attacker.example.net'],
    "nul-in-from": [b"From: owner@example.com\x00 <mallory@attacker.example.net>"],
}


def with_from(reply: EmailMessage, from_lines: list[bytes]) -> bytes:
    """The reply's bytes with its From header replaced by ``from_lines``, as written."""
    head, _, body = reply.as_bytes(policy=CLIENT).partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.startswith(b"From: ")]
    return b"\r\n".join([*from_lines, *lines]) + b"\r\n\r\n" + body


async def test_a_spoofed_from_with_a_genuine_token_never_answers_but_the_assignee_still_can(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    recipient = str(notification["Reply-To"])

    for from_lines in SPOOFED_FROMS.values():
        spoof = with_from(reply_to(notification, "Approved"), from_lines)
        response = await deliver(daemon.port, spoof, mail_from=FORGER, rcpt=[recipient])
        assert response.code == 250  # stored; refused by answering, where it is recorded

    refusals = await daemon.event(request.id, "reply_wrong_sender", count=len(SPOOFED_FROMS))
    assert len(refusals) == len(SPOOFED_FROMS)
    assert {event.detail["from"] for event in refusals} == {
        None,  # the five that name no one mailbox
        "mallory@attacker.example.net",
        '"owner@example.com"@attacker.example.net',
    }
    assert daemon.store.get(request.id).status == "pending"
    queued = await daemon.settled(request.id)
    assert {row.recipient for row in queued} == {ASSIGNEE}  # the notification, one warning
    assert not [r for _, rs in daemon.sink.envelopes for r in rs if "attacker" in r.lower()]

    await answer(daemon, reply_to(notification, "Approved"))

    await daemon.event(request.id, "answered")
    answered = daemon.store.get(request.id)
    assert (answered.status, answered.outcome, answered.answered_by) == (
        "answered",
        "approved",
        ASSIGNEE,
    )


async def test_a_reply_to_an_expired_token_records_nothing_and_explains_to_the_tokens_address(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    eight_days_ago = utcnow() - timedelta(days=8)
    old = tokens.mint(request.id, ASSIGNEE, daemon.config.secret_keys, now=eight_days_ago)

    await answer(daemon, reply_to(notification, "Approved", to=f"reply+{old}@reply.example.com"))

    await daemon.event(request.id, "reply_expired")
    assert daemon.store.get(request.id).status == "pending"
    await daemon.settled(request.id)
    [expired] = daemon.sink.of("error", request.id)
    assert expired["X-HITL-Error"] == "expired"
    assert expired["To"] == ASSIGNEE  # the token's own address, who happens to be the sender
    assert daemon.sink.of("confirmation", request.id) == []


async def test_a_link_older_than_the_requests_current_one_is_refused_and_the_current_one_offered(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    an_hour_ago = utcnow() - timedelta(hours=1)  # within max_age, but before the current link
    older = tokens.mint(request.id, ASSIGNEE, daemon.config.secret_keys, now=an_hour_ago)

    await answer(daemon, reply_to(notification, "Approved", to=f"reply+{older}@reply.example.com"))

    [refused] = await daemon.event(request.id, "reply_expired")
    assert refused.detail["why"].startswith("revoked")
    assert daemon.store.get(request.id).status == "pending"
    await daemon.settled(request.id)
    [expired] = daemon.sink.of("error", request.id)
    assert (
        expired["Reply-To"].addresses[0].addr_spec
        == notification["Reply-To"].addresses[0].addr_spec
    )
    assert daemon.store.get(request.id).token == request.token  # nothing minted: it still works


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto_Submitted": "auto-replied"},
        {"Subject": "Out of Office: Re: Approve?"},
    ],
    ids=["auto-submitted", "out-of-office-subject"],
)
async def test_an_auto_reply_records_nothing_and_sends_no_mail_at_all(
    daemon: Daemon, headers: dict[str, str]
) -> None:
    request, notification = await daemon.notified()
    reply = replace(reply_to(notification, "I am out of the office until Monday."), **headers)

    await answer(daemon, reply)

    [refusal] = await daemon.event(request.id, "reply_machine_mail")
    assert refusal.actor == ASSIGNEE
    assert daemon.store.get(request.id).status == "pending"
    queued = await daemon.settled(request.id)
    assert [row.kind for row in queued] == ["notification"]
    assert len(daemon.sink.messages) == 1  # the notification, nothing since
    assert daemon.llm.requests == []


async def test_a_bounce_with_a_null_sender_records_nothing_and_sends_no_mail_at_all(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    recipient = str(notification["Reply-To"])
    bounce = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.client.example.org>\r\n"
        f"To: {recipient}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <bounce.1@mx.client.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n"
        "--B\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "approved\r\n"
        "--B\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.client.example.org\r\n"
        "\r\n"
        "Final-Recipient: rfc822; owner@example.com\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        "--B--\r\n"
    ).encode()

    response = await deliver(daemon.port, bounce, mail_from="", rcpt=[recipient])

    assert response.code == 250
    [refusal] = await daemon.event(request.id, "reply_machine_mail")
    assert refusal.detail["why"].startswith("bounce")
    assert daemon.store.get(request.id).status == "pending"
    assert [row.kind for row in await daemon.settled(request.id)] == ["notification"]
    assert len(daemon.sink.messages) == 1


@pytest.mark.parametrize(
    "headers",
    [{"Auto_Submitted": "no"}, {"X_Auto_Response_Suppress": "All"}],
    ids=["auto-submitted-no", "x-auto-response-suppress"],
)
async def test_a_person_s_reply_with_headers_that_look_automatic_is_answered(
    daemon: Daemon, headers: dict[str, str]
) -> None:
    request, notification = await daemon.notified()

    await answer(daemon, replace(reply_to(notification, "Approved"), **headers))

    await daemon.event(request.id, "answered")
    assert daemon.store.get(request.id).outcome == "approved"


# -- at most once ---------------------------------------------------------------------------


async def test_the_same_message_delivered_twice_is_answered_once_with_one_confirmation(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    reply = reply_to(notification, "Approved")
    raw = reply.as_bytes(policy=CLIENT)
    recipient = [str(notification["Reply-To"])]

    first = await deliver(daemon.port, raw, mail_from=ASSIGNEE, rcpt=recipient)
    await daemon.event(request.id, "answered")
    second = await deliver(daemon.port, raw, mail_from=ASSIGNEE, rcpt=recipient)

    assert (first.code, second.code) == (250, 250)
    assert len(daemon.inbound()) == 1
    await daemon.settled(request.id)
    await asyncio.sleep(0.5)  # several poll intervals: a second processing would show by now
    assert len(daemon.sink.of("confirmation", request.id)) == 1
    assert daemon.sink.of("error", request.id) == []
    events = daemon.events(request.id)
    assert events.count("answered") == 1
    assert "reply_already_answered" not in events


async def test_a_message_without_message_id_delivered_twice_is_deduplicated_by_content(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    reply = replace(reply_to(notification, "Approved"), Message_ID=None)
    raw = reply.as_bytes(policy=CLIENT)
    assert b"Message-ID" not in raw
    recipient = [str(notification["Reply-To"])]

    first = await deliver(daemon.port, raw, mail_from=ASSIGNEE, rcpt=recipient)
    second = await deliver(daemon.port, raw, mail_from=ASSIGNEE, rcpt=recipient)

    assert (first.code, second.code) == (250, 250)
    [stored] = daemon.inbound()
    assert stored.dedupe_key.startswith("sha256:")
    await daemon.event(request.id, "answered")
    await daemon.settled(request.id)
    assert len(daemon.sink.of("confirmation", request.id)) == 1
    assert daemon.sink.of("error", request.id) == []


async def test_two_replies_at_once_answer_once_and_the_second_is_told_it_was_already_answered(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()
    replies = [reply_to(notification, "Approved"), reply_to(notification, "Rejected")]

    responses = await asyncio.gather(*(answer(daemon, reply) for reply in replies))

    assert responses == [None, None]
    await daemon.event(request.id, "answered")
    await daemon.event(request.id, "reply_already_answered")
    await daemon.settled(request.id)
    events = daemon.events(request.id)
    assert events.count("answered") == 1
    assert events.count("reply_already_answered") == 1
    answered = daemon.store.get(request.id)
    assert answered.outcome in {"approved", "rejected"}
    [confirmation] = daemon.sink.of("confirmation", request.id)
    assert confirmation["X-HITL-Outcome"] == answered.outcome
    [already] = daemon.sink.of("error", request.id)
    assert already["X-HITL-Error"] == "already_answered"
    assert already["To"] == ASSIGNEE


# -- undecided ------------------------------------------------------------------------------


async def test_when_the_llm_fails_the_request_stays_pending_and_the_responder_is_told_the_options(
    daemon: Daemon,
) -> None:
    daemon.llm.mode = "fail"
    request, notification = await daemon.notified()
    text = "Let us go with whatever finance prefers this quarter"

    await answer(daemon, reply_to(notification, text))

    [undecided] = await daemon.event(request.id, "reply_undecided")
    assert text in undecided.detail["why"]["text"]
    assert undecided.detail["why"]["llm_calls"] == len(daemon.llm.requests) >= 1
    assert daemon.store.get(request.id).status == "pending"
    await daemon.settled(request.id)
    [told] = daemon.sink.of("error", request.id)
    assert told["X-HITL-Error"] == "undecided"
    assert told["To"] == ASSIGNEE
    assert options_in(told)

    llm_calls = len(daemon.llm.requests)
    await answer(daemon, reply_to(notification, "rejected"))

    await daemon.event(request.id, "answered")
    answered = daemon.store.get(request.id)
    assert (answered.status, answered.outcome) == ("answered", "rejected")
    assert len(daemon.llm.requests) == llm_calls  # an exact option needs no LLM


@pytest.mark.parametrize(
    ("mode", "internal"),
    [("invalid", "maybe"), ("fail", "fake LLM server error")],
    ids=["answer-outside-the-options", "provider-error"],
)
async def test_the_undecided_mail_never_quotes_the_llm_or_the_provider_which_stay_in_the_audit(
    daemon: Daemon, mode: str, internal: str
) -> None:
    daemon.llm.mode = mode
    request, notification = await daemon.notified()

    await answer(daemon, reply_to(notification, "Let us go with whatever finance prefers"))

    [undecided] = await daemon.event(request.id, "reply_undecided")
    assert internal in undecided.detail["why"]["reason"]
    await daemon.settled(request.id)
    [told] = daemon.sink.of("error", request.id)
    assert told["X-HITL-Error"] == "undecided"
    assert options_in(told)
    for part in ("plain", "html"):
        assert internal not in told.get_body((part,)).get_content()  # type: ignore[union-attr]


async def test_an_exact_answer_never_waits_behind_llm_calls_for_other_requests(
    daemon: Daemon,
) -> None:
    daemon.llm.mode = "slow"  # each LLM answer takes 4 s
    daemon.llm.delay = 4.0
    waiting = [await daemon.notified() for _ in range(10)]  # more than the stage's 8 slots
    request, notification = await daemon.notified()

    for _, other in waiting:
        await answer(daemon, reply_to(other, "Let us go with whatever finance prefers"))
    await answer(daemon, reply_to(notification, "Rejected"))

    await daemon.event(request.id, "answered")
    assert daemon.store.get(request.id).outcome == "rejected"
    # Answered while the replies that need the LLM were still waiting for it.
    assert [daemon.store.get(r.id).status for r, _ in waiting] == ["pending"] * len(waiting)
    for other, _ in waiting:
        await daemon.event(other.id, "answered")  # each in turn, through the LLM lane


async def test_replies_beyond_the_llm_backlog_are_taken_again_later_and_none_is_lost(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hitl_mail.answering")
    monkeypatch.setattr(answering, "LLM_BACKLOG", 1)
    monkeypatch.setattr(answering, "DEFER_FOR", timedelta(milliseconds=300))
    daemon.llm.mode = "slow"
    daemon.llm.delay = 1.0
    notified = [await daemon.notified() for _ in range(3)]

    for _, notification in notified:
        await answer(daemon, reply_to(notification, "Let us go with whatever finance prefers"))

    for request, _ in notified:
        [answered] = await daemon.event(request.id, "answered")
        assert answered.detail["method"] == "llm"
    assert len(daemon.llm.requests) == 3  # one decision each: a deferred reply is not decided
    assert any("the LLM lane is full" in record.getMessage() for record in caplog.records)


# -- error mail limits --------------------------------------------------------------------


async def test_an_error_mail_about_one_request_never_hides_one_about_another(
    daemon: Daemon,
) -> None:
    notified = [await daemon.notified() for _ in range(3)]

    for _, notification in notified:
        await answer(daemon, reply_to(notification, "Approved", sender=FORGER), mail_from=FORGER)

    for request, _ in notified:
        await daemon.event(request.id, "reply_wrong_sender")
        await daemon.settled(request.id)
        [warning] = daemon.sink.of("error", request.id)
        assert (warning["X-HITL-Error"], warning["To"]) == ("wrong_sender", ASSIGNEE)


async def test_error_mails_about_one_request_are_one_per_kind_and_three_in_all_a_day(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified(default_outcome=None)
    old = tokens.mint(request.id, ASSIGNEE, daemon.config.secret_keys, utcnow() - timedelta(days=8))
    stale = f"reply+{old}@reply.example.com"
    replies: list[tuple[EmailMessage, str, str, int]] = [  # reply, sender, event, its count
        (reply_to(notification, "Approved", sender=FORGER), FORGER, "reply_wrong_sender", 1),
        (reply_to(notification, "Rejected", sender=FORGER), FORGER, "reply_wrong_sender", 2),
        (reply_to(notification, ""), ASSIGNEE, "reply_undecided", 1),
        (reply_to(notification, "Approved", to=stale), ASSIGNEE, "reply_expired", 1),
        (reply_to(notification, "Approved"), ASSIGNEE, "answered", 1),
        (reply_to(notification, "Rejected"), ASSIGNEE, "reply_already_answered", 1),
    ]

    for reply, sender, event, count in replies:
        await answer(daemon, reply, mail_from=sender)
        await daemon.event(request.id, event, count)

    await daemon.settled(request.id)
    told = [mail["X-HITL-Error"] for mail in daemon.sink.of("error", request.id)]
    assert sorted(told) == ["expired", "undecided", "wrong_sender"]
    assert daemon.events(request.id).count("error_mail_suppressed") == 2


async def test_an_empty_reply_without_a_default_outcome_stays_pending_and_is_told_the_options(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified(default_outcome=None)

    await answer(daemon, reply_to(notification, ""))

    await daemon.event(request.id, "reply_undecided")
    assert daemon.store.get(request.id).status == "pending"
    await daemon.settled(request.id)
    [told] = daemon.sink.of("error", request.id)
    assert told["X-HITL-Error"] == "undecided"
    assert options_in(told)
    assert daemon.llm.requests == []


async def test_an_empty_reply_takes_the_default_outcome_without_an_llm_call(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified(default_outcome="rejected")

    await answer(daemon, reply_to(notification, ""))

    await daemon.event(request.id, "answered")
    answered = daemon.store.get(request.id)
    assert (answered.status, answered.outcome) == ("answered", "rejected")
    assert daemon.llm.requests == []


# -- malformed mail -------------------------------------------------------------------------


def truncated_mime(recipient: str) -> bytes:
    return (
        f"From: {ASSIGNEE}\r\nTo: {recipient}\r\nSubject: Re: Approve?\r\n"
        "Message-ID: <truncated.1@client.example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="CUT"\r\n\r\n'
        "--CUT\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nYXBwcm92ZWQKCk9uIE1vbiwg\r\n--CU"
    ).encode()


def binary_junk(recipient: str) -> bytes:
    headers = f"From: {ASSIGNEE}\r\nTo: {recipient}\r\nSubject: Re: Approve?\r\n\r\n"
    return headers.encode() + bytes(range(256)) * 8


def nul_in_message_id(recipient: str) -> bytes:
    return (
        f"From: {ASSIGNEE}\r\nTo: {recipient}\r\nSubject: Re: Approve?\r\n"
        "Message-ID: <nul\x00inside@client.example.org>\r\n\r\nApproved\r\n"
    ).encode()


@pytest.mark.parametrize(
    "malformed",
    [truncated_mime, binary_junk, nul_in_message_id],
    ids=["truncated-mime", "binary-junk", "nul-in-message-id"],
)
async def test_a_malformed_message_is_stored_and_processed_and_the_listener_keeps_working(
    daemon: Daemon, malformed: Callable[[str], bytes]
) -> None:
    broken, broken_notification = await daemon.notified()
    recipient = str(broken_notification["Reply-To"])

    response = await deliver(
        daemon.port, malformed(recipient), mail_from=ASSIGNEE, rcpt=[recipient]
    )

    assert response.code == 250
    processed = await until(
        lambda: [m for m in daemon.inbound() if m.status == "done"], "the malformed message"
    )
    assert processed[0].request_id == broken.id
    assert processed[0].result is not None

    request, notification = await daemon.notified()
    await answer(daemon, reply_to(notification, "Needs revision"))
    await daemon.event(request.id, "answered")
    assert daemon.store.get(request.id).outcome == "needs_revision"


# -- a burst of replies ----------------------------------------------------------------------


def test_a_flood_is_more_than_flood_rate_replies_a_second_over_the_last_window() -> None:
    now = [100.0]
    arrivals = Arrivals(clock=lambda: now[0])
    limit = int(waiting.FLOOD_RATE * waiting.FLOOD_WINDOW)
    arrivals.note(limit)
    now[0] += 2 * waiting.ONSET_WINDOW  # not the onset rule: nothing came in its window
    assert not arrivals.flooding()  # at the rate, not over it
    arrivals.note()
    now[0] += 2 * waiting.ONSET_WINDOW
    assert arrivals.flooding()  # a pause in a burst does not end it
    now[0] += waiting.FLOOD_WINDOW
    assert not arrivals.flooding()  # the burst has passed

    steady = Arrivals(clock=lambda: now[0])
    for _ in range(5 * limit):  # just under the rate, for ten windows
        now[0] += 1 / (0.95 * waiting.FLOOD_RATE)
        steady.note()
        assert not steady.flooding()


def test_a_burst_is_a_flood_from_its_first_onset_count_replies() -> None:
    now = [100.0]
    arrivals = Arrivals(clock=lambda: now[0])
    arrivals.note(waiting.ONSET_COUNT - 1)
    assert not arrivals.flooding()
    now[0] += waiting.ONSET_WINDOW / 2
    arrivals.note()  # ONSET_COUNT within ONSET_WINDOW
    assert arrivals.flooding()
    now[0] += waiting.ONSET_WINDOW  # and nothing since
    assert not arrivals.flooding()


async def test_settling_waits_until_the_newest_reply_is_onset_window_old() -> None:
    loop = asyncio.get_running_loop()
    arrivals = Arrivals(clock=loop.time)
    began = loop.time()
    await arrivals.settle()  # nothing stored yet: no wait
    assert loop.time() - began < waiting.ONSET_WINDOW
    arrivals.note()
    began = loop.time()
    await arrivals.settle()
    assert loop.time() - began >= waiting.ONSET_WINDOW * 0.9  # the loop's clock resolution
    began = loop.time()
    await arrivals.settle()  # the newest is that old already
    assert loop.time() - began < waiting.ONSET_WINDOW


async def paced_replies(daemon: Daemon, count: int, per_second: float) -> tuple[list[str], Any]:
    """`count` pending requests answered one after another at `per_second`; the last 250's time."""
    requests = [daemon.create() for _ in range(count)]
    notifications = [
        (await until(lambda r=r: daemon.sink.of("notification", r.id), "a notification"))[0]
        for r in requests
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, notification in enumerate(notifications):
        await asyncio.sleep(max(0.0, start + i / per_second - loop.time()))
        await answer(daemon, reply_to(notification, "approved"))
    return [r.id for r in requests], utcnow()


async def answered_before(daemon: Daemon, ids: list[str], moment: Any) -> int:
    """How many of the requests were answered before `moment`, once all of them are answered."""

    def all_answered() -> list[FeedbackRequest]:
        found = [daemon.store.get(i) for i in ids]
        return found if all(r.answered_at is not None for r in found) else []

    found = await until(all_answered, f"{len(ids)} answers", timeout=30)
    return sum(1 for r in found if r.answered_at < moment.replace(tzinfo=r.answered_at.tzinfo))


async def test_while_replies_arrive_faster_than_the_flood_rate_answering_waits_for_them_to_pass(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiting, "FLOOD_RATE", 8.0)  # a flood: over 2 in a quarter second

    ids, last_250 = await paced_replies(daemon, 40, per_second=40)

    # The first replies are answered as they come (two in a window is no flood
    # yet); the rest wait for the burst's end.
    assert await answered_before(daemon, ids, last_250) <= 12


async def test_answering_waits_for_a_flood_at_most_max_yield_at_a_time(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiting, "FLOOD_RATE", 8.0)
    monkeypatch.setattr(waiting, "MAX_YIELD", 0.3)

    ids, last_250 = await paced_replies(daemon, 60, per_second=40)

    # 1.5-3 s of flood: answering took a batch after every 0.3 s of waiting.
    assert await answered_before(daemon, ids, last_250) >= 30


async def test_answering_waits_from_the_first_reply_of_a_burst_until_it_has_passed(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The onset rule alone (the quarter-second rule set out of reach): nothing is
    answered while the burst arrives, not even its first replies."""
    monkeypatch.setattr(waiting, "FLOOD_RATE", 1e9)
    monkeypatch.setattr(waiting, "ONSET_WINDOW", 0.5)  # a loaded test machine sends slowly
    requests = [daemon.create() for _ in range(40)]
    notifications = [
        (await until(lambda r=r: daemon.sink.of("notification", r.id), "a notification"))[0]
        for r in requests
    ]
    replies = [reply_to(n, "approved") for n in notifications]

    async def client(mine: list[EmailMessage]) -> None:
        for reply in mine:
            await answer(daemon, reply)

    began = asyncio.get_running_loop().time()
    await asyncio.gather(*(client(replies[k::2]) for k in range(2)))
    last_250 = utcnow()

    # Long enough that answering, left alone, answers some of it as it comes
    # (without the onset rule, 32 of these 40 were answered before the last 250).
    assert asyncio.get_running_loop().time() - began > 0.3
    assert await answered_before(daemon, [r.id for r in requests], last_250) == 0


class ResumeClaimed(Resumer):
    """The real resume stage's loop; what it claims is noted with the time, not run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed: list[tuple[str, float]] = []

    def warm_up(self) -> None:
        return None

    async def _resume(self, request: Any) -> None:
        self.claimed.append((request.id, asyncio.get_running_loop().time()))


async def test_resuming_waits_while_a_flood_of_replies_arrives(config: Config) -> None:
    store = Store(config.daemon.database_url)
    store.migrate()
    add_request(store, "r1", RequestStatus.ANSWERED, answered_at=utcnow())
    arrivals = Arrivals()
    resumer = ResumeClaimed(config, store, arrivals=arrivals)
    loop = asyncio.get_running_loop()

    async def flood(seconds: float) -> None:  # about 2,000 replies a second
        until_ = loop.time() + seconds
        while loop.time() < until_:
            for _ in range(4):
                arrivals.note()
            await asyncio.sleep(0.002)

    flooding = asyncio.create_task(flood(0.8))
    await until(arrivals.flooding, "a flood")
    stopping = asyncio.Event()
    began = loop.time()
    running = asyncio.create_task(resumer.run(stopping))
    try:
        await flooding
        [(request_id, claimed_at)] = await until(lambda: resumer.claimed, "the claim")
    finally:
        stopping.set()
        await running
        await resumer.drain(1.0)
        store.close()
    assert request_id == "r1"
    assert claimed_at - began >= 0.7  # only once the flood had passed
