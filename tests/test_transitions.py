"""`Store.transitions`: several conditional state changes in one commit, each as if made alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import add_request
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from hitl_mail.models import AuditEvent, InboundMessage, RequestStatus, utcnow
from hitl_mail.store import Store, Transition, audit_event


def stored_reply(store: Store, key: str) -> int:
    assert store.store_inbound(key, "ann@example.org", ["reply@x"], b"Subject: x\r\n\r\nok")
    (row,) = store.claim_inbound(1, timedelta(minutes=1))
    assert row.id is not None
    return row.id


def answer(request_id: str, inbound_id: int) -> Transition:
    return Transition(
        request_id,
        (RequestStatus.PENDING,),
        {"status": RequestStatus.ANSWERED, "outcome": "approved", "answered_at": utcnow()},
        (audit_event(request_id, "answered", "ann@example.org", "email"),),
        finish_inbound=(inbound_id, "answered"),
    )


def test_each_change_in_a_batch_wins_or_loses_on_its_own(store: Store) -> None:
    add_request(store, "first", RequestStatus.PENDING)
    add_request(store, "taken", RequestStatus.ANSWERED)  # another answer came first
    add_request(store, "second", RequestStatus.PENDING)
    replies = [stored_reply(store, f"<{name}@example.org>") for name in ("a", "b", "c")]

    won = store.transitions(
        [answer("first", replies[0]), answer("taken", replies[1]), answer("second", replies[2])]
    )

    assert won == [True, False, True]
    assert [store.get(r).status for r in ("first", "taken", "second")] == ["answered"] * 3
    assert store.get("taken").outcome is None  # the loser's values were not written
    with store.session() as session:
        events = {(e.request_id, e.event) for e in session.exec(select(AuditEvent))}
        inbound = {i.id: (i.status, i.result) for i in session.exec(select(InboundMessage))}
    assert events == {("first", "answered"), ("second", "answered")}
    assert inbound[replies[0]] == ("done", "answered")
    assert inbound[replies[1]] == ("new", None)  # left for its caller to refuse
    assert inbound[replies[2]] == ("done", "answered")


def test_a_batch_that_fails_writes_nothing(store: Store) -> None:
    add_request(store, "first", RequestStatus.PENDING)
    reply = stored_reply(store, "<a@example.org>")
    add_request(store, "second", RequestStatus.PENDING)
    refused = Transition("second", (RequestStatus.PENDING,), {"flow_id": None})  # NOT NULL

    with pytest.raises(IntegrityError):
        store.transitions([answer("first", reply), refused])

    assert store.get("first").status == RequestStatus.PENDING
    with store.session() as session:
        assert list(session.exec(select(AuditEvent))) == []
        assert session.get(InboundMessage, reply).status == "new"  # type: ignore[union-attr]
