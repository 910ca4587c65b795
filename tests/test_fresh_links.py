"""A reply through an expired link: the assignee gets a fresh one while the request is pending.

A real daemon, a real paused flow, real SMTP; `[tokens].max_age` is a few
seconds so the notification's link expires during the test. Within
`[inbound].expired_grace` the SMTP edge takes such a reply; answering refuses
it and mails the fresh link, and that link answers the request.
"""

from __future__ import annotations

import time

import pytest
from conftest import Setup, reply_to, send, wait_until

from hitl_mail import tokens

MAX_AGE = 6.0  # seconds: long enough to answer through the fresh link under load


@pytest.fixture
def short_lived(setup: Setup) -> Setup:
    with setup.config.open("a", encoding="utf-8") as config:
        config.write(f'\n[tokens]\nmax_age = "{MAX_AGE:g}s"\n')
    return setup


def token_of(address: str) -> str:
    return address.partition("+")[2].partition("@")[0]


def test_a_reply_after_expiry_gets_a_fresh_link_that_answers_and_the_old_one_stays_refused(
    short_lived: Setup,
) -> None:
    setup = short_lived
    setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    rid = info["request_id"]
    [notification] = setup.sink.wait_for("notification", rid)
    old = notification["Reply-To"].addresses[0].addr_spec
    expires = tokens.read(token_of(old)).issued_at.timestamp() + MAX_AGE
    time.sleep(max(0.0, expires - time.time() + 1.5))

    # Three replies through the expired link, at once: taken at RCPT (within the grace).
    for _ in range(3):
        send(setup.smtp_port, reply_to(notification, "Approved"))

    [expired] = setup.sink.wait_for("error", rid)
    assert expired["X-HITL-Error"] == "expired"
    assert expired["To"] == "owner@example.com"
    fresh = expired["Reply-To"].addresses[0].addr_spec
    assert fresh.endswith("@reply.example.com")
    assert fresh != old
    assert token_of(old) not in expired.as_string()  # never the link that can only be refused

    send(setup.smtp_port, reply_to(expired, "Approved"))  # through the fresh link

    [confirmation] = setup.sink.wait_for("confirmation", rid)
    assert confirmation["X-HITL-Outcome"] == "approved"
    [approved] = setup.wait_event("approved")
    assert approved["feedback"] == "Approved"
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="the flow resumed")
    events = [e["event"] for e in setup.show(rid)["audit"]]
    # Refused by answering, all three; one fresh link for the three, one mail.
    assert events.count("reply_expired") == 3
    assert events.count("token_renewed") == 1
    assert len(setup.sink.of("error", rid)) == 1

    send(setup.smtp_port, reply_to(notification, "Rejected"))  # the old link, after the answer

    wait_until(
        lambda: [e["event"] for e in setup.show(rid)["audit"]].count("reply_expired") == 4,
        30,
        what="the old link refused once more",
    )
    assert setup.show(rid)["outcome"] == "approved"
