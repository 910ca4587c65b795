"""Who may answer (SPEC 9): sender authentication and the thread fallback, in the real App.

Every reply travels over real SMTP to the App's listener, except where the
listener refuses the bare `reply@` address (by default): there the test also
stores the reply as the listener would have (say, while `thread_fallback`
was on) to show what the answering stage makes of it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from email import policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from conftest import (
    MailSink,
    ResumeParked,
    free_port,
    reply_to,
    request_context,
    until,
    write_config,
)
from dkim_keys import Keys
from llm_server import FakeLLMServer
from sqlmodel import select

from hitl_mail import app as app_module
from hitl_mail import intake, outcomes
from hitl_mail.app import App
from hitl_mail.config import Config, load_config
from hitl_mail.models import FeedbackRequest, InboundMessage, InboundStatus

ASSIGNEE = "owner@example.com"  # conftest's default assignee: example.com signs its mail
FORGER = "mallory@attacker.example.net"
MX = "mx.example.com"
BARE = "reply@reply.example.com"
OPTIONS = ["approved", "rejected", "needs_revision"]
CLIENT = policy.SMTP.clone(max_line_length=None)  # as mail clients write: no folding
DMARC = f'require = "dmarc"\ntrusted_authserv_ids = ["{MX}"]'
DMARC_PASS = f"{MX}; dmarc=pass (p=reject dis=none) header.from=example.com"


class Running:
    """A running App, its configuration, and what the assignee received."""

    def __init__(self, app: App, config: Config, sink: MailSink) -> None:
        self.app, self.config, self.sink = app, config, sink

    async def notified(self) -> tuple[FeedbackRequest, EmailMessage]:
        request = intake.create_request(
            self.config, self.app.store, request_context(emit=OPTIONS), state={}
        )
        [notification] = await until(
            lambda: self.sink.of("notification", request.id), "the notification"
        )
        return request, notification

    async def send(self, raw: bytes, *, mail_from: str, rcpt: str) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=self.app.smtp_port, timeout=10) as s:
            await s.mail(mail_from)
            await s.rcpt(rcpt)
            assert (await s.data(raw)).code == 250

    def store_bare(self, raw: bytes, *, mail_from: str) -> None:
        """Store a reply to the bare address, as the SMTP edge does when it takes one."""
        key = f"mid:<{uuid.uuid4().hex}@test>"
        assert self.app.store.store_inbound(key, mail_from, [BARE], raw)
        self.app.answering.wakeup.set()

    async def processed(self) -> list[str | None]:
        """The result of every stored reply, once none is left to process."""

        def results() -> list[str | None]:
            with self.app.store.session() as session:
                rows = list(session.exec(select(InboundMessage).order_by(InboundMessage.id)))  # type: ignore[arg-type]
            return (
                [] if any(r.status == InboundStatus.NEW for r in rows) else [r.result for r in rows]
            )

        found: list[str | None] = await until(results, "every stored reply processed")
        return found

    def trail(self, request_id: str) -> list[str]:
        return [event.event for event in self.app.store.trail(request_id)]


Start = Callable[..., AbstractAsyncContextManager[Running]]


@pytest.fixture
def start(
    tmp_path: Path,
    database_url: str,
    mail_sink: MailSink,
    llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Start:
    """`async with start(inbound=..., authentication=...)`: the App with those TOML lines."""
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)

    @contextlib.asynccontextmanager
    async def running(inbound: str = "", authentication: str = "") -> AsyncIterator[Running]:
        section = f"\n[inbound.authentication]\n{authentication}\n" if authentication else ""
        path = write_config(
            tmp_path / "hitl-mail.toml",
            database_url=database_url,
            smtp_port=free_port(),
            relay_port=mail_sink.port,
            llm_url=llm.url,
            extra=section,
        )
        path.write_text(path.read_text().replace("[inbound]\n", f"[inbound]\n{inbound}\n", 1))
        config = load_config(path)
        async with App(config) as app:
            yield Running(app, config, mail_sink)
        await outcomes.close_llm_clients()

    return running


def bare_reply(notification: EmailMessage, body: str, *, sender: str = ASSIGNEE) -> bytes:
    """A reply to the bare address, threaded by In-Reply-To alone."""
    reply = reply_to(notification, body, sender=sender, to=BARE)
    del reply["References"]
    return reply.as_bytes(policy=CLIENT)


def with_results(reply: EmailMessage, *results: str) -> bytes:
    """The reply as the MTA hands it on: its Authentication-Results on top."""
    head = "".join(f"Authentication-Results: {r}\r\n" for r in results).encode()
    return head + reply.as_bytes(policy=CLIENT)


# -- the thread fallback --------------------------------------------------------------------


async def test_a_bare_reply_with_only_in_reply_to_and_a_forged_from_answers_nothing_by_default(
    start: Start,
) -> None:
    async with start() as daemon:
        request, notification = await daemon.notified()
        forged = bare_reply(notification, "Approved")

        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await daemon.send(forged, mail_from=FORGER, rcpt=BARE)
        assert refused.value.code == 550
        daemon.store_bare(forged, mail_from=FORGER)  # taken while the listener still did

        assert await daemon.processed() == ["unmatched"]
        assert daemon.app.store.get(request.id).status == "pending"
        assert "answered" not in daemon.trail(request.id)
        assert daemon.sink.of("confirmation") == daemon.sink.of("error") == []


async def test_the_notification_s_message_id_carries_no_token(start: Start) -> None:
    async with start() as daemon:
        request, notification = await daemon.notified()

    assert request.token
    assert request.token not in str(notification["Message-ID"]).lower()
    assert notification["Message-ID"] == request.notification_id


@pytest.mark.parametrize("separator", ["\r\n ", ", "], ids=["folded", "comma-joined"])
async def test_with_thread_fallback_on_a_bare_reply_is_matched_through_references(
    start: Start, separator: str
) -> None:
    async with start(inbound="thread_fallback = true") as daemon:
        request, notification = await daemon.notified()
        thread = [
            "<older.1@client.example.org>",
            str(notification["Message-ID"]),
            "<CAB+xyz=later@mail.gmail.com>",
        ]
        reply = reply_to(notification, "Rejected", to=BARE)
        del reply["In-Reply-To"], reply["References"]
        reply["References"] = " ".join(thread)
        raw = reply.as_bytes(policy=CLIENT).replace(
            " ".join(thread).encode(), separator.join(thread).encode()
        )

        await daemon.send(raw, mail_from=ASSIGNEE, rcpt=BARE)

        assert await daemon.processed() == ["answered"]
        assert daemon.app.store.get(request.id).outcome == "rejected"


async def test_with_thread_fallback_on_the_from_check_still_holds(start: Start) -> None:
    async with start(inbound="thread_fallback = true") as daemon:
        request, notification = await daemon.notified()

        await daemon.send(
            bare_reply(notification, "Approved", sender=FORGER), mail_from=FORGER, rcpt=BARE
        )

        assert await daemon.processed() == ["wrong_sender"]
        assert daemon.app.store.get(request.id).status == "pending"


async def test_when_senders_must_authenticate_a_bare_reply_that_passed_is_matched(
    start: Start,
) -> None:
    async with start(authentication=DMARC) as daemon:
        request, notification = await daemon.notified()
        raw = f"Authentication-Results: {DMARC_PASS}\r\n".encode()
        raw += bare_reply(notification, "Approved")

        await daemon.send(raw, mail_from=ASSIGNEE, rcpt=BARE)

        assert await daemon.processed() == ["answered"]
        assert daemon.app.store.get(request.id).outcome == "approved"


async def test_when_senders_must_authenticate_a_bare_reply_with_a_forged_from_is_refused(
    start: Start,
) -> None:
    async with start(authentication=DMARC) as daemon:
        request, notification = await daemon.notified()

        await daemon.send(bare_reply(notification, "Approved"), mail_from=FORGER, rcpt=BARE)

        assert await daemon.processed() == ["unauthenticated"]
        assert daemon.app.store.get(request.id).status == "pending"


async def test_a_reply_to_an_old_notification_of_a_reassigned_request_matches_nothing(
    start: Start,
) -> None:
    async with start(inbound="thread_fallback = true") as daemon:
        request, notification = await daemon.notified()
        daemon.app.store.transition(
            request.id, ["pending"], {"notification_id": "<hitl.newer@example.com>"}, []
        )

        await daemon.send(bare_reply(notification, "Approved"), mail_from=ASSIGNEE, rcpt=BARE)

        assert await daemon.processed() == ["unmatched"]


# -- require = "dmarc" ----------------------------------------------------------------------


async def test_with_require_dmarc_a_trusted_dmarc_pass_is_answered(start: Start) -> None:
    async with start(authentication=DMARC) as daemon:
        request, notification = await daemon.notified()
        reply = reply_to(notification, "Approved")

        await daemon.send(with_results(reply, DMARC_PASS), mail_from=ASSIGNEE, rcpt=reply["To"])

        assert await daemon.processed() == ["answered"]
        assert daemon.app.store.get(request.id).outcome == "approved"


@pytest.mark.parametrize(
    "results",
    [
        pytest.param([f"{MX}; dmarc=fail (p=reject dis=none) header.from=example.com"], id="fail"),
        pytest.param([], id="missing"),
        pytest.param(["mx.attacker.example.net; dmarc=pass header.from=example.com"], id="other"),
    ],
)
async def test_with_require_dmarc_a_reply_without_a_trusted_pass_is_refused_and_nobody_mailed(
    start: Start, results: list[str]
) -> None:
    async with start(authentication=DMARC) as daemon:
        request, notification = await daemon.notified()
        reply = reply_to(notification, "Approved")

        await daemon.send(with_results(reply, *results), mail_from=FORGER, rcpt=reply["To"])

        assert await daemon.processed() == ["unauthenticated"]
        [refusal] = [e for e in daemon.app.store.trail(request.id) if e.event.startswith("reply_")]
        assert refusal.event == "reply_unauthenticated"
        assert "example.com" in refusal.detail["why"]
        assert daemon.app.store.get(request.id).status == "pending"
        assert daemon.sink.of("error") == daemon.sink.of("confirmation") == []


# -- DKIM verified by the daemon ---------------------------------------------------------


@pytest.fixture(scope="module")
def example_com() -> Keys:
    return Keys(domain="example.com")


async def test_a_dkim_signed_reply_verified_by_the_daemon_is_answered_and_a_tampered_one_refused(
    start: Start, example_com: Keys
) -> None:
    async with start(authentication='require = "dkim"\nverify_dkim = true') as daemon:
        daemon.app.answering.dnsfunc = example_com.dns  # the test's key, served as DNS would
        first, first_note = await daemon.notified()
        second, second_note = await daemon.notified()
        genuine = reply_to(first_note, "Approved")
        tampered = example_com.sign(reply_to(second_note, "Approved").as_bytes(policy=CLIENT))

        await daemon.send(
            example_com.sign(genuine.as_bytes(policy=CLIENT)),
            mail_from=ASSIGNEE,
            rcpt=genuine["To"],
        )
        await daemon.send(
            tampered.replace(b"\r\nApproved", b"\r\nRejected"),
            mail_from=ASSIGNEE,
            rcpt=second_note["Reply-To"],
        )

        assert sorted(map(str, await daemon.processed())) == ["answered", "unauthenticated"]
        assert daemon.app.store.get(first.id).outcome == "approved"
        assert daemon.app.store.get(second.id).status == "pending"
        assert b"s1._domainkey.example.com." in example_com.lookups
