"""Webhooks (SPEC 8): signed events from the durable HTTP outbox, retried, in order, isolated.

Real HTTP servers on loopback receive; the daemon's stages run in process,
except in the end-to-end test, where a real crewAI flow pauses against a
daemon started as `hitl-mail serve`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SECRET,
    MailSink,
    ResumeParked,
    Setup,
    free_port,
    request_context,
    until,
    wait_until,
    write_config,
)
from http_receiver import HANG, Receiver, reserved_port
from llm_server import FakeLLMServer

from hitl_mail import app as app_module
from hitl_mail import cli, intake, webhooks
from hitl_mail.app import App
from hitl_mail.config import Config, ConfigError, WebhookSettings, config_from_dict, load_config
from hitl_mail.httpqueue import HttpQueue
from hitl_mail.models import FeedbackRequest, WebhookEvent, utcnow
from hitl_mail.store import Store

HOOK_SECRET = "whsec-0123456789abcdef-test-hook-Qx7"
SECRET_ENV = "HITL_TEST_WEBHOOK_SECRET"
FAST_RETRIES = 'retry_initial = "200ms"\nretry_max = "400ms"\n'


def hook_toml(name: str, url: str, extra: str = "") -> str:
    return f'\n[[webhooks]]\nname = "{name}"\nurl = "{url}"\nsecret = "env:{SECRET_ENV}"\n{extra}\n'


@pytest.fixture(autouse=True)
def hook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, HOOK_SECRET)


@pytest.fixture
def no_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


class Daemon:
    """A configuration with the given webhooks, for an in-process `App`."""

    def __init__(self, tmp: Path, database_url: str, relay_port: int, llm_url: str) -> None:
        self.tmp, self.database_url, self.relay_port, self.llm_url = (
            tmp,
            database_url,
            relay_port,
            llm_url,
        )

    def config(self, hooks: str) -> Config:
        path = write_config(
            self.tmp / "hitl-mail.toml",
            database_url=self.database_url,
            smtp_port=free_port(),
            relay_port=self.relay_port,
            llm_url=self.llm_url,
            extra=hooks,
        )
        return load_config(path)


@pytest.fixture
def daemon(
    tmp_path: Path, database_url: str, mail_sink: MailSink, llm: FakeLLMServer, no_resume: None
) -> Daemon:
    return Daemon(tmp_path, database_url, mail_sink.port, llm.url)


def create(config: Config, store: Store, **context: Any) -> FeedbackRequest:
    return intake.create_request(config, store, request_context(**context), state={"topic": "Q3"})


def attempts(store: Store, request_id: str) -> list[dict[str, Any]]:
    return [e.detail for e in store.trail(request_id) if e.event == "webhook_attempt"]


def signed_correctly(received: Any, secret: str = HOOK_SECRET) -> bool:
    """The receiver's check, written from SPEC 8's formula rather than with our helper."""
    timestamp = received.headers["X-Timestamp"]
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + received.body, hashlib.sha256
    ).hexdigest()
    return bool(received.headers["X-Signature"] == f"sha256={expected}")


# -- the signature ------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_a_signature_made_by_the_formula_verifies() -> None:
    body = b'{"event":"new_request"}'
    now = time.time()
    timestamp = str(int(now))
    by_hand = hmac.new(b"s3cret-s3cret-16", f"{timestamp}.".encode() + body, hashlib.sha256)
    assert (
        webhooks.signature("s3cret-s3cret-16", timestamp, body) == f"sha256={by_hand.hexdigest()}"
    )
    headers = webhooks.signed_headers("s3cret-s3cret-16", body, now)
    assert headers["X-Timestamp"] == timestamp
    assert webhooks.verify_signature(
        "s3cret-s3cret-16", timestamp, body, headers["X-Signature"], timedelta(minutes=5)
    )


@pytest.mark.sqlite_only
def test_a_tampered_body_a_stale_timestamp_or_another_secret_fails_verification() -> None:
    body = b'{"event":"answered","request":{"outcome":"approved"}}'
    now = time.time()
    fresh = str(int(now))
    good = webhooks.signature(HOOK_SECRET, fresh, body)
    skew = timedelta(minutes=5)
    assert webhooks.verify_signature(HOOK_SECRET, fresh, body, good, skew, now=now)

    tampered = body.replace(b"approved", b"rejected")
    assert not webhooks.verify_signature(HOOK_SECRET, fresh, tampered, good, skew, now=now)
    stale = str(int(now) - 301)
    stale_sig = webhooks.signature(HOOK_SECRET, stale, body)
    assert not webhooks.verify_signature(HOOK_SECRET, stale, body, stale_sig, skew, now=now)
    future = str(int(now) + 301)
    future_sig = webhooks.signature(HOOK_SECRET, future, body)
    assert not webhooks.verify_signature(HOOK_SECRET, future, body, future_sig, skew, now=now)
    # The signature covers the timestamp: a fresh timestamp on an old signature fails.
    assert not webhooks.verify_signature(HOOK_SECRET, fresh, body, stale_sig, skew, now=now)
    other = webhooks.signature("another-secret-0123456789", fresh, body)
    assert not webhooks.verify_signature(HOOK_SECRET, fresh, body, other, skew, now=now)
    for broken in (None, "", "sha256=", good.removeprefix("sha256="), good[:-1]):
        assert not webhooks.verify_signature(HOOK_SECRET, fresh, body, broken, skew, now=now)
    for timestamp in (None, "", "12.5", "-1", "１２３", "9" * 40):
        assert not webhooks.verify_signature(HOOK_SECRET, timestamp, body, good, skew, now=now)


# -- configuration and rows ------------------------------------------------------------------


def _config_with(hooks: list[dict[str, Any]]) -> Config:
    return config_from_dict(
        {
            "daemon": {"secret_key": SECRET},
            "inbound": {"reply_domain": "reply.example.com"},
            "outbound": {"from_address": "reviews@example.com"},
            "webhooks": hooks,
        }
    )


@pytest.mark.sqlite_only
def test_webhook_settings_default_to_every_event_a_ten_second_timeout_and_an_hour_of_retries() -> (
    None
):
    [hook] = _config_with(
        [{"name": "ops", "url": "https://hooks.example.com/x", "secret": "env:" + SECRET_ENV}]
    ).webhooks
    assert hook.secret == HOOK_SECRET
    assert hook.events is None
    assert all(hook.wants(event) for event in WebhookEvent)
    assert hook.timeout == timedelta(seconds=10)
    assert hook.retry_initial <= timedelta(seconds=10)
    assert hook.retry_for >= timedelta(hours=1)


@pytest.mark.sqlite_only
def test_unknown_event_names_and_bad_webhooks_are_refused_with_their_key_paths() -> None:
    good = {"name": "ops", "url": "https://hooks.example.com/x", "secret": HOOK_SECRET}
    with pytest.raises(ConfigError) as caught:
        _config_with(
            [
                {**good, "events": ["new_request", "answerd"]},
                {**good, "name": "chat", "url": "ftp://example.com/", "secret": "short"},
                {**good, "name": "ops", "retry_initial": "1m", "colour": "red"},
            ]
        )
    problems = caught.value.problems
    expected = {
        "webhooks[0].events[1]": "'answerd' is not a webhook event",
        "webhooks[1].url": "not an http:// or https:// URL",
        "webhooks[1].secret": "use at least 32 random ones",
        "webhooks[2].retry_initial": "10 seconds",
        "webhooks[2].colour": "unknown key",
    }
    for where, what in expected.items():
        assert any(p.startswith(f"{where}:") and what in p for p in problems), (where, problems)

    with pytest.raises(ConfigError) as twice:
        _config_with([good, good])
    assert twice.value.problems == [
        "webhooks: the name 'ops' is used twice; webhook names must be unique"
    ]

    missing = {"name": "ops", "url": "https://hooks.example.com/x", "secret": "env:NO_SUCH_VAR_X"}
    with pytest.raises(ConfigError) as unset:
        _config_with([missing])
    assert unset.value.problems == [
        "webhooks[0].secret: environment variable NO_SUCH_VAR_X is not set"
    ]


@pytest.mark.sqlite_only
def test_an_event_is_one_row_per_interested_webhook_with_the_same_body_and_event_id() -> None:
    hooks = [
        WebhookSettings(name="all", url="http://a.example/", secret=HOOK_SECRET),
        WebhookSettings(
            name="some", url="http://b.example/", secret=HOOK_SECRET, events=["answered"]
        ),
        WebhookSettings(
            name="new", url="http://c.example/", secret=HOOK_SECRET, events=["new_request"]
        ),
    ]
    request = FeedbackRequest(
        id="r1",
        status="pending",
        flow_id="f1",
        flow_class="m.F",
        method_name="review",
        created_at=utcnow(),
    )
    rows = webhooks.event_rows(hooks, webhooks.event_payload(WebhookEvent.NEW_REQUEST, request))
    assert [row.destination for row in rows] == ["all", "new"]
    assert rows[0].body == rows[1].body
    assert rows[0].event_id == rows[1].event_id == json.loads(rows[0].body)["event_id"]
    assert {row.request_id for row in rows} == {"r1"}
    assert webhooks.event_rows(hooks[2:], webhooks.event_payload("answered", request)) == []


# -- delivery ------------------------------------------------------------------------------


async def test_a_new_request_reaches_the_webhook_signed_with_the_spec_payload(
    daemon: Daemon, receiver: Receiver, mail_sink: MailSink
) -> None:
    config = daemon.config(hook_toml("ops", receiver.url))
    async with App(config) as app:
        request = create(config, app.store)
        [got] = await until(lambda: receiver.received, "the new_request POST")
        await until(lambda: attempts(app.store, request.id), "the attempt recorded")
        [attempt] = attempts(app.store, request.id)

    assert got.headers["Content-Type"] == "application/json"
    assert signed_correctly(got)
    assert abs(int(got.headers["X-Timestamp"]) - time.time()) < 60
    body = got.json()
    assert body["event"] == "new_request" == got.headers["X-HITL-Event"]
    assert body["event_id"] == got.headers["X-HITL-Event-Id"]
    assert body["assigned_to_email"] == "owner@example.com"
    assert "callback_url" in body
    assert body["request"] == {
        "id": request.id,
        "flow_id": "f1",
        "method_name": "review",
        "message": "Approve?",
        "emit_options": ["approved", "rejected", "needs_revision"],
        "state": {"topic": "Q3"},
        "metadata": {},
        "created_at": request.created_at.isoformat(),
        "status": "pending",
        "outcome": None,
        "feedback": None,
        "source": None,
        "answered_at": None,
    }
    assert request.token not in got.body.decode()
    assert attempt == {
        "to": "ops",
        "event": "new_request",
        "event_id": body["event_id"],
        "attempt": 1,
        "status_code": 200,
        "result": "delivered",
    }
    assert HOOK_SECRET not in json.dumps(attempt)


async def test_a_receiver_down_at_first_gets_the_event_once_when_up_and_every_attempt_is_recorded(
    daemon: Daemon,
) -> None:
    late = Receiver(port=reserved_port())
    config = daemon.config(hook_toml("ops", late.url, FAST_RETRIES))
    try:
        async with App(config) as app:
            request = create(config, app.store)
            await until(lambda: len(attempts(app.store, request.id)) >= 2, "two failed attempts")
            late.start()
            await until(
                lambda: any(a["result"] == "delivered" for a in attempts(app.store, request.id)),
                "the delivery",
            )
            await asyncio.sleep(1.0)  # past the longest backoff: a repeat would have come
            trail = attempts(app.store, request.id)
            [row] = HttpQueue(app.store).rows_for(request.id)
            counted = {
                result: app.metrics.registry.get_sample_value(
                    "hitl_webhook_attempts_total", {"destination": "ops", "result": result}
                )
                for result in ("delivered", "retry")
            }
    finally:
        late.stop()

    assert len(late.received) == 1
    assert signed_correctly(late.received[0])
    assert [a["attempt"] for a in trail] == list(range(1, len(trail) + 1))
    assert [a["result"] for a in trail] == ["retry"] * (len(trail) - 1) + ["delivered"]
    assert all(a["error"] and a["status_code"] is None for a in trail[:-1])
    assert all("next_attempt_at" in a for a in trail[:-1])
    assert len({a["event_id"] for a in trail}) == 1
    assert (row.status, row.attempts, row.last_status) == ("delivered", len(trail), 200)
    assert counted == {"delivered": 1, "retry": len(trail) - 1}


async def test_a_4xx_answer_is_final_and_recorded_without_a_retry(daemon: Daemon) -> None:
    refusing = Receiver(answers=[410] * 5).start()
    config = daemon.config(hook_toml("ops", refusing.url, FAST_RETRIES))
    try:
        async with App(config) as app:
            request = create(config, app.store)
            await until(lambda: attempts(app.store, request.id), "the attempt")
            await asyncio.sleep(1.0)  # past the longest backoff: a retry would have come
            trail = attempts(app.store, request.id)
            [row] = HttpQueue(app.store).rows_for(request.id)
    finally:
        refusing.stop()

    assert len(refusing.received) == 1
    [attempt] = trail
    assert (attempt["status_code"], attempt["result"]) == (410, "failed")
    assert (row.status, row.attempts, row.last_status) == ("failed", 1, 410)
    assert row.last_error is not None
    assert row.last_error.startswith("HTTP 410")


async def test_a_5xx_answer_is_retried_until_retry_for_has_passed_then_failed(
    daemon: Daemon,
) -> None:
    failing = Receiver(answers=[503] * 100).start()
    config = daemon.config(hook_toml("ops", failing.url, FAST_RETRIES + 'retry_for = "1s"\n'))
    try:
        async with App(config) as app:
            request = create(config, app.store)
            await until(
                lambda: any(a["result"] == "failed" for a in attempts(app.store, request.id)),
                "giving up",
            )
            trail = attempts(app.store, request.id)
            [row] = HttpQueue(app.store).rows_for(request.id)
    finally:
        failing.stop()

    assert len(trail) >= 3
    assert [a["result"] for a in trail] == ["retry"] * (len(trail) - 1) + ["failed"]
    assert all(a["status_code"] == 503 for a in trail)
    assert row.status == "failed"
    assert row.last_error is not None
    assert row.last_error.startswith("gave up after")
    assert len(failing.received) == len(trail)


async def test_a_hanging_receiver_delays_neither_another_requests_email_nor_another_webhook(
    daemon: Daemon, mail_sink: MailSink, receiver: Receiver
) -> None:
    hanging = Receiver(answers=[HANG] * 10).start()
    config = daemon.config(
        hook_toml("slow", hanging.url, 'timeout = "30s"')
        + hook_toml("fast", receiver.url, 'events = ["answered", "new_request"]')
    )
    try:
        async with App(config) as app:
            first = create(config, app.store)
            await until(lambda: hanging.received, "the first POST, left hanging")
            started = time.monotonic()
            second = create(config, app.store)
            await until(lambda: mail_sink.of("notification", second.id), "the second email")
            mailed_after = time.monotonic() - started
            await until(lambda: len(receiver.received) == 2, "both events at the fast webhook")
            fast_after = time.monotonic() - started
            still_hanging = not attempts(app.store, first.id) or all(
                a["to"] != "slow" for a in attempts(app.store, first.id)
            )
            hanging.release()
    finally:
        hanging.stop()

    assert mailed_after < 10, mailed_after  # the hanging POST holds for 30 s
    assert fast_after < 10, fast_after
    assert still_hanging
    assert {body["request"]["id"] for body in receiver.bodies()} == {first.id, second.id}


async def test_events_of_one_request_reach_a_webhook_in_the_order_they_happened(
    daemon: Daemon, store: Store
) -> None:
    # The first event's first POST fails: its successors wait for its retry (0.5 to 1 s
    # later); another request's event, written meanwhile, does not.
    picky = Receiver(answers=[503]).start()
    config = daemon.config(hook_toml("ops", picky.url, 'retry_initial = "1s"'))
    hooks = config.webhooks
    one = FeedbackRequest(
        id="one",
        status="pending",
        flow_id="f",
        flow_class="m.F",
        method_name="m",
        created_at=utcnow(),
    )
    other = one.model_copy(update={"id": "other"})
    rows = []
    for event in ("new_request", "answered", "resumed"):
        rows += webhooks.event_rows(hooks, webhooks.event_payload(event, one))
    store.add(*rows)
    try:
        async with App(config) as app:
            await until(lambda: picky.received, "the first POST")
            store.add(*webhooks.event_rows(hooks, webhooks.event_payload("new_request", other)))
            await until(lambda: len(picky.received) >= 5, "every event delivered")
            await asyncio.sleep(0.3)
            statuses = {row.status for row in HttpQueue(app.store).rows_for("one")}
    finally:
        picky.stop()

    sent = [(b["request"]["id"], b["event"]) for b in picky.bodies()]
    assert len(sent) == 5
    assert [event for rid, event in sent if rid == "one"] == [
        "new_request",
        "new_request",
        "answered",
        "resumed",
    ]
    # The other request's event did not wait behind the failed one's retry.
    assert sent.index(("other", "new_request")) < sent.index(("one", "answered"))
    assert statuses == {"delivered"}


async def test_a_post_cut_off_by_shutdown_is_given_back_and_sent_by_the_next_start(
    daemon: Daemon,
) -> None:
    hanging = Receiver(answers=[HANG]).start()
    config = daemon.config(hook_toml("ops", hanging.url, 'timeout = "30s"'))
    try:
        app = App(config)
        await app.startup()
        request = create(config, app.store)
        await until(lambda: hanging.received, "the POST, left hanging")
        started = time.monotonic()
        await app.shutdown()
        stopped_in = time.monotonic() - started
        store = Store(config.daemon.database_url)
        [row] = HttpQueue(store).rows_for(request.id)
        store.close()
        assert (row.status, row.lease_until, row.attempts) == ("pending", None, 0)

        async with App(config) as again:
            await until(
                lambda: any(a["result"] == "delivered" for a in attempts(again.store, request.id)),
                "the delivery after the restart",
            )
    finally:
        hanging.stop()

    assert stopped_in < config.daemon.shutdown_timeout.total_seconds()
    assert len(hanging.received) == 2
    assert hanging.received[0].body == hanging.received[1].body


async def test_a_row_left_leased_by_a_killed_daemon_is_delivered_once_its_lease_runs_out(
    daemon: Daemon, receiver: Receiver, store: Store
) -> None:
    config = daemon.config(hook_toml("ops", receiver.url))
    request = create(config, store)
    # What a daemon killed in the middle of the POST leaves behind: the row claimed, unrecorded.
    lease = 2.0
    claimed_at = time.monotonic()
    [claimed] = HttpQueue(store).claim("ops", 10, timedelta(seconds=lease))
    async with App(config) as app:
        [got] = await until(lambda: receiver.received, "the POST after the lease")
        await until(lambda: attempts(app.store, request.id), "the attempt recorded")
    assert got.at >= claimed_at + lease  # not while the lease held
    assert got.json()["event_id"] == claimed.event_id
    assert [a["attempt"] for a in attempts(store, request.id)] == [1]


# -- with a real flow and `hitl-mail serve` ---------------------------------------------------


@pytest.mark.slow
def test_a_paused_crewai_flow_is_announced_to_the_webhook_and_the_attempt_is_shown(
    setup: Setup, database_url: str, receiver: Receiver
) -> None:
    write_config(
        setup.config,
        database_url=database_url,
        smtp_port=setup.smtp_port,
        relay_port=setup.sink.port,
        llm_url=setup.llm.url,
        extra=hook_toml("ops", receiver.url, 'events = ["new_request"]'),
    )
    daemon = setup.start_daemon()
    info = setup.kickoff({"topic": "budget"})["callback_info"]

    [got] = wait_until(lambda: receiver.received, 30, what="the new_request POST")
    setup.sink.wait_for("notification", info["request_id"])
    assert signed_correctly(got)
    assert not webhooks.verify_signature(
        "not-the-secret-0123456789",
        got.headers["X-Timestamp"],
        got.body,
        got.headers["X-Signature"],
        timedelta(minutes=5),
    )
    body = got.json()
    assert body["event"] == "new_request"
    assert body["assigned_to_email"] == "owner@example.com"
    request = body["request"]
    assert request["id"] == info["request_id"]
    assert request["message"] == "Approve the budget?"
    assert request["emit_options"] == ["approved", "rejected", "needs_revision"]
    assert request["method_name"] == "review"
    assert request["state"]["topic"] == "budget"
    assert request["status"] == "pending"

    shown = wait_until(
        lambda: (
            (s := setup.show(info["request_id"]))
            and any(e["event"] == "webhook_attempt" for e in s["audit"])
            and s
        ),
        30,
        what="the attempt in requests show",
    )
    [attempt] = [e["detail"] for e in shown["audit"] if e["event"] == "webhook_attempt"]
    assert (attempt["to"], attempt["status_code"], attempt["result"]) == ("ops", 200, "delivered")
    text = setup.cli("requests", "show", info["request_id"])
    assert "webhook_attempt" in text.stdout
    assert HOOK_SECRET not in text.stdout
    assert setup.stop_daemon(daemon) == 0


# -- hitl-mail webhooks test -------------------------------------------------------------------


def test_webhooks_test_sends_a_signed_sample_and_prints_the_answer(
    daemon: Daemon, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.config(hook_toml("ops", receiver.url))
    config = str(daemon.tmp / "hitl-mail.toml")
    receiver.answer_body = b'{"received": "yes, thanks"}'
    assert cli.main(["webhooks", "test", "ops", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "HTTP 200" in out
    assert "yes, thanks" in out
    [got] = receiver.received
    assert signed_correctly(got)
    assert got.json()["event"] == "new_request"

    receiver.answers = [500]
    assert cli.main(["webhooks", "test", "ops", "--config", config]) == 1
    assert "HTTP 500" in capsys.readouterr().out

    assert cli.main(["webhooks", "test", "nope", "--config", config]) == 2
    assert "no webhook named 'nope' (webhooks: ops)" in capsys.readouterr().err
