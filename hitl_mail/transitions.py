"""Every change of a request's state, by name; each written whole or not at all.

A transition is one conditional update of the request (`... WHERE status IN
(...)`: the loser of a race writes nothing), its audit row, and its outbox
rows — the mail it queues and, when webhooks are configured, the event that
tells them, carrying the request as it is once changed — in one transaction.
Every writer in every process comes here: intake in the flow process;
answering, timers and resuming in the daemon; cancel and retry from the CLI
and the HTTP API. An answer is recorded by `answered` whatever its source
(email, the HTTP callback, the timer's auto-response). tests/test_one_home.py
fails if a request's status is written anywhere else.

A check that refuses something raises `Refusal`; `refused` records it — its
audit row, the error mail it may send, its event — in one transaction too,
so no check ever sends mail itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlmodel import Session, func

from hitl_mail import callbacks, tokens, webhooks
from hitl_mail.config import Config, WebhookSettings
from hitl_mail.models import (
    AnswerSource,
    Audit,
    FeedbackRequest,
    OutboxMessage,
    RequestStatus,
    WebhookEvent,
    utcnow,
)
from hitl_mail.store import (
    Store,
    Transition,
    apply,
    audit_event,
    finish_replies,
    insert_rows,
)

if TYPE_CHECKING:
    from hitl_mail.compose import ErrorKind

ACTOR = "hitl-mail"
OPEN = (RequestStatus.PENDING,)
UNRESUMED = (RequestStatus.ANSWERED, RequestStatus.RESUME_FAILED)

_requests = FeedbackRequest.__table__  # type: ignore[attr-defined]
_outbox = OutboxMessage.__table__  # type: ignore[attr-defined]
_AS_IT_IS = sa.select(_requests).where(_requests.c.id == sa.bindparam("rid"))


@dataclass(frozen=True)
class Events:
    """Who hears of state changes: the configured `[[webhooks]]`, passed to each transition.

    A transition given None writes no event. `callback_url` names where an
    answer to the request may be POSTed (the HTTP API's, or a bridged
    request's own).
    """

    webhooks: Sequence[WebhookSettings]
    callback_url: Callable[[FeedbackRequest], str | None] = lambda request: None


def events_of(config: Config) -> Events | None:
    """The events the configuration asks for: None without webhooks, so nothing is built."""
    if not config.webhooks:
        return None
    return Events(config.webhooks, lambda request: callbacks.callback_url(config, request.id))


# -- created -------------------------------------------------------------------


def created(
    store: Store,
    request: FeedbackRequest,
    *,
    assigned: Mapping[str, Any],
    notification: OutboxMessage,
    also: Sequence[Any] = (),
    events: Events | None = None,
) -> None:
    """Store a new pending request with its assignment, `also` (timers...) and its notification."""
    request.status = RequestStatus.PENDING
    rid = request.id
    rows: list[Any] = [
        request,
        audit_event(rid, Audit.CREATED, ACTOR, detail={"flow_id": request.flow_id}),
        audit_event(rid, Audit.ASSIGNED, ACTOR, detail=dict(assigned)),
        *also,
        notification,
        audit_event(rid, Audit.NOTIFICATION_QUEUED, ACTOR, detail={"to": request.assigned_to}),
    ]
    if events is not None:
        rows.extend(_event(events, request, WebhookEvent.NEW_REQUEST))
    store.add(*rows)


def unroutable(store: Store, request: FeedbackRequest, error: str) -> None:
    """Store a new request no routing rule could assign, so it shows in `requests list`."""
    request.status = RequestStatus.UNROUTABLE
    request.last_error = error
    store.add(
        request,
        audit_event(request.id, Audit.CREATED, ACTOR),
        audit_event(request.id, Audit.ROUTING_FAILED, ACTOR, detail=error),
    )


# -- answered ----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """An answer that passed its checks: what is recorded, whatever it came through."""

    outcome: str | None
    feedback: str
    source: AnswerSource
    by: str  # the address the token was issued to, or ACTOR for an auto-response
    detail: Mapping[str, Any] = field(default_factory=dict)  # audit detail: how it was decided


def answered(
    request_id: str,
    answer: Answer,
    *,
    mail: OutboxMessage | None,
    inbound: int | None = None,
    events: Events | None = None,
) -> Transition:
    """Answer a pending request; `mail` (the confirmation) queued, reply `inbound` marked done.

    Returned unapplied, so answers decided together are recorded in one
    commit (`record`); one that lost its race writes nothing.
    """
    auto = answer.source == AnswerSource.AUTO
    values = {
        "status": RequestStatus.ANSWERED,
        "outcome": answer.outcome,
        "feedback": answer.feedback,
        "source": str(answer.source),
        "answered_by": answer.by,
        "answered_at": utcnow(),
    }
    audit = audit_event(request_id, Audit.ANSWERED, answer.by, answer.source, dict(answer.detail))
    change = _change(
        request_id,
        OPEN,
        values,
        [audit, *_given(mail)],
        WebhookEvent.AUTO_ANSWERED if auto else WebhookEvent.ANSWERED,
        events,
        finish_inbound=None if inbound is None else (inbound, "answered"),
        stop_timers=auto,  # a person's answer leaves them: they fire on a request no longer pending
    )
    return _and_post_if_bridged(change)


def auto_answered(
    request: FeedbackRequest, *, mail: OutboxMessage | None, events: Events | None = None
) -> Transition:
    """The deadline passed unanswered: answer with the configured outcome, stop the other timers."""
    outcome = request.auto_outcome
    detail = {"outcome": outcome, "deadline": _iso(request.deadline)}
    answer = Answer(outcome if request.emit else None, "", AnswerSource.AUTO, ACTOR, detail)
    return answered(request.id, answer, mail=mail, events=events)


def record(store: Store, changes: Sequence[Transition]) -> list[bool]:
    """Make several changes in one commit; which of them won."""
    return store.transitions(changes)


# -- while pending -------------------------------------------------------------


def reminded(
    request: FeedbackRequest, *, mail: OutboxMessage, events: Events | None = None
) -> Transition:
    """Remind the assignee of a request still pending."""
    audit = audit_event(
        request.id, Audit.REMINDER_QUEUED, ACTOR, AnswerSource.AUTO, {"to": request.assigned_to}
    )
    # Nothing of the request changes, but the update still takes its row, so a
    # reminder and an answer at the same instant are ordered like any two changes.
    values = {"status": RequestStatus.PENDING}
    return _change(request.id, OPEN, values, [mail, audit], WebhookEvent.REMINDER, events)


def escalated(
    request_id: str,
    *,
    before: str,
    after: Mapping[str, Any],
    mail: Sequence[OutboxMessage],
    events: Events | None = None,
) -> Transition:
    """Reassign a pending request: `after` holds its new assignee, token and notification id.

    `mail` is the new assignee's notification and the word to the old one;
    the old token stops matching the request's assignee, so it stops working.
    """
    detail = {"from": before, "to": after["assigned_to"]}
    audit = audit_event(request_id, Audit.ESCALATED, ACTOR, AnswerSource.AUTO, detail)
    return _change(request_id, OPEN, dict(after), [*mail, audit], WebhookEvent.ESCALATED, events)


def token_renewed(
    request_id: str,
    *,
    before: str,
    after: str,
    to: str,
) -> Transition:
    """Give a pending request a fresh token `after` in place of its expired `before`, for `to`.

    The mail that carries it goes with it (`ErrorMail.change`, recorded by `refused`).

    A token issued before the request's current one is refused (answering.py),
    so `before` and every older token are revoked with it. Moves only while
    the request still holds `before`: of replies racing on one expired link,
    one renews it.
    """
    issued = tokens.read(after).issued_at
    audit = audit_event(
        request_id, Audit.TOKEN_RENEWED, ACTOR, detail={"to": to, "issued_at": _iso(issued)}
    )
    values = {"token": after}
    return _change(request_id, OPEN, values, [audit], expect=(("token", before),))


def cancelled(
    store: Store,
    request_id: str,
    actor: str,
    *,
    mail: OutboxMessage | None,
    events: Events | None = None,
) -> bool:
    """Cancel a pending request, stop its timers, tell its assignee; False if no longer pending."""
    values = {"status": RequestStatus.CANCELLED, "answered_at": utcnow()}
    audit = audit_event(request_id, Audit.CANCELLED, actor, "api")
    change = _change(
        request_id,
        OPEN,
        values,
        [audit, *_given(mail)],
        WebhookEvent.CANCELLED,
        events,
        stop_timers=True,
    )
    return record(store, [change])[0]


# -- resuming -----------------------------------------------------------------


def resumed(
    store: Store, request_id: str, detail: Mapping[str, Any], events: Events | None = None
) -> bool:
    """The flow ran on from its answer."""
    values = {
        "status": RequestStatus.RESUMED,
        "resumed_at": utcnow(),
        "lease_until": None,
        "last_error": None,
    }
    audit = audit_event(request_id, Audit.RESUMED, ACTOR, detail=dict(detail))
    change = _change(request_id, UNRESUMED, values, [audit], WebhookEvent.RESUMED, events)
    return record(store, [change])[0]


def resume_failed(
    store: Store,
    request_id: str,
    *,
    attempt: int,
    retry_at: datetime | None,
    error: str | None,
    events: Events | None = None,
) -> bool:
    """The flow raised on resuming: kept, retried at `retry_at` (None: when an operator says).

    Recorded once per attempt: the same attempt recorded again (by the daemon,
    when the worker's own write seemed to fail) changes nothing.
    """
    values = {
        "status": RequestStatus.RESUME_FAILED,
        "resume_attempts": attempt,
        "resume_after": retry_at,
        "lease_until": None,
        "last_error": error,
    }
    detail = {"attempt": attempt, "retry_at": _iso(retry_at), "error": error}
    audit = audit_event(request_id, Audit.RESUME_FAILED, ACTOR, detail=detail)
    change = _change(
        request_id,
        UNRESUMED,
        values,
        [audit],
        WebhookEvent.RESUME_FAILED,
        events,
        expect=(("resume_attempts", attempt - 1),),
    )
    return record(store, [change])[0]


def resume_retried(store: Store, request_id: str, actor: str) -> bool:
    """Queue a failed resume again now (the operator fixed the cause); False if it had not failed."""
    values = {"resume_after": utcnow(), "resume_attempts": 0, "lease_until": None}
    audit = audit_event(request_id, Audit.RESUME_RETRY_REQUESTED, actor, "api")
    change = _change(request_id, (RequestStatus.RESUME_FAILED,), values, [audit])
    return record(store, [_and_post_if_bridged(change)])[0]


# -- bridged requests (bridge.py): resumed on crewAI's hosted platform -------------
# Their answer is POSTed to the hosted callback_url from the HTTP outbox, queued
# by the answer itself (and again by an operator's retry); the delivery stage
# reports how that POST ended, and that is their resume.


def _and_post_if_bridged(change: Transition) -> Transition:
    """`change`, also queueing a bridged request's answer POST in the same transaction."""
    first = change.then

    def then(session: Session) -> Sequence[Any]:
        rows = list(first(session)) if first is not None else []
        return [*rows, *callbacks.bridged_answer_rows(session, change.request_id)]

    return change._replace(then=then)


def callback_settled(
    session: Session,
    request_id: str,
    *,
    delivered: bool,
    attempts: int,
    error: str | None,
    events: Events | None = None,
) -> bool:
    """The answer POST of a bridged request ended: `resumed` when taken, else `resume_failed`.

    Made in the caller's session, so it commits with the HTTP outbox row's outcome.
    A failed POST is not retried automatically (the delivery stage already
    retried it): `requests retry` queues it again.
    """
    if delivered:
        values: dict[str, Any] = {
            "status": RequestStatus.RESUMED,
            "resumed_at": utcnow(),
            "last_error": None,
        }
        audit = audit_event(request_id, Audit.RESUMED, ACTOR, detail={"via": "hosted callback"})
        event = WebhookEvent.RESUMED
    else:
        values = {
            "status": RequestStatus.RESUME_FAILED,
            "resume_attempts": attempts,
            "resume_after": None,
            "last_error": error,
        }
        detail = {"attempt": attempts, "retry_at": None, "error": error, "via": "hosted callback"}
        audit = audit_event(request_id, Audit.RESUME_FAILED, ACTOR, detail=detail)
        event = WebhookEvent.RESUME_FAILED
    change = _change(request_id, UNRESUMED, values, [audit], event, events)
    return apply(session, [change])[0]


# -- refusals -------------------------------------------------------------------


class RefusalKind(StrEnum):
    """Why something could not answer a request; its audit event is `reply_<kind>`."""

    UNMATCHED = "unmatched"
    MALFORMED = "malformed"
    MACHINE_MAIL = "machine_mail"
    UNAUTHENTICATED = "unauthenticated"
    BAD_TOKEN = "bad_token"
    WRONG_SENDER = "wrong_sender"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    ALREADY_ANSWERED = "already_answered"
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class Tell:
    """Whom a refusal tells, with which error mail (a `compose.ErrorKind`) and its details."""

    to: str
    kind: ErrorKind
    extra: Mapping[str, Any] = field(default_factory=dict)
    renew: str | None = None  # the dead token replied to: offer a link that works instead


@dataclass(frozen=True)
class Refusal(Exception):
    """Raised by a check: `kind` and `reason` are recorded; `tell`, if any, is mailed."""

    kind: RefusalKind
    reason: Any = None
    tell: Tell | None = None


@dataclass(frozen=True)
class MailLimit:
    """Send no error mail once `at_most` like it were queued within `window`.

    Like it: to `to`, of `kind`, about `request_id`; None matches any
    (`kind` None: any error mail).
    """

    window: timedelta
    to: str | None = None
    kind: str | None = None
    request_id: str | None = None
    at_most: int = 1


@dataclass(frozen=True)
class ErrorMail:
    """The error mail a refusal queues, unless one like it went out lately (`limits`)."""

    row: OutboxMessage
    limits: Sequence[MailLimit] = ()
    change: Transition | None = None  # made with the mail only (a fresh link's token)


def refused(
    store: Store,
    refusal: Refusal,
    *,
    request_id: str | None,
    actor: str,
    source: str,
    detail: Mapping[str, Any],
    inbound: int | None = None,
    mail: ErrorMail | None = None,
    events: Events | None = None,
) -> bool:
    """Record a refusal: its audit row, its error mail (or why none), its event, the reply done.

    One transaction, so the rate limit is read where the mail is written.
    Returns whether the error mail was queued.
    """
    event = f"reply_{refusal.kind}"
    rows: list[Any] = [audit_event(request_id, event, actor, source, dict(detail))]
    with store.session() as session:
        queued = mail is not None and not any(_sent_lately(session, m) for m in mail.limits)
        if queued and mail is not None and mail.change is not None:
            queued = apply(session, [mail.change])[0]  # a fresh link renewed meanwhile: no mail
        if mail is not None:
            rows.extend(_error_mail(request_id, mail, queued))
        if events is not None and request_id is not None:
            rows.extend(_refusal_event(session, events, request_id, refusal))
        insert_rows(session, rows)
        if inbound is not None:
            finish_replies(session, [(inbound, str(refusal.kind), request_id)])
        session.commit()
    return queued


def _error_mail(request_id: str | None, mail: ErrorMail, queued: bool) -> list[Any]:
    said = {"kind": mail.row.kind.removeprefix("error:"), "to": mail.row.recipient}
    if not queued:
        return [audit_event(request_id, Audit.ERROR_MAIL_SUPPRESSED, ACTOR, detail=said)]
    return [mail.row, audit_event(request_id, Audit.ERROR_MAIL_QUEUED, ACTOR, detail=said)]


def _sent_lately(session: Session, limit: MailLimit) -> bool:
    kind = (
        _outbox.c.kind.startswith("error:") if limit.kind is None else _outbox.c.kind == limit.kind
    )
    query = sa.select(_outbox.c.id).where(kind, _outbox.c.created_at >= utcnow() - limit.window)
    if limit.to is not None:
        query = query.where(func.lower(_outbox.c.recipient) == limit.to.lower())
    if limit.request_id is not None:
        query = query.where(_outbox.c.request_id == limit.request_id)
    found = session.connection().execute(query.limit(limit.at_most)).all()
    return len(found) >= limit.at_most


def _refusal_event(
    session: Session, events: Events, request_id: str, refusal: Refusal
) -> Sequence[Any]:
    request = _as_it_is(session, request_id)
    if request is None:
        return ()
    # The reason may quote what a stranger sent (an address, a subject): no token in it (SPEC 9).
    why = tokens.redacted(
        refusal.reason if isinstance(refusal.reason, str) else str(refusal.reason)
    )
    return _event(events, request, WebhookEvent.REFUSED, reason=str(refusal.kind), detail=why)


# -- machinery ---------------------------------------------------------------------


def _change(
    request_id: str,
    from_status: tuple[RequestStatus, ...],
    values: dict[str, Any],
    also: Sequence[Any],
    event: WebhookEvent | None = None,
    events: Events | None = None,
    *,
    finish_inbound: tuple[int, str] | None = None,
    stop_timers: bool = False,
    expect: tuple[tuple[str, Any], ...] = (),
) -> Transition:
    then = None
    if event is not None and events is not None:
        wanted, sink = event, events

        def then(session: Session) -> Sequence[Any]:
            request = _as_it_is(session, request_id)
            return () if request is None else _event(sink, request, wanted)

    return Transition(
        request_id,
        from_status,
        values,
        tuple(also),
        finish_inbound,
        then=then,
        stop_timers=stop_timers,
        expect=expect,
    )


def _event(
    events: Events, request: FeedbackRequest, event: WebhookEvent, **extra: Any
) -> Sequence[Any]:
    callback_url = events.callback_url(request)
    payload = webhooks.event_payload(event, request, callback_url=callback_url, **extra)
    return webhooks.event_rows(events.webhooks, payload)


def _as_it_is(session: Session, request_id: str) -> FeedbackRequest | None:
    """The request as this transaction sees it (after its own update), detached from the session."""
    row = session.connection().execute(_AS_IT_IS, {"rid": request_id}).mappings().first()
    return None if row is None else FeedbackRequest(**row)


def _given(mail: OutboxMessage | None) -> list[OutboxMessage]:
    return [] if mail is None else [mail]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
