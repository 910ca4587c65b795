"""Replies are worked through fairly: a flood aimed at some requests never delays the others.

The answering stage claims stored replies taking turns per request (the
oldest reply of each request first, none of a request it is still working
on), keeps the LLM-bound decisions on a small lane of their own so that exact
answers never wait behind them, and limits error mail per request.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime, timedelta

import aiosmtplib
import pytest
from conftest import Setup, add_request, request_context, wait_until

from hitl_mail import intake
from hitl_mail.config import load_config
from hitl_mail.models import utcnow
from hitl_mail.store import Store

OPTIONS = ["approved", "rejected", "needs_revision"]

LEASE = timedelta(minutes=1)


_serial = itertools.count()


def stored(store: Store, count: int, request_id: str | None, sender: str = "a@x.example") -> None:
    for _ in range(count):
        key = f"mid:<{next(_serial)}@x.example>"
        assert store.store_inbound(key, sender, ["reply@x"], b"Subject: x\r\n\r\nok", request_id)


def test_a_claim_takes_the_oldest_reply_of_each_request_before_a_second_of_any(
    store: Store,
) -> None:
    for request_id in ("FLOODED", "QUIET1", "QUIET2"):
        add_request(store, request_id)
    stored(store, 50, "FLOODED")
    stored(store, 1, "QUIET1")
    stored(store, 1, "QUIET2")

    claimed = store.claim_inbound(10, LEASE)

    assert sorted(row.request_id or "" for row in claimed) == ["FLOODED", "QUIET1", "QUIET2"]


def test_requests_with_fewer_replies_waiting_are_served_first_even_when_newer(
    store: Store,
) -> None:
    for request_id in ("FLOODED", "QUIET1", "QUIET2"):
        add_request(store, request_id)
    stored(store, 5, "FLOODED")  # the oldest replies
    stored(store, 1, "QUIET1")
    stored(store, 1, "QUIET2")

    claimed = store.claim_inbound(2, LEASE)

    assert sorted(row.request_id or "" for row in claimed) == ["QUIET1", "QUIET2"]


def test_replies_naming_no_request_take_turns_per_envelope_sender(store: Store) -> None:
    stored(store, 20, None, sender="flood@x.example")
    stored(store, 1, None, sender="person@y.example")

    claimed = store.claim_inbound(10, LEASE)

    assert sorted(row.envelope_from for row in claimed) == ["flood@x.example", "person@y.example"]


def test_a_claim_leaves_the_requests_whose_replies_are_in_hand_for_later(store: Store) -> None:
    for request_id in ("BUSY", "OTHER"):
        add_request(store, request_id)
    stored(store, 3, "BUSY")
    stored(store, 1, "OTHER")

    first = store.claim_inbound(10, LEASE, busy={"BUSY"})
    second = store.claim_inbound(10, LEASE)
    third = store.claim_inbound(10, LEASE)

    assert [row.request_id for row in first] == ["OTHER"]
    assert [row.request_id for row in second] == ["BUSY"]
    assert [row.request_id for row in third] == ["BUSY"]
    assert (second[0].id or 0) < (third[0].id or 0)  # its oldest first


# -- a flood against the real daemon ----------------------------------------------------------

ASSIGNEE = "owner@example.com"
FORGER = "mallory@attacker.example.net"
FLOODED = 30
GENUINE = 20
FLOOD = 2000
CONNECTIONS = 8


def flood_message(n: int, recipient: str) -> bytes:
    """Malformed (forged, broken MIME or binary) or undecidable (free text for the LLM)."""
    head = f"To: {recipient}\r\nSubject: Re: Approve?\r\nMessage-ID: <flood.{n}@attacker.example.net>\r\n"
    if n % 3 == 0:  # broken MIME from a forged sender
        return (
            f"From: {FORGER}\r\n{head}MIME-Version: 1.0\r\n"
            'Content-Type: multipart/alternative; boundary="CUT"\r\n\r\n'
            "--CUT\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\nYXBwcm92ZWQKCk9uIE1vbiwg\r\n--CU"
        ).encode()
    if n % 3 == 1:  # binary junk
        return f"From: {FORGER}\r\n{head}\r\n".encode() + bytes(range(256)) * 4
    return f"From: {ASSIGNEE}\r\n{head}\r\nLet me think about it over the weekend {n}\r\n".encode()


def exact_reply(recipient: str, n: int) -> bytes:
    return (
        f"From: {ASSIGNEE}\r\nTo: {recipient}\r\nSubject: Re: Approve?\r\n"
        f"Message-ID: <genuine.{n}@client.example.org>\r\n\r\nApproved\r\n"
    ).encode()


async def deliver_all(port: int, messages: list[tuple[str, bytes]]) -> list[int]:
    """Send over one reused SMTP connection; each message's final code (4xx/5xx included)."""
    codes: list[int] = []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
        for recipient, raw in messages:
            try:
                await smtp.sendmail(ASSIGNEE, [recipient], raw)
                codes.append(250)
            except aiosmtplib.SMTPRecipientsRefused as refused:
                codes.append(refused.recipients[0].code)
            except aiosmtplib.SMTPResponseException as refused:
                codes.append(refused.code)
    return codes


def flood(port: int, targets: list[str]) -> list[int]:
    messages = [(targets[n % len(targets)], b"") for n in range(FLOOD)]
    messages = [(to, flood_message(n, to)) for n, (to, _) in enumerate(messages)]
    shares = [messages[i::CONNECTIONS] for i in range(CONNECTIONS)]

    async def go() -> list[int]:
        results = await asyncio.gather(*(deliver_all(port, share) for share in shares))
        return [code for codes in results for code in codes]

    return asyncio.run(go())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_flood_of_malformed_and_undecidable_replies_to_some_requests_never_delays_the_others(
    setup: Setup,
) -> None:
    setup.llm.mode = "slow"  # past [llm].timeout: every undecidable reply holds a place, then fails
    setup.llm.delay = 6.0
    setup.start_daemon()
    genuine = [paused["callback_info"] for paused in setup.kickoff_many(GENUINE)]
    config = load_config(setup.config)
    store = Store(config.daemon.database_url)
    try:
        flooded = [
            intake.create_request(config, store, request_context(emit=OPTIONS), state={})
            for _ in range(FLOODED)
        ]
        targets = [intake.reply_to_of(config, request) or "" for request in flooded]

        began = time.monotonic()
        codes = flood(setup.smtp_port, targets)
        flood_took = time.monotonic() - began  # a few seconds when unloaded; 20 s at most
        assert len(codes) == FLOOD
        assert set(codes) <= {250, 452}  # 452: the request has its fill of waiting replies

        sent_at: dict[str, datetime] = {}
        for n, info in enumerate(genuine):
            sent_at[info["request_id"]] = utcnow()
            asyncio.run(
                deliver_all(setup.smtp_port, [(info["reply_to"], exact_reply(info["reply_to"], n))])
            )

        def resumed() -> dict[str, datetime]:
            found = {}
            for request_id in sent_at:
                at = [e.at for e in store.trail(request_id) if e.event == "resumed"]
                if at:
                    found[request_id] = at[0]
            return found if len(found) == GENUINE else {}

        done = wait_until(
            resumed, 60, 0.5, what=f"{GENUINE} flows to resume\n{setup.daemon_log()[-3000:]}"
        )
        delays = sorted((done[r] - sent_at[r]).total_seconds() for r in sent_at)
        answered = sorted(
            (e.at - sent_at[r]).total_seconds()
            for r in sent_at
            for e in store.trail(r)
            if e.event == "answered"
        )
        assert delays[-1] < 30, (
            f"resumed after {delays}, answered after {answered}, "
            f"following a flood sent in {flood_took:.1f}s"
        )
        assert len(setup.wait_event("approved", GENUINE)) == GENUINE
        assert all(store.get(r.id).status == "pending" for r in flooded)  # nothing answered them
    finally:
        store.close()
