"""What an operator does to a request from outside email: cancel it, or resume it again."""

from __future__ import annotations

import logging

from hitl_mail import compose, transitions
from hitl_mail.config import Config
from hitl_mail.intake import content_of, sender
from hitl_mail.outbound import queue_row
from hitl_mail.store import Store

log = logging.getLogger(__name__)


def cancel_request(config: Config, store: Store, request_id: str, actor: str) -> bool:
    """Cancel a pending request: its token stops working, its timers stop, the assignee is told.

    Returns False when the request is no longer pending (answered, cancelled…).
    """
    request = store.get(request_id)
    to = request.assigned_to or ""
    told = compose.error_mail(
        "cancelled",
        content_of(request, config),
        sender=sender(config),
        to=to,
        thread_id=request.notification_id or "",
        reply_to=None,
        replied=False,
    )
    mail = (
        queue_row(told, kind="error:cancelled", request_id=request_id, recipient=to) if to else None
    )
    if not transitions.cancelled(
        store, request_id, actor, mail=mail, events=transitions.events_of(config)
    ):
        return False
    log.info("request %s cancelled by %s", request_id, actor)
    return True


def retry_resume(store: Store, request_id: str, actor: str) -> bool:
    """Queue a failed resume again now; False when the request's resume had not failed."""
    retried = transitions.resume_retried(store, request_id, actor)
    if retried:
        log.info("request %s: resume queued again by %s", request_id, actor)
    return retried
