"""A reply is read in a parse worker, within `[inbound].parse_timeout`, or refused as malformed.

In process: the real `App` on loopback, whose parse workers run a parse that
spins or crashes for messages that ask for it (tests/parse_hooks.py). End to
end: the real daemon reading real costly messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiosmtplib
import pytest
from conftest import MailSink, ResumeParked, Setup, free_port, reply_to, send, write_config
from llm_server import FakeLLMServer
from parse_hooks import parse_or_misbehave
from test_answering import Daemon, answer

from hitl_mail import app as app_module
from hitl_mail import outcomes
from hitl_mail.app import App
from hitl_mail.config import load_config
from hitl_mail.parsing import Parsers

PARSE_TIMEOUT = timedelta(seconds=1)
FORGER = "mallory@attacker.example.net"


@pytest.fixture
async def daemon(
    tmp_path: Path,
    database_url: str,
    mail_sink: MailSink,
    llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Daemon]:
    """The daemon of test_answering, with a 1s parse_timeout and misbehaving parse workers."""
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=mail_sink.port,
        llm_url=llm.url,
    )
    config = load_config(path)
    inbound = config.inbound.model_copy(update={"parse_timeout": PARSE_TIMEOUT})
    config = config.model_copy(update={"inbound": inbound})
    app = App(config)
    answering = app.answering
    answering.parsers = Parsers(
        answering.parsers.ours, PARSE_TIMEOUT.total_seconds(), parse=parse_or_misbehave
    )
    async with app:
        yield Daemon(app, config, mail_sink, llm)
    await outcomes.close_llm_clients()


async def test_a_reply_that_takes_longer_than_parse_timeout_to_read_is_refused_as_malformed(
    daemon: Daemon,
) -> None:
    request, notification = await daemon.notified()

    await answer(daemon, reply_to(notification, "approved", headers={"X-Test-Parse": "spin"}))

    [refused] = await daemon.event(request.id, "reply_malformed")
    assert refused.detail["why"] == "took longer than 1s to read"
    assert daemon.store.get(request.id).status == "pending"
    [row] = daemon.inbound()
    assert (row.status, row.result, row.request_id) == ("done", "malformed", request.id)
    await daemon.settled(request.id)
    assert daemon.sink.of("error", request.id) == []  # nobody is told: the sender is unknown


async def test_slow_replies_to_some_requests_do_not_hold_up_a_reply_to_another(
    daemon: Daemon,
) -> None:
    slow = [await daemon.notified() for _ in range(3)]  # more than there are parse workers
    request, notification = await daemon.notified()

    for _, slow_notification in slow:
        spin = reply_to(slow_notification, "approved", headers={"X-Test-Parse": "spin"})
        await answer(daemon, spin)
    sent = time.monotonic()
    await answer(daemon, reply_to(notification, "rejected"))

    await daemon.event(request.id, "answered")
    # At most one parse_timeout behind the slow ones, never the minute they would take.
    assert time.monotonic() - sent < 8
    assert daemon.store.get(request.id).outcome == "rejected"
    for slow_request, _ in slow:
        await daemon.event(slow_request.id, "reply_malformed")
        assert daemon.store.get(slow_request.id).status == "pending"


async def test_a_parse_worker_that_dies_refuses_its_reply_and_is_replaced(daemon: Daemon) -> None:
    request, notification = await daemon.notified()

    await answer(daemon, reply_to(notification, "approved", headers={"X-Test-Parse": "crash"}))

    [refused] = await daemon.event(request.id, "reply_malformed")
    assert refused.detail["why"] == "its parser crashed"
    assert daemon.store.get(request.id).status == "pending"
    await answer(daemon, reply_to(notification, "approved"))
    await daemon.event(request.id, "answered")
    assert daemon.app.answering.parsers.replaced == 1


# -- end to end: costly charsets against the real daemon ----------------------------------------

COSTLY = 8
BODY_CHARS = 960_000  # quoted-printable adds 3 bytes a line: each message stays under 1 MB


def punycode_reply(recipient: str, n: int) -> bytes:
    """A reply whose body is one line that Python's punycode codec decodes in quadratic time."""
    body = "-" + "a" * BODY_CHARS  # one run of deltas: a minute or more of CPU to decode
    lines = [body[i : i + 75] for i in range(0, len(body), 75)]
    return (
        f"From: Boss <{FORGER}>\r\nTo: {recipient}\r\nSubject: Re: Approve?\r\n"
        f"Message-ID: <costly.{n}@attacker.example.net>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=punycode\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n" + "=\r\n".join(lines) + "\r\n"
    ).encode()


@pytest.mark.slow
def test_costly_charsets_are_refused_and_a_genuine_reply_after_them_resumes_its_flow_at_once(
    setup: Setup,
) -> None:
    text = setup.config.read_text(encoding="utf-8")
    setup.config.write_text(text.replace('max_message_size = "200KB"', 'max_message_size = "1MB"'))
    setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    [notification] = setup.sink.wait_for("notification", info["request_id"])
    recipient = info["reply_to"]
    costly = [punycode_reply(recipient, n) for n in range(COSTLY)]
    assert all(900_000 < len(raw) < 1_000_000 for raw in costly)

    async def deliver_costly() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=setup.smtp_port, timeout=60) as smtp:
            for raw in costly:
                await smtp.sendmail(FORGER, [recipient], raw)

    asyncio.run(deliver_costly())
    sent = time.monotonic()
    send(setup.smtp_port, reply_to(notification, "Approved"))

    [approved] = setup.wait_event("approved", timeout=60)
    resumed_after = time.monotonic() - sent
    assert approved["feedback"] == "Approved"
    # A few seconds on an idle machine; each costly reply read to its parse_timeout
    # would take 8 x 5 s, and read in full, minutes.
    assert resumed_after < 25, f"resumed {resumed_after:.1f}s after the reply"
    refusals = [
        e for e in setup.show(info["request_id"])["audit"] if e["event"].startswith("reply_")
    ]
    assert len(refusals) == COSTLY  # each costly reply recorded as refused, none answered
