"""What a webhook says and how it is signed: event bodies, HTTP outbox rows, signatures.

Pure functions, no I/O. A state change writes its event rows with
`event_rows` in its own transaction (one row per interested webhook, the body
fixed there); the delivery stage (delivery.py) POSTs them, signing each
attempt with `signature`. Receivers, and the bridge for crewAI's hosted
platform, check a signature with `verify_signature`. The format is SPEC
section 8: `X-Timestamp: <unix seconds>` and `X-Signature: sha256=<hex>`, the
HMAC-SHA256 of `"{timestamp}.{body}"` with the webhook's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from hitl_mail.config import WebhookSettings
from hitl_mail.models import FeedbackRequest, HttpOutboxRow, WebhookEvent, utcnow

CALLBACK = "bridge:callback"  # the destination of bridged answers (no webhook name has a colon)
CALLBACK_EVENT = "callback"
SIGNATURE_PREFIX = "sha256="


def event_payload(
    event: WebhookEvent | str,
    request: FeedbackRequest,
    *,
    callback_url: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The body of one event: the request as it is now (call it right after the change).

    Compatible with crewAI's hosted `new_request` webhook (`request` with
    `emit_options` and `metadata`, `callback_url`, `assigned_to_email`), plus
    our fields and a fresh `event_id` that receivers deduplicate with. `extra`
    adds top-level fields, e.g. `reason` for `refused` (never a token).
    """
    return {
        "event": str(event),
        "event_id": uuid.uuid4().hex,
        "request": {
            "id": request.id,
            "flow_id": request.flow_id,
            "method_name": request.method_name,
            "message": request.message,
            "emit_options": request.emit or [],
            "state": request.state,
            "metadata": request.request_metadata or {},
            "created_at": _iso(request.created_at),
            "status": request.status,
            "outcome": request.outcome,
            "feedback": request.feedback,
            "source": request.source,
            "answered_at": _iso(request.answered_at),
        },
        "callback_url": callback_url,
        "assigned_to_email": request.assigned_to,
        **extra,
    }


def event_rows(
    webhooks: Sequence[WebhookSettings], payload: Mapping[str, Any]
) -> list[HttpOutboxRow]:
    """One pending row per webhook that wants `payload["event"]`, all with the same body bytes."""
    event = str(payload["event"])
    wanted = [hook for hook in webhooks if hook.wants(event)]
    if not wanted:
        return []
    body = body_bytes(payload)
    request_id = (payload.get("request") or {}).get("id")
    return [
        _row(hook.name, hook.url, event, str(payload["event_id"]), body, request_id)
        for hook in wanted
    ]


def callback_row(url: str, body: Mapping[str, Any] | bytes, request_id: str) -> HttpOutboxRow:
    """A pending POST of a bridged request's answer to the hosted platform's `callback_url`."""
    data = body if isinstance(body, bytes) else body_bytes(body)
    return _row(CALLBACK, url, CALLBACK_EVENT, uuid.uuid4().hex, data, request_id)


def body_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"), default=_jsonable
    ).encode()


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 with `secret` over `"{timestamp}.{body}"`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def signed_headers(secret: str | None, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers of one attempt: JSON, a timestamp, and (with a secret) its signature."""
    timestamp = str(int(time.time() if now is None else now))
    headers = {"Content-Type": "application/json", "X-Timestamp": timestamp}
    if secret:
        headers["X-Signature"] = signature(secret, timestamp, body)
    return headers


def verify_signature(
    secret: str,
    timestamp: str | None,
    body: bytes,
    signature_header: str | None,
    max_skew: timedelta | float,
    now: float | None = None,
) -> bool:
    """True when `signature_header` signs `body` at `timestamp` with `secret`, and `timestamp` is fresh.

    A timestamp further than `max_skew` from now, in either direction, fails:
    a captured request replayed later is refused. The comparison takes the
    same time whatever the signature, so it leaks nothing about the right one.
    """
    if not secret or not timestamp or not signature_header:
        return False
    timestamp = timestamp.strip()
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    skew = max_skew.total_seconds() if isinstance(max_skew, timedelta) else float(max_skew)
    if abs((time.time() if now is None else now) - int(timestamp)) > skew:
        return False
    expected = signature(secret, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature_header.strip().encode())


def sample_payload(webhook: WebhookSettings, callback_url: str | None = None) -> dict[str, Any]:
    """A `new_request`-shaped event for `hitl-mail webhooks test` (marked as a test)."""
    sample = FeedbackRequest(
        id="test" + uuid.uuid4().hex[:12],
        status="pending",
        flow_id="hitl-mail-webhook-test",
        flow_class="hitl_mail.test",
        method_name="review",
        message="This is a test event from hitl-mail; no flow is waiting.",
        emit=["approved", "rejected"],
        request_metadata={"test": True, "webhook": webhook.name},
        state={},
        created_at=utcnow(),
        assigned_to="reviewer@example.com",
    )
    return event_payload(WebhookEvent.NEW_REQUEST, sample, callback_url=callback_url, test=True)


def _row(
    destination: str, url: str, event: str, event_id: str, body: bytes, request_id: str | None
) -> HttpOutboxRow:
    now = utcnow()
    return HttpOutboxRow(
        request_id=request_id,
        destination=destination,
        url=url,
        event=event,
        event_id=event_id,
        body=body,
        next_attempt_at=now,
        created_at=now,
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
