"""The database tables: requests, their audit trail, the two mail queues and the HTTP outbox.

Tables are the queues between stages (see store.py): a flow process inserts a
request and its notification into `outbox`; the SMTP edge inserts raw replies
into `inbound`; workers claim rows with conditional updates. The schema is
created and changed only by the migrations in `hitl_mail/migrations`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Column, Field, SQLModel


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _at(*, index: bool = False, nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), index=index, nullable=nullable))


def _json() -> Any:
    return Field(default=None, sa_column=Column(sa.JSON, nullable=True))


class RequestStatus(StrEnum):
    """Where a request is in its life (SPEC 6); only transitions.py moves a request between them."""

    PENDING = "pending"
    ANSWERED = "answered"
    RESUMED = "resumed"
    RESUME_FAILED = "resume_failed"
    CANCELLED = "cancelled"
    UNROUTABLE = "unroutable"


class AnswerSource(StrEnum):
    """Where an answer came from (the request's `source`, SPEC 6)."""

    EMAIL = "email"
    API = "api"
    WEB = "web"
    AUTO = "auto"


class Audit(StrEnum):
    """The names of audit trail events (`requests show`); a refused reply is `reply_<kind>`."""

    CREATED = "created"
    ROUTING_FAILED = "routing_failed"
    ASSIGNED = "assigned"
    CONFIG_ERROR = "config_error"
    NOTIFICATION_QUEUED = "notification_queued"
    REMINDER_QUEUED = "reminder_queued"
    ESCALATED = "escalated"
    TOKEN_RENEWED = "token_renewed"
    ANSWERED = "answered"
    CANCELLED = "cancelled"
    RESUMED = "resumed"
    RESUME_FAILED = "resume_failed"
    RESUME_RETRY_REQUESTED = "resume_retry_requested"
    ERROR_MAIL_QUEUED = "error_mail_queued"
    ERROR_MAIL_SUPPRESSED = "error_mail_suppressed"
    EMAIL_SENT = "email_sent"
    EMAIL_RETRY = "email_retry"
    EMAIL_FAILED = "email_failed"


class FeedbackRequest(SQLModel, table=True):
    __tablename__ = "requests"
    # The resume stage's claim walks answered requests oldest first (store.claim_resumable).
    __table_args__ = (sa.Index("ix_requests_resumable", "status", "answered_at"),)

    id: str = Field(primary_key=True, max_length=32)
    # Written only by transitions.py (a new request is pending until it is stored).
    status: str = Field(default=RequestStatus.PENDING, index=True, max_length=20)
    flow_id: str = Field(index=True, max_length=200)
    flow_class: str = Field(max_length=400)
    method_name: str = Field(max_length=200)
    message: str = ""
    method_output: Any = _json()
    emit: list[str] | None = _json()
    default_outcome: str | None = None
    llm: Any = _json()
    request_metadata: dict[str, Any] | None = _json()
    state: Any = _json()
    context: dict[str, Any] | None = _json()
    assigned_to: str | None = Field(default=None, max_length=320)
    routing_rule: str | None = None
    token: str | None = Field(default=None, max_length=64)
    # Replies that lost their token find the request through their thread (answering.py).
    notification_id: str | None = Field(default=None, max_length=400, index=True)
    created_at: datetime = _at(nullable=False)
    deadline: datetime | None = _at(index=True)
    auto_outcome: str | None = None
    answered_at: datetime | None = _at()
    outcome: str | None = None
    feedback: str | None = None
    source: str | None = Field(default=None, max_length=10)
    answered_by: str | None = None
    resumed_at: datetime | None = _at()
    resume_attempts: int = 0
    resume_after: datetime | None = _at(index=True)
    lease_until: datetime | None = _at()
    last_error: str | None = None
    sla_seconds: int | None = None


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str | None = Field(default=None, index=True, max_length=32)
    at: datetime = _at(nullable=False)
    event: str = Field(max_length=40)
    actor: str = Field(max_length=320)
    source: str | None = Field(default=None, max_length=10)
    detail: Any = _json()


class OutboxStatus:
    QUEUED = "queued"
    SENT = "sent"
    FAILED = "failed"


class OutboxMessage(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (sa.Index("ix_outbox_due", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str | None = Field(default=None, index=True, max_length=32)
    kind: str = Field(max_length=40)
    recipient: str = Field(max_length=320)
    message_id: str = Field(max_length=400)
    raw: bytes = Field(sa_column=Column(sa.LargeBinary, nullable=False))
    status: str = Field(default=OutboxStatus.QUEUED, max_length=10)
    attempts: int = 0
    next_attempt_at: datetime = _at(nullable=False)
    lease_until: datetime | None = _at()
    last_error: str | None = None
    created_at: datetime = _at(nullable=False)
    sent_at: datetime | None = _at()


class InboundStatus:
    NEW = "new"
    DONE = "done"
    PURGED = "purged"  # done, and its raw bytes cleared after [inbound].raw_retention


class InboundMessage(SQLModel, table=True):
    __tablename__ = "inbound"
    __table_args__ = (
        sa.Index("ix_inbound_due", "status", "id"),
        # The SMTP edge counts a request's waiting replies at every RCPT (edgestore.py).
        sa.Index("ix_inbound_waiting", "request_id", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(max_length=500, unique=True)
    envelope_from: str = Field(default="", max_length=320)
    recipients: list[str] = Field(default_factory=list, sa_column=Column(sa.JSON, nullable=False))
    raw: bytes = Field(sa_column=Column(sa.LargeBinary, nullable=False))
    received_at: datetime = _at(nullable=False)
    status: str = Field(default=InboundStatus.NEW, max_length=10)
    lease_until: datetime | None = _at()
    attempts: int = 0
    request_id: str | None = Field(default=None, max_length=32)
    result: str | None = None


class TimerKind:
    REMINDER = "reminder"
    ESCALATE = "escalate"
    AUTO = "auto"


class Timer(SQLModel, table=True):
    """A moment something must happen to a request: a reminder, an escalation, an auto-response.

    The scheduler keeps only the next due moment in memory; this table is the
    truth, so timers survive restarts and fire at once when they passed
    while the daemon was down. `fired_at` is set by the one claim that wins.
    """

    __tablename__ = "timers"
    __table_args__ = (sa.Index("ix_timers_due", "fired_at", "due_at"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True, max_length=32)
    kind: str = Field(max_length=20)
    due_at: datetime = _at(nullable=False)
    fired_at: datetime | None = _at()


class FlowStateRow(SQLModel, table=True):
    """crewAI's own `save_state` snapshots (flows using `@persist` with our persistence)."""

    __tablename__ = "flow_states"

    id: int | None = Field(default=None, primary_key=True)
    flow_uuid: str = Field(index=True, max_length=200)
    method_name: str = Field(max_length=200)
    state: Any = _json()
    saved_at: datetime = _at(nullable=False)


class WebhookEvent(StrEnum):
    """What happened to a request, as webhooks name it (SPEC section 8)."""

    NEW_REQUEST = "new_request"
    ANSWERED = "answered"
    AUTO_ANSWERED = "auto_answered"
    RESUMED = "resumed"
    RESUME_FAILED = "resume_failed"
    REMINDER = "reminder"
    ESCALATED = "escalated"
    CANCELLED = "cancelled"
    REFUSED = "refused"


class HttpOutboxStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # leased by a delivery in flight; taken again once the lease runs out
    DELIVERED = "delivered"
    FAILED = "failed"


class HttpOutboxRow(SQLModel, table=True):
    """One HTTP POST to make: an event to one webhook, or an answer to a bridged callback URL.

    The body bytes are fixed when the row is written, so every retry sends
    exactly the same body (and the same `event_id` in it); only the signature
    headers, made at each attempt, change. Rows of one request to one
    destination are delivered in `id` order (see delivery.py).
    """

    __tablename__ = "http_outbox"
    __table_args__ = (
        sa.Index("ix_http_outbox_due", "status", "next_attempt_at"),
        sa.Index("ix_http_outbox_order", "request_id", "destination", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    request_id: str | None = Field(default=None, max_length=32)
    destination: str = Field(max_length=100)  # a [[webhooks]] name, or "bridge:callback"
    url: str
    event: str = Field(max_length=40)
    event_id: str = Field(max_length=40, index=True)
    body: bytes = Field(sa_column=Column(sa.LargeBinary, nullable=False))
    status: str = Field(default=HttpOutboxStatus.PENDING, max_length=10)
    attempts: int = 0
    next_attempt_at: datetime = _at(nullable=False)
    first_attempt_at: datetime | None = _at()
    lease_until: datetime | None = _at()
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime = _at(nullable=False)
    delivered_at: datetime | None = _at()
