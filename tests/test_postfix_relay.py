"""The deploy/postfix set-up with a real Postfix: the reply domain is relayed, nothing else.

Postfix stands where the organisation's MTA stands in production; an aiosmtpd server
stands where the daemon's SMTP listener would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from postfix import PostfixRelay, skip_reason

SKIP_REASON = skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

REPLY_DOMAIN = "reply.example.com"
DELIVERY_TIMEOUT = 30.0
DEPLOY_POSTFIX = Path(__file__).resolve().parent.parent / "deploy" / "postfix"
# Shaped like real tokens (48 base32 characters); only the listener tells them apart.
KNOWN_TOKEN = "a" * 40 + "234567ab"
UNKNOWN_TOKEN = "b" * 40 + "234567ab"


@dataclass
class FakeListener:
    """Stands in for the daemon's SMTP listener: keeps envelopes, may refuse at RCPT."""

    port: int = 0
    envelopes: list[Envelope] = field(default_factory=list)
    # Like the daemon: refuse at RCPT every reply address not starting with this.
    accept_prefix: str = ""
    rcpt_seen: list[str] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_seen.append(address)
        if not address.lower().startswith(self.accept_prefix):
            return "550 5.1.1 Unknown or expired reply address"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        async with self._arrived:
            self.envelopes.append(envelope)
            self._arrived.notify_all()
        return "250 OK"

    async def wait_for(self, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[Envelope]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.envelopes) >= count)
        return self.envelopes


@pytest.fixture
async def listener() -> AsyncIterator[FakeListener]:
    """A FakeListener on 127.0.0.1:<free port>, where the daemon would listen."""
    fake = FakeListener()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(fake, hostname="listener.hitl-mail.test", loop=loop), "127.0.0.1", 0
    )
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def relay(listener: FakeListener) -> AsyncIterator[PostfixRelay]:
    """Postfix relaying REPLY_DOMAIN to the listener, as deploy/postfix/ configures it."""
    postfix = PostfixRelay(reply_domain=REPLY_DOMAIN, target_port=listener.port)
    await asyncio.to_thread(postfix.start)
    try:
        yield postfix
    finally:
        await asyncio.to_thread(postfix.stop)


def reply(to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = to
    message["Subject"] = "Re: Approve?"
    message.set_content("approved\n")
    return message


async def test_a_reply_to_the_reply_domain_is_relayed_to_the_daemon_port(
    relay: PostfixRelay, listener: FakeListener
) -> None:
    await aiosmtplib.send(
        reply("reply+abc@reply.example.com"), hostname="127.0.0.1", port=relay.port, timeout=10
    )

    try:
        envelopes = await listener.wait_for(1)
    except TimeoutError:
        pytest.fail(f"Postfix did not relay within {DELIVERY_TIMEOUT}s:\n{relay.log()}")
    (envelope,) = envelopes
    assert envelope.mail_from == "alice@example.org"
    assert envelope.rcpt_tos == ["reply+abc@reply.example.com"]
    assert isinstance(envelope.original_content, bytes)
    relayed = message_from_bytes(envelope.original_content)
    assert relayed["Subject"] == "Re: Approve?"
    assert relayed["Received"] is not None  # Postfix's own trace header
    # postlogd writes the log asynchronously: wait (bounded) for the delivery line.
    log = await asyncio.to_thread(relay.wait_for_log, "status=sent", 10.0)
    assert f"relay=127.0.0.1[127.0.0.1]:{listener.port}" in log


async def test_mail_for_another_domain_is_refused_as_relay_access_denied(
    relay: PostfixRelay, listener: FakeListener
) -> None:
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await aiosmtplib.send(
            reply("someone@elsewhere.example"), hostname="127.0.0.1", port=relay.port, timeout=10
        )

    (error,) = refused.value.recipients
    assert error.code == 554
    assert "Relay access denied" in error.message
    assert listener.envelopes == []
    await asyncio.to_thread(relay.wait_for_log, "NOQUEUE: reject: RCPT", 10.0)


def shipped_files() -> dict[str, str]:
    """The maps deploy/postfix ships, by file name, as the fragment's settings name them."""
    return {
        name: (DEPLOY_POSTFIX / name).read_text()
        for name in (
            "hitl-mail-verify",
            "hitl-mail-recipients.regexp",
            "hitl-mail-header-checks.regexp",
        )
    }


def shipped_settings() -> dict[str, str]:
    """deploy/postfix/main.cf.fragment as parameters, its maps read from the instance."""
    settings: dict[str, str] = {}
    name = ""
    for line in (DEPLOY_POSTFIX / "main.cf.fragment").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():  # a continuation line
            settings[name] += " " + line.strip()
            continue
        name, _, value = (part.strip() for part in line.partition("="))
        settings[name] = value
    return {k: v.replace("/etc/postfix/", "$config_directory/") for k, v in settings.items()}


@pytest.fixture
async def production_relay(listener: FakeListener) -> AsyncIterator[PostfixRelay]:
    """Postfix with the shipped main.cf fragment and maps, in front of the listener."""
    listener.accept_prefix = f"reply+{KNOWN_TOKEN}"
    settings = shipped_settings() | {
        # The test client on 127.0.0.1 plays a sender on the internet.
        "mynetworks": "",
        # Poll the verify service every second instead of every 3 (test speed only).
        "address_verify_poll_delay": "1s",
    }
    postfix = PostfixRelay(
        reply_domain=REPLY_DOMAIN,
        target_port=listener.port,
        settings=settings,
        files=shipped_files(),
    )
    await asyncio.to_thread(postfix.start)
    try:
        yield postfix
    finally:
        await asyncio.to_thread(postfix.stop)


async def refusal(port: int, to: str) -> aiosmtplib.SMTPRecipientRefused:
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await aiosmtplib.send(reply(to), hostname="127.0.0.1", port=port, timeout=20)
    (error,) = refused.value.recipients
    return error


async def test_the_shipped_postfix_settings_refuse_unknown_tokens_while_the_sender_waits(
    production_relay: PostfixRelay, listener: FakeListener
) -> None:
    port = production_relay.port

    not_a_token = await refusal(port, "postmaster@reply.example.com")
    assert not_a_token.code == 550
    assert "User unknown in relay recipient table" in not_a_token.message

    unknown = await refusal(port, f"reply+{UNKNOWN_TOKEN}@reply.example.com")
    assert unknown.code == 550
    assert "undeliverable address" in unknown.message
    assert "Unknown or expired reply address" in unknown.message  # the daemon's words

    known = f"reply+{KNOWN_TOKEN.upper()}@reply.example.com"  # case does not matter
    await aiosmtplib.send(reply(known), hostname="127.0.0.1", port=port, timeout=20)
    try:
        (envelope,) = await listener.wait_for(1)
    except TimeoutError:
        pytest.fail(f"Postfix did not relay within {DELIVERY_TIMEOUT}s:\n{production_relay.log()}")
    assert envelope.rcpt_tos == [known]
    # Postfix asked the listener about each token (probes end before DATA), never
    # about the address the regexp already refused.
    assert f"reply+{UNKNOWN_TOKEN}@reply.example.com" in listener.rcpt_seen
    assert "postmaster@reply.example.com" not in listener.rcpt_seen


async def test_the_shipped_header_checks_drop_authentication_results_claiming_this_mta(
    production_relay: PostfixRelay, listener: FakeListener
) -> None:
    """RFC 8601 section 5: only this MTA's milters may write its authserv-id."""
    to = f"reply+{KNOWN_TOKEN}@reply.example.com"
    forged = (
        b"Authentication-Results: mx.example.com; dmarc=pass header.from=example.org\r\n"
        b"Authentication-Results: MX.Example.COM (forged);\r\n dkim=pass header.d=example.org\r\n"
        b"Authentication-Results: mx.example.com.evil.example; dmarc=pass\r\n"
        b"Authentication-Results: elsewhere.example; dmarc=fail\r\n"
    )
    raw = forged + reply(to).as_bytes()

    await aiosmtplib.send(
        raw,
        sender="alice@example.org",
        recipients=[to],
        hostname="127.0.0.1",
        port=production_relay.port,
        timeout=20,
    )

    try:
        (envelope,) = await listener.wait_for(1)
    except TimeoutError:
        pytest.fail(f"Postfix did not relay within {DELIVERY_TIMEOUT}s:\n{production_relay.log()}")
    relayed = message_from_bytes(envelope.original_content or b"")
    assert relayed.get_all("Authentication-Results") == [
        "mx.example.com.evil.example; dmarc=pass",
        "elsewhere.example; dmarc=fail",
    ]
    assert relayed["Subject"] == "Re: Approve?"
