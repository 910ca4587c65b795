"""Turn a paused flow's pending context into a stored request and its queued notification.

This is the first stage of the pipeline. It runs inside the flow's own
process (called by `MailProvider`), so everything the daemon will need later
— state snapshot, full pending context, assignee, token, notification — is
written here, in one transaction, before crewAI is told the flow is paused.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from hitl_mail import compose, deadlines, tokens, transitions
from hitl_mail.config import Config
from hitl_mail.models import Audit, FeedbackRequest, OutboxMessage, utcnow
from hitl_mail.outbound import queue_row
from hitl_mail.routing import Assignment, RoutingError, route
from hitl_mail.store import Store, audit_event

log = logging.getLogger(__name__)

ACTOR = "hitl-mail"


class FlowNotImportable(ValueError):
    """The flow class lives in `__main__`, so the daemon could never import it to resume."""


def addressing(config: Config) -> tokens.ReplyAddressing:
    inbound = config.inbound
    return tokens.ReplyAddressing(inbound.reply_domain, inbound.local_part, inbound.separator)


def sender(config: Config) -> compose.Sender:
    return compose.Sender(from_address=config.outbound.from_address)


def content_of(
    request: FeedbackRequest, config: Config, reader: str | None = None
) -> compose.RequestContent:
    """What the request's emails show, in the language of `reader` (default: its assignee)."""
    routing = config.routing
    return compose.RequestContent(
        request_id=request.id,
        flow_class=request.flow_class,
        method_name=request.method_name,
        message=request.message,
        method_output=request.method_output,
        emit=tuple(request.emit) if request.emit else None,
        default_outcome=request.default_outcome,
        deadline=request.deadline,
        auto_outcome=request.auto_outcome,
        label=routing.label_for(request.routing_rule),
        language=routing.language_for(request.routing_rule, reader or request.assigned_to),
    )


def create_request(
    config: Config,
    store: Store,
    context: dict[str, Any],
    state: Any,
    *,
    request_id: str | None = None,
    assignee: str | None = None,
) -> FeedbackRequest:
    """Store the request, its audit trail and its notification; return the stored request.

    Raises `FlowNotImportable` before storing anything, and `RoutingError`
    after recording the request as `unroutable` (so the failure is visible in
    `requests list`, not only in the flow's traceback). The bridge gives the
    id (one per hosted event, so a replay collides) and an `assignee` that
    stands in for `default_assignee`: routing rules still come first.
    """
    flow_class = str(context["flow_class"])
    if flow_class.startswith("__main__."):
        raise FlowNotImportable(
            f"{flow_class} is defined in a script run as __main__; the hitl-mail daemon "
            "resumes flows by importing their class, so move the class into an importable "
            "module (e.g. myflows.py) listed under [flows].import_paths"
        )
    now = utcnow()
    request = _new_request(context, state, now)
    if request_id is not None:
        request.id = request_id
    routing = config.routing
    if assignee is not None:
        routing = routing.model_copy(update={"default_assignee": assignee})
    try:
        assignment = route(
            routing, method_name=request.method_name, flow_class=flow_class, state=state
        )
    except RoutingError as exc:
        transitions.unroutable(store, request, str(exc))
        log.error("request %s unroutable: %s", request.id, exc)
        raise
    assigned = _assign(config, request, assignment, now)
    planned: list[Any] = []
    _apply_deadline(config, request, now, planned)
    transitions.created(
        store,
        request,
        assigned=assigned,
        notification=notification_row(config, request),
        also=planned,
        events=transitions.events_of(config),
    )
    log.info(
        "request %s created for %s.%s, assigned to %s",
        request.id,
        flow_class,
        request.method_name,
        request.assigned_to,
    )
    return request


def notification_row(
    config: Config, request: FeedbackRequest, reassigned: compose.Reassignment | None = None
) -> OutboxMessage:
    """Compose the notification for the request's current assignee and token."""
    assert request.assigned_to and request.token and request.notification_id
    message = compose.notification(
        content_of(request, config),
        sender=sender(config),
        to=request.assigned_to,
        reply_to=addressing(config).address(request.token),
        message_id=request.notification_id,
        expires_at=request.created_at + config.tokens.max_age,
        reassigned=reassigned,
    )
    return queue_row(
        message, kind="notification", request_id=request.id, recipient=request.assigned_to
    )


def reply_to_of(config: Config, request: FeedbackRequest) -> str | None:
    return addressing(config).address(request.token) if request.token else None


def _new_request(context: dict[str, Any], state: Any, now: datetime) -> FeedbackRequest:
    return FeedbackRequest(
        id=tokens.new_request_id(),
        flow_id=str(context.get("flow_id") or "unknown"),
        flow_class=str(context["flow_class"]),
        method_name=str(context["method_name"]),
        message=str(context.get("message") or ""),
        method_output=context.get("method_output"),
        emit=list(context["emit"]) if context.get("emit") else None,
        default_outcome=context.get("default_outcome"),
        llm=context.get("llm"),
        request_metadata=context.get("metadata") or {},
        state=state,
        context=context,
        created_at=now,
    )


def _assign(
    config: Config, request: FeedbackRequest, assignment: Assignment, now: datetime
) -> dict[str, Any]:
    """Give the request its assignee and token; what the `assigned` audit event says."""
    request.assigned_to = assignment.address.lower()
    request.routing_rule = assignment.rule
    request.token = tokens.mint(request.id, request.assigned_to, config.secret_keys, now)
    request.notification_id = compose.make_message_id(config.outbound.domain)
    return {"to": request.assigned_to, "rule": assignment.rule, "via": assignment.via}


def _apply_deadline(
    config: Config, request: FeedbackRequest, now: datetime, events: list[Any]
) -> None:
    """Deadline, reminders, escalation and SLA from the configuration; their timers join `events`."""
    planned = deadlines.plan(
        config,
        rule_name=request.routing_rule,
        method_name=request.method_name,
        flow_class=request.flow_class,
        emit=request.emit,
        created_at=now,
    )
    for problem in planned.problems:
        events.append(audit_event(request.id, Audit.CONFIG_ERROR, ACTOR, detail=problem))
        log.error("request %s: %s", request.id, problem)
    if planned.problems:
        request.last_error = "; ".join(planned.problems)
    request.deadline = planned.deadline
    request.auto_outcome = planned.auto_outcome
    request.sla_seconds = int(planned.sla.total_seconds()) if planned.sla else None
    events.extend(planned.timers(request.id))
