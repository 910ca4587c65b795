"""The bridge for crewAI's hosted HITL: a signed `new_request` in, an email answer out to its callback.

A fake hosted platform (a real HTTP server, `Receiver`) sends the webhook to
the real `App` with `[bridge]` enabled and receives the answer at its
callback URL; the assignee answers with a real SMTP reply. Signatures are
computed here from the formula in SPEC 8, not with hitl-mail's own code.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from conftest import MailSink, ResumeParked, free_port, reply_to, until, write_config
from http_receiver import Receiver
from llm_server import FakeLLMServer

from hitl_mail import app as app_module
from hitl_mail import callbacks, outcomes
from hitl_mail.app import App
from hitl_mail.config import Config, load_config
from hitl_mail.models import RequestStatus

SIGNING_SECRET = "hosted-platform-signing-secret-0123"
ASSIGNEE = "ann@example.com"


@dataclass
class Bridged:
    app: App
    config: Config
    sink: MailSink
    platform: Receiver
    client: httpx.AsyncClient

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}/bridge/crewai"

    def requests(self) -> list[Any]:
        return self.app.store.requests()


@pytest.fixture
def platform() -> Iterator[Receiver]:
    """The hosted platform's callback endpoint; it answers 503 to the first POST."""
    receiver = Receiver(answers=[503]).start()
    yield receiver
    receiver.stop()


@pytest.fixture
async def bridged(
    tmp_path: Path,
    database_url: str,
    mail_sink: MailSink,
    llm: FakeLLMServer,
    platform: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Bridged]:
    monkeypatch.setenv("TEST_BRIDGE_SECRET", SIGNING_SECRET)
    http_port = free_port()
    extra = f"""
[http]
enabled = true
port = {http_port}
public_url = "http://127.0.0.1:{http_port}"

[bridge]
enabled = true
signing_secret = "env:TEST_BRIDGE_SECRET"
max_skew = "5m"
"""
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=mail_sink.port,
        llm_url=llm.url,
        extra=extra,
    )
    config = load_config(path)
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)
    async with App(config) as app, httpx.AsyncClient(timeout=20) as client:
        yield Bridged(app, config, mail_sink, platform, client)
    await outcomes.close_llm_clients()


def new_request(to: str, **changes: Any) -> dict[str, Any]:
    """The hosted platform's `new_request` webhook body."""
    payload: dict[str, Any] = {
        "event": "new_request",
        "event_id": uuid.uuid4().hex,
        "request": {
            "id": uuid.uuid4().hex,
            "flow_id": "hosted-flow-1",
            "method_name": "review_article",
            "message": "Approve the article for publication?",
            "emit_options": ["approved", "rejected"],
            "state": {"topic": "budgets"},
            "metadata": {"team": "content"},
            "created_at": "2026-12-03T08:00:00+00:00",
        },
        "callback_url": to,
        "assigned_to_email": ASSIGNEE,
        "deployment": {"id": "dep-42", "name": "content-review"},
    }
    payload.update(changes)
    return payload


def signed(body: bytes, secret: str = SIGNING_SECRET, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return {
        "Content-Type": "application/json",
        "X-Timestamp": timestamp,
        "X-Signature": "sha256=" + mac.hexdigest(),
    }


async def test_a_signed_new_request_is_emailed_and_the_answer_reaches_the_callback_once(
    bridged: Bridged,
) -> None:
    body = json.dumps(new_request(bridged.platform.url)).encode()

    stored = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))

    assert stored.status_code == 201, stored.text
    request_id = stored.json()["id"]
    assert stored.json()["assigned_to"] == ASSIGNEE
    (notification,) = await asyncio.to_thread(bridged.sink.wait_for, "notification", request_id)
    assert str(notification["To"]) == ASSIGNEE
    assert "Approve the article" in notification.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    reply = reply_to(notification, "approved")
    await aiosmtplib.send(reply, hostname="127.0.0.1", port=bridged.app.smtp_port, timeout=10)

    def resumed() -> bool:
        return bridged.app.store.get(request_id).status == RequestStatus.RESUMED

    await until(resumed, "the bridged request resumed", timeout=30)
    received = bridged.platform.received
    assert [r.json() for r in received] == [{"feedback": "approved", "source": "email"}] * 2
    assert all(r.path == "/hook" for r in received)  # the first got 503, the second 200
    await asyncio.sleep(1.0)  # nothing more comes once it was taken
    assert len(bridged.platform.received) == 2
    request = bridged.app.store.get(request_id)
    assert (request.outcome, request.source, request.flow_class) == (
        "approved",
        "email",
        "crewai-hosted:content-review",
    )
    attempts = [e for e in bridged.app.store.trail(request_id) if e.event == "callback_attempt"]
    assert [a.detail["status_code"] for a in attempts] == [503, 200]


async def test_a_bridged_request_answered_over_http_is_posted_to_the_platform_too(
    bridged: Bridged,
) -> None:
    body = json.dumps(new_request(bridged.platform.url)).encode()
    stored = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))
    request_id = stored.json()["id"]
    callback = callbacks.callback_url(bridged.config, request_id)
    assert callback is not None

    answer = await bridged.client.post(callback, json={"feedback": "Rejected.", "source": "ui"})

    assert answer.status_code == 200
    await until(
        lambda: bridged.app.store.get(request_id).status == RequestStatus.RESUMED,
        "the bridged request resumed",
        timeout=30,
    )
    assert bridged.platform.bodies() == [{"feedback": "Rejected.", "source": "email"}] * 2


async def test_an_unanswered_bridged_request_gets_its_auto_response_posted(
    bridged: Bridged,
) -> None:
    policy = bridged.config.auto_response.model_copy(
        update={"enabled": True, "timeout": timedelta(seconds=1), "default_outcome": "rejected"}
    )
    bridged.app.reload(bridged.config.model_copy(update={"auto_response": policy}))
    body = json.dumps(new_request(bridged.platform.url)).encode()

    stored = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))
    request_id = stored.json()["id"]

    await until(
        lambda: bridged.app.store.get(request_id).status == RequestStatus.RESUMED,
        "the auto-response taken by the platform",
        timeout=30,
    )
    assert bridged.platform.bodies()[-1] == {"feedback": "rejected", "source": "email"}
    assert bridged.app.store.get(request_id).source == "auto"


async def test_an_unsigned_tampered_or_stale_webhook_is_401_and_stores_nothing(
    bridged: Bridged,
) -> None:
    body = json.dumps(new_request(bridged.platform.url)).encode()
    tampered = body.replace(ASSIGNEE.encode(), b"mallory@attacker.example")
    # Signed as each is sent: a timestamp 301 s ahead, made seconds before a slow
    # machine sends it, would be back within the 300 s skew by then.
    attempts: dict[str, tuple[bytes, Callable[[], dict[str, str]]]] = {
        "unsigned": (body, lambda: {"Content-Type": "application/json"}),
        "wrong secret": (body, lambda: signed(body, secret="not-the-platform-secret-0123456")),
        "tampered body": (tampered, lambda: signed(body)),
        "stale": (body, lambda: signed(body, at=time.time() - 301)),
        "from the future": (body, lambda: signed(body, at=time.time() + 301)),
        "garbled timestamp": (body, lambda: {**signed(body), "X-Timestamp": "1e9"}),
    }

    for how, (content, headers) in attempts.items():
        answer = await bridged.client.post(bridged.endpoint, content=content, headers=headers())
        assert answer.status_code == 401, how

    assert bridged.requests() == []
    await asyncio.sleep(0.3)
    assert bridged.sink.messages == []


async def test_a_replayed_webhook_is_refused_and_stores_nothing_more(bridged: Bridged) -> None:
    body = json.dumps(new_request(bridged.platform.url)).encode()
    first = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))
    assert first.status_code == 201

    again = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))

    assert again.status_code == 409
    assert [r.id for r in bridged.requests()] == [first.json()["id"]]
    await asyncio.to_thread(bridged.sink.wait_for, "notification", first.json()["id"])
    await asyncio.sleep(0.3)
    assert len(bridged.sink.of("notification")) == 1


async def test_a_routing_rule_wins_over_assigned_to_email(
    bridged: Bridged, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed = bridged.config.routing.model_validate(
        {
            "rules": [
                {
                    "name": "hosted reviews",
                    "match": {"flow_class": "crewai-hosted:*"},
                    "assign_to_email": "lead@example.com",
                }
            ]
        }
    )
    bridged.app.reload(bridged.config.model_copy(update={"routing": routed}))
    body = json.dumps(new_request(bridged.platform.url)).encode()

    stored = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))

    assert stored.status_code == 201
    assert stored.json()["assigned_to"] == "lead@example.com"


async def test_a_signed_but_unusable_payload_is_422_and_stores_nothing(bridged: Bridged) -> None:
    changes: list[dict[str, Any]] = [
        {"event": "resumed"},
        {"callback_url": "ftp://platform.example/cb"},
        {"assigned_to_email": "not an address"},
        {"request": {"id": "x"}},
    ]
    for change in changes:
        body = json.dumps(new_request(bridged.platform.url, **change)).encode()
        answer = await bridged.client.post(bridged.endpoint, content=body, headers=signed(body))
        assert answer.status_code == 422, change
    not_json = b"event=new_request"
    answer = await bridged.client.post(bridged.endpoint, content=not_json, headers=signed(not_json))
    assert answer.status_code == 422

    assert bridged.requests() == []
