"""Timeouts that act: auto-responses, reminders, escalation, exactly once across restarts and daemons."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import sqlalchemy as sa
from conftest import (
    BACKEND,
    MailSink,
    Setup,
    free_port,
    reply_to,
    request_context,
    send,
    until,
    wait_until,
    write_config,
)
from llm_server import FakeLLMServer

from hitl_mail import intake
from hitl_mail.answering import Answering
from hitl_mail.app import App
from hitl_mail.config import Config, load_config
from hitl_mail.models import InboundMessage, RequestStatus, Timer, utcnow
from hitl_mail.store import Store
from hitl_mail.timers import Timers

CONTEXT = request_context(
    flow_id="flow-1", flow_class="nowhere.Flow", emit=["approved", "rejected"], llm=None
)  # never resumed here: these tests stop at the answer


def _config(
    tmp_path: Path, database_url: str, sink: MailSink, llm: FakeLLMServer, extra: str
) -> Config:
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=sink.port,
        llm_url=llm.url,
        extra=extra,
    )
    return load_config(path)


_open_stores: list[Store] = []


def _store(config: Config) -> Store:
    store = Store(config.daemon.database_url)
    store.migrate()
    _open_stores.append(store)
    return store


@pytest.fixture(autouse=True)
def _close_stores() -> Any:
    yield
    while _open_stores:
        _open_stores.pop().close()


def _events(store: Store, request_id: str) -> list[str]:
    return [e.event for e in store.trail(request_id)]


def _reply_bytes(notification: Any, text: str, sender: str | None = None) -> Any:
    return reply_to(notification, text, sender=sender)


@pytest.mark.slow
def test_an_unanswered_request_is_auto_answered_at_its_deadline_and_a_later_reply_hears_so(
    setup: Setup,
) -> None:
    setup.config.write_text(
        setup.config.read_text()
        + '\n[auto_response]\nenabled = true\ntimeout = "2s"\ndefault_outcome = "rejected"\n'
    )
    setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    rid = info["request_id"]
    assert info["deadline"] is not None
    [notification] = setup.sink.wait_for("notification", rid)

    [rejected] = setup.wait_event("rejected")
    assert rejected["feedback"] == ""
    [auto] = setup.sink.wait_for("auto-response", rid)
    assert auto["To"] == "owner@example.com"
    assert auto["In-Reply-To"] == notification["Message-ID"]
    shown = setup.show(rid)
    assert (shown["source"], shown["outcome"]) == ("auto", "rejected")
    assert shown["deadline"] is not None
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="resumed")

    send(setup.smtp_port, reply_to(notification, "approved"))
    [error] = setup.sink.wait_for("error", rid)
    assert error["X-HITL-Error"] == "already_answered"
    assert setup.show(rid)["outcome"] == "rejected"
    assert [e["event"] for e in setup.events()].count("approved") == 0


async def test_reminders_arrive_at_their_fractions_and_escalation_moves_the_request(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    config = _config(
        tmp_path,
        database_url,
        mail_sink,
        llm,
        '[auto_response]\nreminders = ["25%", "50%"]\nescalate_after = "4s"\nescalate_to = "boss@example.com"\n',
    )
    store = _store(config)
    async with App(config) as app:
        request = await asyncio.to_thread(intake.create_request, config, store, dict(CONTEXT), {})
        created = time.monotonic()
        [first] = await until(lambda: mail_sink.of("notification", request.id), what="notification")
        reminders = []
        for count in (1, 2):
            await until(
                lambda n=count: len(mail_sink.of("reminder", request.id)) >= n,
                what=f"reminder {count}",
            )
            reminders.append(time.monotonic() - created)
        assert 0.5 <= reminders[0] <= 2.5, reminders  # 25% of 4 s
        assert 1.5 <= reminders[1] <= 3.5, reminders  # 50% of 4 s
        assert all(m["To"] == "owner@example.com" for m in mail_sink.of("reminder", request.id))
        assert all(
            m["Subject"] == "Reminder: " + first["Subject"]
            for m in mail_sink.of("reminder", request.id)
        )

        second = (
            await until(
                lambda: (
                    len(mail_sink.of("notification", request.id)) == 2
                    and mail_sink.of("notification", request.id)
                ),
                what="escalation",
            )
        )[1]
        assert second["To"] == "boss@example.com"
        assert second["Reply-To"] != first["Reply-To"]
        [told] = await until(lambda: mail_sink.of("error", request.id), what="old assignee told")
        assert (told["To"], told["X-HITL-Error"]) == ("owner@example.com", "reassigned")
        # The new assignee hears from whom and why; the old one is not told of a reply.
        assert second["Subject"] == "Reassigned to you: " + first["Subject"]
        said = " ".join(_text(second).split())
        assert "Reassigned to you: owner@example.com did not answer within 4 seconds." in said
        told_text = " ".join(_text(told).split())
        assert "now waits for boss@example.com" in told_text
        assert "your reply" not in told_text.lower()

        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await aiosmtplib.send(
                _reply_bytes(first, "approved"), hostname="127.0.0.1", port=app.smtp_port
            )
        assert refused.value.recipients[0].code == 550

        await aiosmtplib.send(
            _reply_bytes(second, "approved"), hostname="127.0.0.1", port=app.smtp_port
        )
        await until(lambda: store.get(request.id).status != RequestStatus.PENDING, what="answered")
        answered = store.get(request.id)
        assert (answered.outcome, answered.answered_by) == ("approved", "boss@example.com")
        assert "escalated" in _events(store, request.id)


async def test_a_deadline_that_passed_while_the_daemon_was_down_fires_once_at_start(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    config = _config(
        tmp_path,
        database_url,
        mail_sink,
        llm,
        '[auto_response]\nenabled = true\ntimeout = "1s"\ndefault_outcome = "rejected"\n',
    )
    store = _store(config)
    request = intake.create_request(config, store, dict(CONTEXT), {})
    await asyncio.sleep(1.5)  # the deadline passes with no daemon running
    started = time.monotonic()
    async with App(config):
        await until(
            lambda: store.get(request.id).status != RequestStatus.PENDING, what="auto-answered"
        )
        elapsed = time.monotonic() - started
        await until(lambda: mail_sink.of("auto-response", request.id), what="auto-response email")
    assert elapsed < 5.0
    async with App(config):  # and a second start does not fire it again
        await asyncio.sleep(1.0)
    assert _events(store, request.id).count("answered") == 1
    assert len(mail_sink.of("auto-response", request.id)) == 1
    assert store.get(request.id).source == "auto"


def test_a_reply_racing_the_deadline_yields_exactly_one_answer_every_time(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    config = _config(
        tmp_path,
        database_url,
        mail_sink,
        llm,
        '[auto_response]\nenabled = true\ntimeout = "1h"\ndefault_outcome = "rejected"\n',
    )
    store = _store(config)
    timers = Timers(config, store, on_fired=lambda kind: None)
    answering = Answering(config, store, on_processed=lambda: None)
    winners: Counter[str] = Counter()
    for _ in range(25):
        request = intake.create_request(config, store, dict(CONTEXT), {})
        [timer] = [t for t in store.timers_of(request.id) if t.kind == "auto"]
        notification = intake.notification_row(config, store.get(request.id))
        inbound = _store_reply(store, config, request.id, notification.raw)
        barrier = threading.Barrier(2)

        def fire(timer: Timer = timer, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            timers.fire(timer)

        def reply(inbound: InboundMessage = inbound, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            asyncio.run(answering.process(inbound))

        threads = [threading.Thread(target=fire), threading.Thread(target=reply)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        answered = store.get(request.id)
        assert answered.status == RequestStatus.ANSWERED
        assert _events(store, request.id).count("answered") == 1
        winners[answered.source or ""] += 1
    answering.parsers.close()
    assert sum(winners.values()) == 25


def _store_reply(
    store: Store, config: Config, request_id: str, notification_raw: bytes
) -> InboundMessage:
    from email import message_from_bytes, policy

    notification = message_from_bytes(notification_raw, policy=policy.default)
    reply = reply_to(notification, "approved")  # type: ignore[arg-type]
    recipient = str(notification["Reply-To"])
    assert store.store_inbound(
        f"mid:{reply['Message-ID']}", "owner@example.com", [recipient], reply.as_bytes()
    )
    [row] = store.claim_inbound(10, config.tokens.max_age)
    assert row.recipients == [recipient]
    return row


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    BACKEND != "postgres", reason="two daemons sharing one database is a PostgreSQL deployment"
)
def test_two_daemons_on_one_postgresql_database_answer_and_resume_200_due_requests_once(
    setup: Setup,
) -> None:
    setup.config.write_text(
        setup.config.read_text()
        + '\n[auto_response]\nenabled = true\ntimeout = "1h"\ndefault_outcome = "rejected"\n'
    )
    paused = setup.kickoff_many(200)
    ids = [p["callback_info"]["request_id"] for p in paused]
    assert len(set(ids)) == 200
    setup.start_daemon()
    setup.start_daemon()
    setup.sink.wait_for("notification", count=200, timeout=120)
    # Every deadline falls at the same moment, with both daemons watching.
    store = Store(load_config(setup.config).daemon.database_url)
    with store.session() as session:
        session.execute(sa.update(Timer).values(due_at=utcnow() + timedelta(seconds=2)))
        session.commit()
    store.close()
    wait_until(
        lambda: len([e for e in setup.events() if e["event"] == "rejected"]) >= 200,
        240,
        interval=0.5,
        what="200 resumes",
    )
    time.sleep(2.0)
    rejected = [e for e in setup.events() if e["event"] == "rejected"]
    assert len(rejected) == 200
    assert len({e["flow_id"] for e in rejected}) == 200
    assert len({e["pid"] for e in rejected}) > 1  # resumed by more than one worker
    listing = json.loads(setup.cli("requests", "list", "--json").stdout)
    assert Counter(r["status"] for r in listing if r["id"] in ids) == {"resumed": 200}
    assert Counter(r["source"] for r in listing if r["id"] in ids) == {"auto": 200}
    for request_id in ids[::20]:
        audit = [e["event"] for e in setup.show(request_id)["audit"]]
        assert audit.count("answered") == 1
        assert audit.count("resumed") == 1
    assert len(setup.sink.of("auto-response")) == 200


def test_a_bad_default_outcome_is_reported_at_creation_and_by_check_config(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    import subprocess
    import sys

    extra = '[auto_response]\nenabled = true\ntimeout = "1h"\ndefault_outcome = "maybe"\n'
    config = _config(tmp_path, database_url, mail_sink, llm, extra)
    store = _store(config)
    request = intake.create_request(config, store, dict(CONTEXT), {})
    stored = store.get(request.id)
    assert stored.status == RequestStatus.PENDING
    assert stored.deadline is None  # nothing will fire with an outcome the flow cannot take
    assert "'maybe' is not one of this request's emit" in (stored.last_error or "")
    assert "config_error" in _events(store, request.id)

    cli = [sys.executable, "-m", "hitl_mail.cli"]
    shown = subprocess.run(
        [*cli, "requests", "show", request.id, "--json", "--config", str(config.source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "'maybe' is not one of" in json.loads(shown.stdout)["error"]
    checked = subprocess.run(
        [*cli, "check-config", "--config", str(config.source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 2
    assert (
        f"auto_response.default_outcome: 'maybe' would apply to pending request {request.id}"
        in checked.stderr
    )


async def test_a_cancelled_request_tells_the_assignee_and_its_link_stops_working(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    import subprocess
    import sys

    config = _config(
        tmp_path,
        database_url,
        mail_sink,
        llm,
        '[auto_response]\nenabled = true\ntimeout = "1h"\ndefault_outcome = "rejected"\n',
    )
    store = _store(config)
    async with App(config) as app:
        request = await asyncio.to_thread(intake.create_request, config, store, dict(CONTEXT), {})
        [notification] = await until(
            lambda: mail_sink.of("notification", request.id), what="notification"
        )
        cancel = [
            sys.executable,
            "-m",
            "hitl_mail.cli",
            "requests",
            "cancel",
            request.id,
            "--config",
            str(config.source),
        ]
        done = await asyncio.to_thread(
            subprocess.run, cancel, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        [told] = await until(lambda: mail_sink.of("error", request.id), what="assignee told")
        assert (told["To"], told["X-HITL-Error"]) == ("owner@example.com", "cancelled")

        await aiosmtplib.send(
            _reply_bytes(notification, "approved"), hostname="127.0.0.1", port=app.smtp_port
        )
        await until(lambda: "reply_cancelled" in _events(store, request.id), what="reply refused")
        cancelled = store.get(request.id)
        assert (cancelled.status, cancelled.outcome) == (RequestStatus.CANCELLED, None)
        assert all(
            t.fired_at is not None for t in store.timers_of(request.id)
        )  # no auto-response later
        again = await asyncio.to_thread(
            subprocess.run, cancel, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 1
    assert "cancelled" in _events(store, request.id)


def test_the_rules_sla_target_is_recorded_beside_the_time_to_answer(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer
) -> None:
    from hitl_mail.views import as_json

    extra = '[[routing.rules]]\nname = "Reviews"\nmatch = { method_name = "rev*" }\nassign_to_email = "team@example.com"\nsla = "4h"\n'
    config = _config(tmp_path, database_url, mail_sink, llm, extra)
    store = _store(config)
    request = intake.create_request(config, store, dict(CONTEXT), {})
    assert as_json(store.get(request.id))["sla_seconds"] == 4 * 3600
    assert as_json(store.get(request.id))["sla_met"] is None
    store.transition(
        request.id,
        [RequestStatus.PENDING],
        {"status": RequestStatus.ANSWERED, "answered_at": utcnow(), "source": "api"},
    )
    shown = as_json(store.get(request.id))
    assert 0 <= shown["response_seconds"] < 60
    assert shown["sla_met"] is True


def _text(message: Any) -> str:
    return str(message.get_body(("plain",)).get_content())
