"""The resume stage's claim (`Store.claim_resumable`): what it leases, in which order."""

from __future__ import annotations

from datetime import timedelta

from conftest import add_request

from hitl_mail.models import RequestStatus, utcnow
from hitl_mail.store import Store

LEASE = timedelta(minutes=5)


def test_failed_requests_that_are_due_come_first_then_answered_ones_oldest_first(
    store: Store,
) -> None:
    now = utcnow()
    add_request(store, "answered2", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=2))
    add_request(store, "answered3", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=1))
    add_request(store, "answered1", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=3))
    add_request(
        store, "faileddue", RequestStatus.RESUME_FAILED, resume_after=now - timedelta(seconds=1)
    )
    add_request(
        store, "failedlater", RequestStatus.RESUME_FAILED, resume_after=now + timedelta(hours=1)
    )
    add_request(store, "pending", RequestStatus.PENDING)

    first = [r.id for r in store.claim_resumable(3, LEASE)]
    second = [r.id for r in store.claim_resumable(3, LEASE)]

    assert first == ["faileddue", "answered1", "answered2"]
    assert second == ["answered3"]  # the rest are leased, not due, or not answered
    assert store.claim_resumable(3, LEASE) == []


def test_a_request_whose_lease_ran_out_is_claimed_again(store: Store) -> None:
    add_request(store, "answered", RequestStatus.ANSWERED, answered_at=utcnow())
    assert [r.id for r in store.claim_resumable(1, timedelta(seconds=-1))] == ["answered"]
    assert [r.id for r in store.claim_resumable(1, LEASE)] == ["answered"]
