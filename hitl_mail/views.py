"""How requests look to people: the `requests list/show` table, text and JSON (SPEC section 7)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from hitl_mail import tokens
from hitl_mail.models import AuditEvent, FeedbackRequest


def as_json(request: FeedbackRequest, trail: Sequence[AuditEvent] | None = None) -> dict[str, Any]:
    """The pinned fields, plus a few more; `audit` only when a trail is given (show, not list)."""
    data: dict[str, Any] = {
        "id": request.id,
        "status": request.status,
        "outcome": request.outcome,
        "feedback": tokens.redacted(request.feedback),  # what a person typed: anything
        "source": request.source,
        "assigned_to": request.assigned_to,
        "flow_class": request.flow_class,
        "method_name": request.method_name,
        "created_at": _iso(request.created_at),
        "answered_at": _iso(request.answered_at),
        "deadline": _iso(request.deadline),
        "flow_id": request.flow_id,
        "emit": request.emit,
        "default_outcome": request.default_outcome,
        "auto_outcome": request.auto_outcome,
        "routing_rule": request.routing_rule,
        "resumed_at": _iso(request.resumed_at),
        "resume_attempts": request.resume_attempts,
        "error": tokens.redacted(request.last_error),
        **_sla(request),
    }
    if trail is not None:
        data["audit"] = [
            {
                "at": _iso(e.at),
                "event": e.event,
                "actor": tokens.redact(e.actor),
                "source": e.source,
                "detail": tokens.redacted(e.detail),  # rows written before redaction too
            }
            for e in trail
        ]
    return data


def _sla(request: FeedbackRequest) -> dict[str, Any]:
    """The routing rule's SLA target beside the actual time to answer, so they can be compared."""
    seconds = (
        (request.answered_at - request.created_at).total_seconds() if request.answered_at else None
    )
    met = None if request.sla_seconds is None or seconds is None else seconds <= request.sla_seconds
    return {"sla_seconds": request.sla_seconds, "response_seconds": seconds, "sla_met": met}


def table(requests: Sequence[FeedbackRequest]) -> str:
    header = ("ID", "STATUS", "OUTCOME", "ASSIGNED TO", "METHOD", "CREATED")
    rows = [
        (
            r.id,
            r.status,
            r.outcome or "-",
            r.assigned_to or "-",
            r.method_name,
            _short(r.created_at),
        )
        for r in requests
    ]
    if not rows:
        return "no requests"
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )


def describe(request: FeedbackRequest, trail: Sequence[AuditEvent]) -> str:
    data = as_json(request)
    lines = [
        f"{key:>16}: {'-' if value is None else value}"
        for key, value in data.items()
        if key != "error"
    ]
    if request.last_error:
        lines += ["", "error:", tokens.redact(request.last_error).rstrip()]
    lines += ["", "audit trail:"]
    for event in trail:
        detail = (
            ""
            if event.detail is None
            else " " + json.dumps(tokens.redacted(event.detail), ensure_ascii=False)[:300]
        )
        lines.append(
            f"  {_iso(event.at)}  {event.event:<22} {tokens.redact(event.actor)}"
            f" ({event.source or '-'}){detail}"
        )
    return "\n".join(lines)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _short(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"
