"""Answering over HTTP with real processes: a flow pauses, a POST to its callback_url resumes it.

The daemon runs as `hitl-mail serve` with `[http]` and a `[[webhooks]]`
receiver (a real HTTP server in the test); a real crewAI flow pauses in its
own process; the fake LLM server decides the free-text answer.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import Setup, free_port, reply_to, send, wait_until
from http_receiver import Receiver

pytestmark = pytest.mark.slow

WEBHOOK_SECRET = "webhook-secret-for-the-test-0123"


@pytest.fixture
def receiver() -> Any:
    hooks = Receiver().start()
    yield hooks
    hooks.stop()


def events_for(receiver: Receiver, request_id: str) -> list[str]:
    return [body["event"] for body in receiver.bodies() if body["request"]["id"] == request_id]


def test_a_post_to_the_callback_url_resumes_the_flow_and_a_later_reply_is_already_answered(
    setup: Setup, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    port = free_port()
    setup.config.write_text(
        setup.config.read_text()
        + f"""
[http]
enabled = true
port = {port}
public_url = "http://127.0.0.1:{port}"

[[webhooks]]
name = "ops"
url = "{receiver.url}"
secret = "env:TEST_WEBHOOK_SECRET"
events = ["new_request", "answered", "resumed"]
"""
    )
    setup.start_daemon()
    wait_until(lambda: _status(f"http://127.0.0.1:{port}/readyz") == 200, 30, what="[http] ready")
    info = setup.kickoff()["callback_info"]
    request_id, callback_url = info["request_id"], info["callback_url"]
    assert callback_url.startswith(f"http://127.0.0.1:{port}/api/requests/{request_id}/callback?")
    [notification] = setup.sink.wait_for("notification", request_id)
    wait_until(lambda: events_for(receiver, request_id), 30, what="the new_request webhook")
    [new_request] = [b for b in receiver.bodies() if b["event"] == "new_request"]
    assert new_request["callback_url"] == callback_url

    answer = httpx.post(
        callback_url,
        json={"feedback": "This looks great, go ahead", "source": "chat-bot"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "approved"
    [approved] = setup.wait_event("approved")
    assert approved["feedback"] == "This looks great, go ahead"
    assert len(setup.llm.requests) == 1
    wait_until(
        lambda: "resumed" in events_for(receiver, request_id), 30, what="the resumed webhook"
    )
    assert events_for(receiver, request_id) == ["new_request", "answered", "resumed"]
    answered = next(b for b in receiver.bodies() if b["event"] == "answered")
    assert (answered["request"]["source"], answered["request"]["outcome"]) == ("api", "approved")

    again = httpx.post(
        callback_url, json={"feedback": "This looks great, go ahead", "source": "chat-bot"}
    )
    assert again.status_code == 409

    send(setup.smtp_port, reply_to(notification, "rejected"))
    [told] = setup.sink.wait_for("error", request_id)
    assert told["X-HITL-Error"] == "already_answered"
    shown = setup.show(request_id)
    assert (shown["status"], shown["outcome"], shown["source"]) == ("resumed", "approved", "api")
    [audit] = [e for e in shown["audit"] if e["event"] == "answered"]
    assert audit["detail"]["source"] == "chat-bot"
    assert len(setup.llm.requests) == 1
    assert not [e for e in setup.events() if e["event"] == "rejected"]


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0
