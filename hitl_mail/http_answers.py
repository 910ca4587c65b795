"""Answer a request from its callback URL: the HTTP twin of answering.py's reply path.

`POST /api/requests/{id}/callback?token=…` with `{"feedback", "source"}` is
checked and decided exactly like an emailed reply, then recorded by the same
`transitions.answered` (source `api`; the caller's `source` string goes into
the audit detail): the same exactly-once claim, confirmation email to the
assignee, webhook events and resume. Checks in order, each its own answer:

- the token: not ours 401, another request's 403, expired 410 (nothing recorded);
- the request: cancelled 410, no longer pending 409 (a repeated POST too);
- the body: JSON `{"feedback": str, "source": str}`, bounded, else 422;
- the outcome (outcomes.py: exact, then LLM, then default): when it cannot be
  decided the request stays pending, the refusal is in its audit trail, and
  the caller gets 503 if the LLM failed (try again, or send an option) or
  422 for an empty answer to a request without a default outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hitl_mail import callbacks, compose, transitions
from hitl_mail.answering import decide_feedback
from hitl_mail.config import Config
from hitl_mail.intake import content_of, sender
from hitl_mail.metrics import Metrics
from hitl_mail.models import AnswerSource, FeedbackRequest, RequestStatus, utcnow
from hitl_mail.outbound import queue_row
from hitl_mail.outcomes import Decision
from hitl_mail.store import Store
from hitl_mail.web import body_errors

log = logging.getLogger(__name__)

ACTOR = "api"
TEXT_KEPT = 20_000  # characters of the feedback kept in the audit trail
MAX_FEEDBACK = 100_000
BODY_SHAPE = 'the body must be JSON: {"feedback": "...", "source": "..."}'


class CallbackBody(BaseModel):
    """What a caller POSTs to a callback URL (crewAI's hosted callback shape)."""

    model_config = ConfigDict(extra="ignore")

    feedback: str = Field(max_length=MAX_FEEDBACK, description="The answer, as a person wrote it.")
    source: str = Field(
        default="api",
        min_length=1,
        max_length=100,
        description="Who is answering (a UI, a bot); kept in the audit trail.",
    )


class CallbackAnswer(BaseModel):
    """The answer as recorded."""

    id: str
    status: str
    outcome: str | None
    feedback: str | None
    source: str | None


@dataclass(frozen=True)
class Reply:
    """What to send back: an HTTP status and a JSON body."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


def _error(code: int, detail: str, **extra: Any) -> Reply:
    return Reply(code, {"detail": detail, **extra})


class CallbackAnswering:
    """Answers arriving at callback URLs, recorded as the email path records replies."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        on_answered: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.on_answered = on_answered

    async def answer(self, request_id: str, token: str, body: bytes | None) -> Reply:
        """Check, decide and record one answer; `body` None: it was not declared JSON."""
        try:
            callbacks.CallbackTokens.of(self.config).verify(token, request_id)
        except callbacks.BadCallbackToken:
            return _error(401, "not a valid callback token")
        except callbacks.OtherRequestToken:
            return _error(403, "this callback token is for another request")
        except callbacks.ExpiredCallbackToken:
            return _error(410, "this callback URL has expired")
        request = await asyncio.to_thread(self.store.find, request_id, with_state=False)
        if request is None:
            return _error(404, "no such request")
        closed = _closed(request)
        if closed is not None:
            return closed
        try:
            if body is None:
                raise ValueError("Content-Type is not application/json")
            given = CallbackBody.model_validate(json.loads(body))
        except (ValueError, ValidationError) as exc:
            return _error(422, BODY_SHAPE, errors=body_errors(exc))
        return await self._decide_and_record(request, given)

    async def _decide_and_record(self, request: FeedbackRequest, given: CallbackBody) -> Reply:
        feedback = _first_line(given.feedback)
        decision = await decide_feedback(self.config, self.metrics, request, feedback)
        if decision.method == "undecided":
            return await asyncio.to_thread(self._undecided, request, given, decision)
        won = await asyncio.to_thread(self._record, request, given, feedback, decision)
        if not won:
            latest = await asyncio.to_thread(self.store.find, request.id, with_state=False)
            return _closed(latest) or _error(409, "already answered")
        self.metrics.answered((utcnow() - request.created_at).total_seconds())
        self.on_answered()
        log.info("request %s answered over HTTP (%s)", request.id, decision.method)
        outcome = decision.outcome if request.emit else None
        answer = CallbackAnswer(
            id=request.id,
            status=RequestStatus.ANSWERED,
            outcome=outcome,
            feedback=feedback,
            source=AnswerSource.API,
        )
        return Reply(200, answer.model_dump())

    def _record(
        self, request: FeedbackRequest, given: CallbackBody, feedback: str, decision: Decision
    ) -> bool:
        outcome = decision.outcome if request.emit else None
        to = request.assigned_to or ""
        mail = None
        if to:
            confirmation = compose.confirmation(
                content_of(request, self.config),
                sender=sender(self.config),
                to=to,
                thread_id=request.notification_id or "",
                outcome=outcome,
                feedback=feedback,
                read_as=decision.method,
            )
            mail = queue_row(confirmation, kind="confirmation", request_id=request.id, recipient=to)
        detail = {
            "outcome": outcome,
            "method": decision.method,
            "decision": decision.detail,
            "llm_calls": decision.llm_calls,
            "source": given.source,
            "text": given.feedback[:TEXT_KEPT],
        }
        answer = transitions.Answer(outcome, feedback, AnswerSource.API, ACTOR, detail)
        change = transitions.answered(
            request.id, answer, mail=mail, events=transitions.events_of(self.config)
        )
        return transitions.record(self.store, [change])[0]

    def _undecided(
        self, request: FeedbackRequest, given: CallbackBody, decision: Decision
    ) -> Reply:
        refusal = transitions.Refusal(transitions.RefusalKind.UNDECIDED, decision.detail)
        detail = {
            "why": decision.detail,
            "llm_calls": decision.llm_calls,
            "source": given.source,
            "text": given.feedback[:TEXT_KEPT],
        }
        transitions.refused(
            self.store,
            refusal,
            request_id=request.id,
            actor=ACTOR,
            source=AnswerSource.API,
            detail=detail,
            events=transitions.events_of(self.config),
        )
        options = list(request.emit or [])
        if decision.llm_calls:
            return Reply(
                503,
                {
                    "detail": "the answer could not be matched to an outcome now "
                    f"({decision.detail}); the request is still pending: try again, "
                    "or send one of the options",
                    "options": options,
                },
                {"Retry-After": "60"},
            )
        return _error(
            422,
            "an empty answer needs a default outcome, and this request has none; "
            "send one of the options",
            options=options,
        )


def _closed(request: FeedbackRequest | None) -> Reply | None:
    """The answer for a request that can no longer be answered; None while it is pending."""
    if request is None:
        return _error(404, "no such request")
    if request.status == RequestStatus.PENDING:
        return None
    if request.status == RequestStatus.CANCELLED:
        return _error(410, "this request was cancelled")
    if request.status == RequestStatus.UNROUTABLE:
        return _error(410, "this request was never assigned")
    return _error(
        409,
        "already answered",
        status=request.status,
        outcome=request.outcome,
        source=request.source,
    )


def _first_line(text: str) -> str:
    """The first non-empty line, as the email path takes it from a reply."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
