"""A refusal is decided by a check and recorded once, by `transitions.refused`.

Its audit row, the error mail it may send (or why none went), and the
stored reply marked done are one transaction, which also reads the rate
limits that decide whether the mail goes.
"""

from __future__ import annotations

from datetime import timedelta
from email.message import EmailMessage
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import add_request
from sqlalchemy.exc import IntegrityError

from hitl_mail import transitions
from hitl_mail.models import AuditEvent, InboundMessage, RequestStatus
from hitl_mail.outbound import queue_row
from hitl_mail.store import Store
from hitl_mail.transitions import ErrorMail, MailLimit, Refusal, RefusalKind

ASSIGNEE = "ann@example.org"
DAY = timedelta(days=1)


def stored_reply(store: Store, key: str) -> int:
    store.store_inbound(key, ASSIGNEE, ["reply@x"], b"Subject: x\r\n\r\nok")
    (row,) = store.claim_inbound(1, timedelta(minutes=1))
    assert row.id is not None
    return row.id


def error_mail(kind: str, *limits: MailLimit, to: Any = ASSIGNEE) -> ErrorMail:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hitl@example.org", ASSIGNEE, kind
    message["Message-ID"] = f"<{kind}@example.org>"
    message.set_content("...")
    row = queue_row(message, kind=f"error:{kind}", request_id="r1", recipient=to)
    return ErrorMail(row, limits)


def refuse(store: Store, kind: RefusalKind, mail: ErrorMail | None, inbound: int | None) -> bool:
    return transitions.refused(
        store,
        Refusal(kind, "why"),
        request_id="r1",
        actor=ASSIGNEE,
        source="email",
        detail={"why": "why"},
        inbound=inbound,
        mail=mail,
    )


def trail(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        audit: Any = AuditEvent.__table__  # type: ignore[attr-defined]
        rows = conn.execute(sa.select(audit.c.event).order_by(audit.c.id))
        return [event for (event,) in rows]


def mail_kinds(store: Store) -> list[str]:
    return [m.kind for m in store.outbox_for("r1")]


def reply(store: Store, inbound: int) -> tuple[str, str | None]:
    with store.session() as session:
        row = session.get(InboundMessage, inbound)
        assert row is not None
        return row.status, row.result


@pytest.fixture
def request_r1(store: Store) -> None:
    add_request(store, "r1", RequestStatus.PENDING, assigned_to=ASSIGNEE)


@pytest.mark.usefixtures("request_r1")
def test_a_refusal_records_its_reason_its_error_mail_and_the_reply_done_together(
    store: Store,
) -> None:
    inbound = stored_reply(store, "<a@x>")

    assert refuse(store, RefusalKind.EXPIRED, error_mail("expired"), inbound)

    assert trail(store) == ["reply_expired", "error_mail_queued"]
    assert mail_kinds(store) == ["error:expired"]
    assert reply(store, inbound) == ("done", "expired")


@pytest.mark.usefixtures("request_r1")
def test_the_same_error_mail_again_within_its_window_is_suppressed_and_says_so(
    store: Store,
) -> None:
    once_a_day = MailLimit(DAY, to=ASSIGNEE, kind="error:expired")
    first, second = stored_reply(store, "<a@x>"), stored_reply(store, "<b@x>")

    assert refuse(store, RefusalKind.EXPIRED, error_mail("expired", once_a_day), first)
    assert not refuse(store, RefusalKind.EXPIRED, error_mail("expired", once_a_day), second)

    assert mail_kinds(store) == ["error:expired"]
    assert trail(store)[2:] == ["reply_expired", "error_mail_suppressed"]
    assert reply(store, second) == ("done", "expired")


@pytest.mark.usefixtures("request_r1")
def test_a_request_gets_at_most_its_share_of_error_mails_whatever_their_kinds(
    store: Store,
) -> None:
    two_per_request = MailLimit(DAY, request_id="r1", at_most=2)
    kinds = [RefusalKind.EXPIRED, RefusalKind.CANCELLED, RefusalKind.UNDECIDED]

    sent = [refuse(store, kind, error_mail(kind, two_per_request), None) for kind in kinds]

    assert sent == [True, True, False]
    assert mail_kinds(store) == ["error:expired", "error:cancelled"]


@pytest.mark.usefixtures("request_r1")
def test_a_refusal_that_cannot_be_written_writes_nothing(store: Store) -> None:
    inbound = stored_reply(store, "<a@x>")
    unsendable = error_mail("expired", to=None)  # recipient is NOT NULL

    with pytest.raises(IntegrityError):
        refuse(store, RefusalKind.EXPIRED, unsendable, inbound)

    assert trail(store) == []
    assert store.outbox_for("r1") == []
    assert reply(store, inbound) == ("new", None)  # taken again after its lease


def test_a_refusal_of_a_reply_that_names_no_request_is_recorded_without_one(store: Store) -> None:
    inbound = stored_reply(store, "<a@x>")

    transitions.refused(
        store,
        Refusal(RefusalKind.UNMATCHED, "no token"),
        request_id=None,
        actor="x@example.org",
        source="email",
        detail={"why": "no token"},
        inbound=inbound,
        events=transitions.Events(()),
    )

    assert trail(store) == ["reply_unmatched"]
    assert reply(store, inbound) == ("done", "unmatched")
