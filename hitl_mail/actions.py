"""What an operator does to a request from outside email: cancel it."""

from __future__ import annotations

import logging

from hitl_mail import compose
from hitl_mail.config import Config
from hitl_mail.intake import content_of, sender
from hitl_mail.models import RequestStatus, utcnow
from hitl_mail.outbound import queue_row
from hitl_mail.store import Store, advance, audit_event

log = logging.getLogger(__name__)


def cancel_request(config: Config, store: Store, request_id: str, actor: str) -> bool:
    """Cancel a pending request: its token stops working, its timers stop, the assignee is told.

    Returns False when the request is no longer pending (answered, cancelled…).
    """
    request = store.get(request_id)
    to = request.assigned_to or ""
    told = compose.error_mail(
        "cancelled",
        content_of(request),
        sender=sender(config),
        to=to,
        thread_id=request.notification_id or "",
        reply_to=None,
    )
    with store.session() as session:
        if not advance(
            session,
            request_id,
            [RequestStatus.PENDING],
            {"status": RequestStatus.CANCELLED, "answered_at": utcnow()},
        ):
            session.rollback()
            return False
        store.cancel_timers(session, request_id)
        session.add(audit_event(request_id, "cancelled", actor, "api"))
        if to:
            session.add(
                queue_row(told, kind="error:cancelled", request_id=request_id, recipient=to)
            )
        session.commit()
    log.info("request %s cancelled by %s", request_id, actor)
    return True
