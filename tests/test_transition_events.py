"""Every transition tells the configured webhooks, in its own transaction, with the request as it was.

Each event row holds its body already: `event_id` fixed once (every retry
sends the same), and the request as the transition left it, so `answered`
says answered and the `resumed` after it says resumed.
"""

from __future__ import annotations

import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from conftest import add_request, free_port, request_context, write_config

from hitl_mail import intake, transitions
from hitl_mail.actions import cancel_request
from hitl_mail.config import WebhookSettings, load_config
from hitl_mail.models import (
    AnswerSource,
    FeedbackRequest,
    HttpOutboxRow,
    RequestStatus,
    WebhookEvent,
)
from hitl_mail.outbound import queue_row
from hitl_mail.resume import ResumeResult, record_result
from hitl_mail.store import Store
from hitl_mail.timers import Timers

ASSIGNEE = "ann@example.org"
TOKEN = "t" * 48
EVERY = WebhookSettings(
    name="ops", url="http://127.0.0.1:9/all", secret="Xq7vR2mK9pL4tW8zB3nC6yH1dF5gJ0sA"
)
ANSWERS_ONLY = WebhookSettings(
    name="answers",
    url="http://127.0.0.1:9/answers",
    secret="uE4kP9rT2wQ7yM3vN8bZ5cX1hL6jG0dF",
    events=(WebhookEvent.ANSWERED,),
)
EVENTS = transitions.Events((EVERY, ANSWERS_ONLY))


def bodies(store: Store, request_id: str, destination: str = "ops") -> list[dict[str, Any]]:
    table: Any = HttpOutboxRow.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(table.c.body)
        .where(table.c.request_id == request_id, table.c.destination == destination)
        .order_by(table.c.id)
    )
    with store.engine.connect() as conn:
        return [json.loads(body) for (body,) in conn.execute(query)]


def mail(kind: str, request_id: str) -> Any:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "hitl@example.org", ASSIGNEE, kind
    message["Message-ID"] = f"<{kind}.{request_id}@example.org>"
    message.set_content("...")
    return queue_row(message, kind=kind, request_id=request_id, recipient=ASSIGNEE)


def answer_by_email(store: Store, request_id: str, events: transitions.Events | None) -> bool:
    answer = transitions.Answer("approved", "Approved, ship it", AnswerSource.EMAIL, ASSIGNEE)
    change = transitions.answered(
        request_id, answer, mail=mail("confirmation", request_id), events=events
    )
    return transitions.record(store, [change])[0]


def pending(
    store: Store, request_id: str = "r1", status: str = RequestStatus.PENDING, **values: Any
) -> None:
    add_request(
        store,
        request_id,
        status,
        assigned_to=ASSIGNEE,
        token=TOKEN,
        message="Approve the launch?",
        emit=["approved", "rejected"],
        request_metadata={"team": "web"},
        state={"draft": "v1"},
        **values,
    )


def test_an_answer_then_its_resume_are_told_in_order_each_with_the_request_as_it_then_was(
    store: Store,
) -> None:
    pending(store)

    assert answer_by_email(store, "r1", EVENTS)
    assert transitions.resumed(store, "r1", {"result": "done"}, EVENTS)

    answered, resumed = bodies(store, "r1")
    assert (answered["event"], resumed["event"]) == ("answered", "resumed")
    assert answered["request"]["status"] == "answered"
    assert resumed["request"]["status"] == "resumed"
    assert answered["request"] | {"status": "resumed"} == resumed["request"]
    assert answered["request"]["outcome"] == "approved"
    assert answered["request"]["feedback"] == "Approved, ship it"
    assert answered["request"]["source"] == "email"
    assert answered["request"]["answered_at"] is not None
    assert answered["request"]["emit_options"] == ["approved", "rejected"]
    assert answered["request"]["state"] == {"draft": "v1"}
    assert answered["request"]["metadata"] == {"team": "web"}
    assert answered["assigned_to_email"] == ASSIGNEE
    assert answered["event_id"] != resumed["event_id"]
    assert [b["event"] for b in bodies(store, "r1", "answers")] == ["answered"]


def test_a_change_that_loses_its_race_tells_nobody(store: Store) -> None:
    pending(store)
    assert transitions.cancelled(store, "r1", "cli", mail=None, events=EVENTS)

    assert not answer_by_email(store, "r1", EVENTS)

    assert [b["event"] for b in bodies(store, "r1")] == ["cancelled"]
    assert bodies(store, "r1", "answers") == []


def test_without_webhooks_no_event_is_written(store: Store) -> None:
    pending(store)
    assert answer_by_email(store, "r1", None)
    assert bodies(store, "r1") == []


def test_each_life_event_names_itself_as_the_spec_does(store: Store) -> None:
    pending(store, "late", auto_outcome="approved")
    pending(store, "reassigned")
    pending(store, "failing", status=RequestStatus.ANSWERED)

    def request(request_id: str) -> FeedbackRequest:
        return store.get(request_id)

    reminder = transitions.reminded(request("late"), mail=mail("reminder", "late"), events=EVENTS)
    auto = transitions.auto_answered(request("late"), mail=None, events=EVENTS)
    after = {"assigned_to": "bob@example.org", "token": "u" * 48, "notification_id": "<n@x>"}
    escalation = transitions.escalated(
        "reassigned", before=ASSIGNEE, after=after, mail=[], events=EVENTS
    )
    assert transitions.record(store, [reminder, auto, escalation]) == [True, True, True]
    assert transitions.resume_failed(
        store, "failing", attempt=1, retry_at=None, error="boom", events=EVENTS
    )

    assert [b["event"] for b in bodies(store, "late")] == ["reminder", "auto_answered"]
    assert bodies(store, "late")[1]["request"]["source"] == "auto"
    [escalated] = bodies(store, "reassigned")
    assert (escalated["event"], escalated["assigned_to_email"]) == ("escalated", "bob@example.org")
    [failed] = bodies(store, "failing")
    assert (failed["event"], failed["request"]["status"]) == ("resume_failed", "resume_failed")


def test_a_refusal_event_gives_its_reason_and_never_the_token(store: Store) -> None:
    pending(store)
    forged_from = f"reply+{TOKEN}@reply.example.com"
    refusal = transitions.Refusal(
        transitions.RefusalKind.WRONG_SENDER, f"From {forged_from} is not {ASSIGNEE}"
    )

    transitions.refused(
        store,
        refusal,
        request_id="r1",
        actor=forged_from,
        source="email",
        detail={"why": refusal.reason},
        events=EVENTS,
    )

    [refused] = bodies(store, "r1")
    assert refused["event"] == "refused"
    assert refused["reason"] == "wrong_sender"
    assert refused["request"]["status"] == "pending"
    assert TOKEN not in json.dumps(refused)
    assert TOKEN[:6] in refused["detail"]  # shown as its first characters only (SPEC 9)


def test_every_stage_passes_the_configured_webhooks_to_its_transitions(
    tmp_path: Path, database_url: str
) -> None:
    extra = """
[auto_response]
enabled = true
timeout = "1h"
reminders = [0.5]
default_outcome = "rejected"

[[webhooks]]
name = "ops"
url = "http://127.0.0.1:9/hook"
secret = "Rb8Lm2Qx7Vk4Zp9Tn3Wc6Jh1Ys5Df0Ga"
"""
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=free_port(),
        llm_url="http://127.0.0.1:9/v1",
        extra=extra,
    )
    config = load_config(path)
    store = Store(database_url)
    store.migrate()
    try:
        late = intake.create_request(config, store, request_context(), {})
        cancelled = intake.create_request(config, store, request_context(), {})
        timers = Timers(config, store, on_fired=lambda kind: None)
        for kind in ("reminder", "auto"):  # the timer stage, as if each were due
            [timer] = [t for t in store.timers_of(late.id) if t.kind == kind]
            assert timers.fire(timer)
        record_result(store, late.id, 0, ResumeResult(ok=True), transitions.events_of(config))
        assert cancel_request(config, store, cancelled.id, actor="cli")

        told = [b["event"] for b in bodies(store, late.id)]
        assert told == ["new_request", "reminder", "auto_answered", "resumed"]
        assert [b["event"] for b in bodies(store, cancelled.id)] == ["new_request", "cancelled"]
    finally:
        store.close()
