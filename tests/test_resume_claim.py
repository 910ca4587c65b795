"""The resume stage's claim (`Store.claim_resumable`): what it leases, in which order."""

from __future__ import annotations

from datetime import datetime, timedelta

from hitl_mail.models import FeedbackRequest, RequestStatus, utcnow
from hitl_mail.store import Store

LEASE = timedelta(minutes=5)


def add(store: Store, request_id: str, status: str, **values: datetime) -> None:
    store.add(
        FeedbackRequest(
            id=request_id,
            status=status,
            flow_id="f1",
            flow_class="review_flows.ReviewFlow",
            method_name="review",
            created_at=utcnow(),
            **values,
        )
    )


def test_failed_requests_that_are_due_come_first_then_answered_ones_oldest_first(
    store: Store,
) -> None:
    now = utcnow()
    add(store, "answered2", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=2))
    add(store, "answered3", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=1))
    add(store, "answered1", RequestStatus.ANSWERED, answered_at=now - timedelta(minutes=3))
    add(store, "faileddue", RequestStatus.RESUME_FAILED, resume_after=now - timedelta(seconds=1))
    add(store, "failedlater", RequestStatus.RESUME_FAILED, resume_after=now + timedelta(hours=1))
    add(store, "pending", RequestStatus.PENDING)

    first = [r.id for r in store.claim_resumable(3, LEASE)]
    second = [r.id for r in store.claim_resumable(3, LEASE)]

    assert first == ["faileddue", "answered1", "answered2"]
    assert second == ["answered3"]  # the rest are leased, not due, or not answered
    assert store.claim_resumable(3, LEASE) == []


def test_a_request_whose_lease_ran_out_is_claimed_again(store: Store) -> None:
    add(store, "answered", RequestStatus.ANSWERED, answered_at=utcnow())
    assert [r.id for r in store.claim_resumable(1, timedelta(seconds=-1))] == ["answered"]
    assert [r.id for r in store.claim_resumable(1, LEASE)] == ["answered"]
