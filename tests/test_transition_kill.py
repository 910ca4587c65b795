"""A transition killed half-way loses nothing and doubles nothing.

A child process makes one transition and is SIGKILLed inside its
transaction: after the request's update, its audit row and its outbox rows
(mail and webhook events) were written but before the commit, or just after
the commit. Its state, audit and outbox are then all there or none of them;
making the transition again afterwards leaves exactly one of each.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import add_request, wait_until

from hitl_mail import transitions
from hitl_mail.config import WebhookSettings
from hitl_mail.models import (
    AnswerSource,
    AuditEvent,
    HttpOutboxRow,
    InboundMessage,
    OutboxMessage,
    RequestStatus,
)
from hitl_mail.outbound import queue_row
from hitl_mail.store import Store

TESTS = Path(__file__).resolve().parent
EVENTS = transitions.Events(
    (
        WebhookSettings(
            name="ops", url="http://127.0.0.1:9/hook", secret="Xq7vR2mK9pL4tW8zB3nC6yH1dF5gJ0sA"
        ),
    )
)
ASSIGNEE = "ann@example.org"

# The child: make one transition, and stop for good at the moment named in argv[3].
CHILD = """
import sys, time
from pathlib import Path
from typing import Any
from sqlalchemy import event
from sqlmodel import Session
sys.path.insert(0, {tests!r})
import test_transition_kill as t
from hitl_mail.store import Store

url, marker, moment, name, request_id, inbound = sys.argv[1:7]

def stop_here(session):
    Path(marker).write_text(moment)
    time.sleep(60)  # killed here

event.listen(Session, moment, stop_here)
t.make(name, Store(url), request_id, int(inbound))
"""

# What each transition writes: (audit event, mail kinds, webhook events).
WRITES = {
    "answered": ("answered", ["confirmation"], ["answered"]),
    "cancelled": ("cancelled", ["error:cancelled"], ["cancelled"]),
    "resume_failed": ("resume_failed", [], ["resume_failed"]),
}
BEFORE = {"answered": RequestStatus.PENDING, "cancelled": RequestStatus.PENDING}
AFTER = {
    "answered": RequestStatus.ANSWERED,
    "cancelled": RequestStatus.CANCELLED,
    "resume_failed": RequestStatus.RESUME_FAILED,
}


def mail(kind: str, request_id: str) -> OutboxMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hitl@example.org", ASSIGNEE, kind
    message["Message-ID"] = f"<{kind}.{request_id}@example.org>"
    message.set_content("...")
    return queue_row(message, kind=kind, request_id=request_id, recipient=ASSIGNEE)


def make(name: str, store: Store, request_id: str, inbound: int) -> bool:
    """Make transition `name`, with webhooks configured; whether it moved the request."""
    if name == "answered":
        answer = transitions.Answer("approved", "approved", AnswerSource.EMAIL, ASSIGNEE)
        confirmation = mail("confirmation", request_id)
        change = transitions.answered(
            request_id, answer, mail=confirmation, inbound=inbound, events=EVENTS
        )
        return transitions.record(store, [change])[0]
    if name == "cancelled":
        told = mail("error:cancelled", request_id)
        return transitions.cancelled(store, request_id, "cli", mail=told, events=EVENTS)
    return transitions.resume_failed(
        store, request_id, attempt=1, retry_at=None, error="boom", events=EVENTS
    )


def written(store: Store, request_id: str) -> tuple[str, list[str], list[str], list[str]]:
    """The request's status, audit events, queued mail kinds and webhook events."""

    def column(table: Any, name: str) -> list[str]:
        rows = sa.select(table.c[name]).where(table.c.request_id == request_id)
        with store.engine.connect() as conn:
            return [value for (value,) in conn.execute(rows.order_by(table.c.id))]

    return (
        store.get(request_id).status,
        column(_table(AuditEvent), "event"),
        column(_table(OutboxMessage), "kind"),
        column(_table(HttpOutboxRow), "event"),
    )


def _table(model: Any) -> Any:
    return model.__table__


def reply_status(store: Store, inbound: int) -> str:
    with store.session() as session:
        row = session.get(InboundMessage, inbound)
        assert row is not None
        return row.status


@pytest.fixture
def request_and_reply(store: Store) -> tuple[str, int]:
    store.store_inbound("<r1@example.org>", ASSIGNEE, ["reply@x"], b"Subject: x\r\n\r\nok")
    (row,) = store.claim_inbound(1, timedelta(minutes=1))
    assert row.id is not None
    return "req1", row.id


def kill_inside(
    database_url: str, tmp_path: Path, moment: str, name: str, rid: str, inbound: int
) -> None:
    marker = tmp_path / f"{name}.{moment}"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD.format(tests=str(TESTS)),
            database_url,
            str(marker),
            moment,
            name,
            rid,
            str(inbound),
        ],
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
    )
    try:
        wait_until(marker.exists, timeout=60, what=f"{name} to reach {moment}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("name", list(WRITES))
def test_killed_before_its_commit_a_transition_wrote_nothing_and_writes_once_made_again(
    store: Store,
    database_url: str,
    tmp_path: Path,
    request_and_reply: tuple[str, int],
    name: str,
) -> None:
    rid, inbound = request_and_reply
    before = BEFORE.get(name, RequestStatus.ANSWERED)
    add_request(store, rid, before, assigned_to=ASSIGNEE)

    kill_inside(database_url, tmp_path, "before_commit", name, rid, inbound)

    assert written(store, rid) == (before, [], [], [])
    assert reply_status(store, inbound) == "new"
    assert make(name, store, rid, inbound)
    audit, kinds, hooks = WRITES[name]
    assert written(store, rid) == (AFTER[name], [audit], kinds, hooks)
    assert not make(name, store, rid, inbound)  # made again: the loser writes nothing
    assert written(store, rid) == (AFTER[name], [audit], kinds, hooks)


@pytest.mark.parametrize("name", ["answered", "cancelled"])
def test_killed_after_its_commit_a_transition_wrote_everything_once(
    store: Store,
    database_url: str,
    tmp_path: Path,
    request_and_reply: tuple[str, int],
    name: str,
) -> None:
    rid, inbound = request_and_reply
    add_request(store, rid, RequestStatus.PENDING, assigned_to=ASSIGNEE)

    kill_inside(database_url, tmp_path, "after_commit", name, rid, inbound)

    audit, kinds, hooks = WRITES[name]
    assert written(store, rid) == (AFTER[name], [audit], kinds, hooks)
    assert not make(name, store, rid, inbound)
    assert written(store, rid) == (AFTER[name], [audit], kinds, hooks)
