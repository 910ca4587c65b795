"""Take crewAI's hosted HITL `new_request` webhooks in, as requests answered by email.

The hosted platform POSTs one signed webhook per paused flow and accepts a
POST of the answer at the payload's `callback_url`; it does not retry. Here:

1. the body is bounded (`[bridge].max_body`), then its signature checked
   (`X-Timestamp`, `X-Signature`: HMAC-SHA256 over "{timestamp}.{body}" with
   `signing_secret`, no older or newer than `max_skew`). Missing, wrong or
   stale: 401, and nothing is stored;
2. the payload is validated (422 when unusable);
3. the request is stored through intake.py like a local flow's: routing rules
   (the assignee is `assigned_to_email` unless a rule says otherwise),
   deadlines and auto-responses, the notification email. Its id is derived
   from the event (`event_id`, else the hosted request id), so a replayed
   webhook collides with the first and is refused (409) with nothing stored;
4. its `flow_class` is `crewai-hosted:<deployment>`: the resume stage leaves
   it alone, and its answer, by email, HTTP or timer, is POSTed to the
   `callback_url` from the HTTP outbox, with retries (callbacks.bridged_answer).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.exc import IntegrityError

from hitl_mail import webhooks
from hitl_mail.callbacks import BRIDGED_PREFIX
from hitl_mail.config import Config, is_email_address
from hitl_mail.intake import create_request
from hitl_mail.models import FeedbackRequest
from hitl_mail.routing import RoutingError
from hitl_mail.store import Store
from hitl_mail.tokens import ID_BYTES
from hitl_mail.web import BodyTooLarge, body_errors, is_json, read_body

log = logging.getLogger(__name__)

_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_ID_SALT = b"hitl-mail.bridge-request-id"

Option = Annotated[str, Field(min_length=1, max_length=200)]


class HostedRequest(BaseModel):
    """`request` in the hosted platform's `new_request` payload."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=200)
    flow_id: str | None = Field(default=None, max_length=200)
    method_name: str = Field(min_length=1, max_length=200)
    message: str = Field(default="", max_length=100_000)
    emit_options: list[Option] | None = Field(default=None, max_length=100)
    state: Any = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    method_output: Any = None


class HostedWebhook(BaseModel):
    """The hosted platform's `new_request` webhook (SPEC 8), plus `deployment`."""

    model_config = ConfigDict(extra="ignore")

    event: Literal["new_request"]
    event_id: str | None = Field(default=None, min_length=1, max_length=200)
    request: HostedRequest
    callback_url: str = Field(max_length=2000, pattern=r"^https?://[^\s]+$")
    assigned_to_email: str | None = None
    deployment: str | dict[str, Any] | None = None

    @field_validator("assigned_to_email")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not is_email_address(value.strip()):
            raise ValueError("not an email address")
        return value.strip().lower() if value else None

    def deployment_name(self) -> str:
        named = self.deployment
        if isinstance(named, dict):
            named = named.get("name") or named.get("id") or named.get("uuid")
        return _NAME.sub("-", str(named or "unknown"))[:100]

    def event_key(self) -> str:
        return self.event_id or f"{self.deployment_name()}/{self.request.id}"


def request_id_for(event_key: str, secret: str) -> str:
    """Our request id for one hosted event: the same event always maps to the same id."""
    digest = hmac.new(secret.encode(), _ID_SALT + event_key.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest[:ID_BYTES]).decode("ascii").rstrip("=").lower()


def _reply(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status)


class Bridge:
    """The bridge endpoint; `config` is swapped on reload."""

    def __init__(self, config: Config, store: Store, on_created: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.on_created = on_created

    def route(self, app: FastAPI) -> None:
        app.add_api_route(
            self.config.bridge.path,
            self.receive,
            methods=["POST"],
            tags=["bridge"],
            summary="crewAI hosted HITL: a signed new_request webhook",
            status_code=201,
            responses={
                401: {"description": "Missing, wrong or stale signature; nothing stored"},
                409: {"description": "This event was received before"},
                413: {"description": "Body too large"},
                422: {"description": "Not a new_request payload"},
            },
        )

    async def receive(self, request: Request) -> JSONResponse:
        settings = self.config.bridge
        try:
            body = await read_body(request, settings.max_body)
        except BodyTooLarge:
            return _reply(413, "body too large")
        signed = webhooks.verify_signature(
            settings.signing_secret or "",
            request.headers.get("x-timestamp"),
            body,
            request.headers.get("x-signature"),
            settings.max_skew,
        )
        if not signed:
            log.warning("bridge: a webhook with a missing, wrong or stale signature was refused")
            return _reply(401, "missing, wrong or stale signature")
        try:
            if not is_json(request):
                raise ValueError("Content-Type is not application/json")
            hook = HostedWebhook.model_validate_json(body)
        except (ValueError, ValidationError) as exc:
            return _reply(422, "not a new_request payload", errors=body_errors(exc))
        return await asyncio.to_thread(self._store, hook)

    def _store(self, hook: HostedWebhook) -> JSONResponse:
        request_id = request_id_for(hook.event_key(), self.config.daemon.secret_key)
        if self.store.find(request_id, with_state=False) is not None:
            return _reply(409, "this event was received before", id=request_id)
        try:
            stored = create_request(
                self.config,
                self.store,
                _context(hook),
                hook.request.state,
                request_id=request_id,
                assignee=hook.assigned_to_email,
            )
        except IntegrityError:  # the same event, stored by a concurrent delivery of it
            return _reply(409, "this event was received before", id=request_id)
        except RoutingError as exc:
            return _reply(422, f"nobody to ask: {exc}", id=request_id)
        self.on_created()
        log.info(
            "bridge: request %s stored for hosted request %s (%s)",
            stored.id,
            hook.request.id,
            hook.deployment_name(),
        )
        return JSONResponse(_stored(stored), 201)


def _context(hook: HostedWebhook) -> dict[str, Any]:
    hosted = hook.request
    return {
        "flow_id": hosted.flow_id or hosted.id,
        "flow_class": BRIDGED_PREFIX + hook.deployment_name(),
        "method_name": hosted.method_name,
        "message": hosted.message,
        "method_output": hosted.method_output,
        "emit": hosted.emit_options or None,
        "default_outcome": None,
        "llm": None,
        "metadata": hosted.metadata,
        "bridge": {
            "callback_url": hook.callback_url,
            "hosted_request_id": hosted.id,
            "event_id": hook.event_id,
            "deployment": hook.deployment,
        },
    }


def _stored(request: FeedbackRequest) -> dict[str, Any]:
    return {"id": request.id, "status": request.status, "assigned_to": request.assigned_to}
