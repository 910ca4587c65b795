"""The HTTP side, in process: callback URLs, the operator API, OpenAPI, health on [http].

Each test runs the real `App` with `[http]` enabled on loopback (FastAPI under
uvicorn in the daemon's loop), talks to it with a real HTTP client, and
asserts on what a caller or an operator observes: status codes, bodies, the
request's status and audit trail, and the mail that reached the relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import (
    MailSink,
    ResumeParked,
    add_request,
    free_port,
    request_context,
    until,
    write_config,
)
from llm_server import FakeLLMServer

from hitl_mail import app as app_module
from hitl_mail import callbacks, cli, intake, outcomes
from hitl_mail.app import App
from hitl_mail.config import Config, hash_api_key, load_config
from hitl_mail.models import FeedbackRequest, RequestStatus

ASSIGNEE = "owner@example.com"
OPTIONS = ["approved", "rejected", "needs_revision"]
API_KEY = "operator-key-0123456789abcdef"


@dataclass
class HttpDaemon:
    app: App
    config: Config
    sink: MailSink
    llm: FakeLLMServer
    client: httpx.AsyncClient

    @property
    def store(self) -> Any:
        return self.app.store

    def new_request(self, **context: Any) -> FeedbackRequest:
        return intake.create_request(
            self.config, self.store, request_context(emit=OPTIONS, **context), state={}
        )

    def callback_url(self, request_id: str) -> str:
        url = callbacks.callback_url(self.config, request_id)
        assert url is not None
        return url

    def snapshot(self, request_id: str) -> tuple[Any, ...]:
        """What a refused call must leave as it was: status, audit trail, queued mail.

        The sending stage's own events (`email_sent`...) come and go with the relay.
        """
        request = self.store.get(request_id)
        trail = [
            (e.event, e.detail)
            for e in self.store.trail(request_id)
            if not e.event.startswith("email_")
        ]
        mail = [m.kind for m in self.store.outbox_for(request_id)]
        return request.status, request.outcome, request.source, trail, mail


def http_config(tmp_path: Path, database_url: str, sink: MailSink, llm: FakeLLMServer) -> Config:
    port = free_port()
    extra = f"""
[http]
enabled = true
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}/"
api_keys = ["{API_KEY}"]
max_body = "4KB"
"""
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=sink.port,
        llm_url=llm.url,
        extra=extra,
    )
    return load_config(path)


@pytest.fixture
async def daemon(
    tmp_path: Path,
    database_url: str,
    mail_sink: MailSink,
    llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[HttpDaemon]:
    config = http_config(tmp_path, database_url, mail_sink, llm)
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)
    async with App(config) as app, httpx.AsyncClient(timeout=20) as client:
        yield HttpDaemon(app, config, mail_sink, llm, client)
    await outcomes.close_llm_clients()


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def with_token(daemon: HttpDaemon, request_id: str, token: str) -> str:
    base = daemon.config.http.public_url
    return f"{base}{callbacks.callback_path(request_id)}?token={token}"


# -- answering over HTTP --------------------------------------------------------------------


async def test_a_callback_with_free_text_is_decided_by_the_llm_once_and_confirmed_by_email(
    daemon: HttpDaemon,
) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    url = daemon.callback_url(request.id)

    answer = await daemon.client.post(
        url, json={"feedback": "Looks fine to me, ship it\nthanks", "source": "review-ui"}
    )

    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "id": request.id,
        "status": "answered",
        "outcome": "approved",
        "feedback": "Looks fine to me, ship it",
        "source": "api",
    }
    assert len(daemon.llm.requests) == 1
    stored = daemon.store.get(request.id)
    assert (stored.status, stored.outcome, stored.source) == ("answered", "approved", "api")
    (answered,) = [e for e in daemon.store.trail(request.id) if e.event == "answered"]
    assert answered.source == "api"
    assert answered.detail["source"] == "review-ui"
    assert answered.detail["method"] == "llm"
    confirmation = await asyncio.to_thread(daemon.sink.wait_for, "confirmation", request.id)
    assert str(confirmation[0]["To"]) == ASSIGNEE


async def test_a_second_post_to_the_same_callback_url_is_409_and_changes_nothing(
    daemon: HttpDaemon,
) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    url = daemon.callback_url(request.id)
    body = {"feedback": "rejected", "source": "bot"}
    first = await daemon.client.post(url, json=body)
    assert first.status_code == 200
    before = daemon.snapshot(request.id)

    again = await daemon.client.post(url, json=body)
    other = await daemon.client.post(url, json={"feedback": "approved", "source": "bot"})

    assert again.status_code == 409
    assert again.json()["outcome"] == "rejected"
    assert other.status_code == 409
    assert daemon.snapshot(request.id) == before


async def test_an_exact_option_needs_no_llm_call(daemon: HttpDaemon) -> None:
    request = await asyncio.to_thread(daemon.new_request)

    answer = await daemon.client.post(
        daemon.callback_url(request.id), json={"feedback": "Needs revision."}
    )

    assert answer.status_code == 200
    assert answer.json()["outcome"] == "needs_revision"
    assert daemon.llm.requests == []


# -- refused: nothing recorded ---------------------------------------------------------------


async def test_a_callback_token_for_another_request_is_403_and_records_nothing(
    daemon: HttpDaemon,
) -> None:
    mine = await asyncio.to_thread(daemon.new_request)
    other = await asyncio.to_thread(daemon.new_request)
    before = daemon.snapshot(mine.id), daemon.snapshot(other.id)
    borrowed = token_of(daemon.callback_url(other.id))

    answer = await daemon.client.post(
        with_token(daemon, mine.id, borrowed), json={"feedback": "approved"}
    )

    assert answer.status_code == 403
    assert (daemon.snapshot(mine.id), daemon.snapshot(other.id)) == before
    assert daemon.llm.requests == []


async def test_an_expired_callback_token_is_410_and_records_nothing(daemon: HttpDaemon) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    before = daemon.snapshot(request.id)
    eight_days_ago = datetime.now(UTC) - timedelta(days=8)  # max_age is 7 days
    old = callbacks.CallbackTokens.of(daemon.config).mint(request.id, eight_days_ago)

    answer = await daemon.client.post(
        with_token(daemon, request.id, old), json={"feedback": "approved"}
    )

    assert answer.status_code == 410
    assert daemon.snapshot(request.id) == before


async def test_a_missing_forged_or_foreign_token_is_401_and_records_nothing(
    daemon: HttpDaemon,
) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    before = daemon.snapshot(request.id)
    genuine = token_of(daemon.callback_url(request.id))
    tampered = genuine[:-2] + ("AA" if genuine[-2:] != "AA" else "BB")
    other_key = callbacks.CallbackTokens(["another-secret-key-0123456789"], timedelta(days=7))
    tokens = {
        "none": "",
        "garbage": "garbage",
        "tampered": tampered,
        "a reply token": request.token or "",
        "signed with another key": other_key.mint(request.id),
    }

    for what, token in tokens.items():
        answer = await daemon.client.post(
            with_token(daemon, request.id, token), json={"feedback": "approved"}
        )
        assert answer.status_code == 401, what

    assert daemon.snapshot(request.id) == before


async def test_a_cancelled_request_is_410(daemon: HttpDaemon) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    url = daemon.callback_url(request.id)
    cancel = await daemon.client.post(
        f"{daemon.config.http.public_url}/api/requests/{request.id}/cancel",
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert cancel.status_code == 200, cancel.text

    answer = await daemon.client.post(url, json={"feedback": "approved"})

    assert answer.status_code == 410
    assert daemon.store.get(request.id).status == RequestStatus.CANCELLED


async def test_a_bad_body_is_refused_and_records_nothing(daemon: HttpDaemon) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    before = daemon.snapshot(request.id)
    json_type = {"Content-Type": "application/json"}
    bodies = [
        (b"not json", json_type, 422),
        (b'{"source": "x"}', json_type, 422),
        (b'{"feedback": 42}', json_type, 422),
        (b'["approved"]', json_type, 422),
        (b'{"feedback": "approved", "source": ""}', json_type, 422),
        (b'{"feedback": "approved"}', {"Content-Type": "text/plain"}, 422),
        (b'{"feedback": "' + b"a" * 5000 + b'"}', json_type, 413),  # max_body is 4KB
    ]

    for content, headers, expected in bodies:
        answer = await daemon.client.post(
            daemon.callback_url(request.id), content=content, headers=headers
        )
        assert answer.status_code == expected, (content[:40], answer.text)

    assert daemon.snapshot(request.id) == before
    assert daemon.llm.requests == []


async def test_when_the_llm_fails_the_request_stays_pending_and_the_caller_may_retry(
    daemon: HttpDaemon,
) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    daemon.llm.configure({"mode": "fail"})

    answer = await daemon.client.post(
        daemon.callback_url(request.id), json={"feedback": "hmm, maybe later"}
    )

    assert answer.status_code == 503
    assert answer.json()["options"] == OPTIONS
    assert answer.headers["retry-after"] == "60"
    assert daemon.store.get(request.id).status == RequestStatus.PENDING
    assert "reply_undecided" in [e.event for e in daemon.store.trail(request.id)]

    daemon.llm.configure({"mode": "classify"})
    retried = await daemon.client.post(
        daemon.callback_url(request.id), json={"feedback": "approved"}
    )
    assert retried.status_code == 200


# -- the operator API ---------------------------------------------------------------------


def bearer(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_operator_api_without_a_valid_key_is_401_and_records_nothing(
    daemon: HttpDaemon,
) -> None:
    request = await asyncio.to_thread(daemon.new_request)
    before = daemon.snapshot(request.id)
    base = f"{daemon.config.http.public_url}/api/requests"
    wrong = [
        {},
        bearer("wrong-key-0123456789abcdef"),
        bearer(API_KEY.upper()),
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
        bearer(hash_api_key(API_KEY)),  # the stored hash is not a key
    ]

    for headers in wrong:
        answers = [
            await daemon.client.get(base, headers=headers),
            await daemon.client.get(f"{base}/{request.id}", headers=headers),
            await daemon.client.post(f"{base}/{request.id}/cancel", headers=headers),
            await daemon.client.post(f"{base}/{request.id}/retry", headers=headers),
        ]
        assert [a.status_code for a in answers] == [401] * 4, headers
        assert answers[0].headers["www-authenticate"] == "Bearer"

    assert daemon.snapshot(request.id) == before


async def test_the_operator_api_shows_requests_as_the_cli_does(daemon: HttpDaemon) -> None:
    from hitl_mail import views

    first = await asyncio.to_thread(daemon.new_request)
    second = await asyncio.to_thread(daemon.new_request, flow_class="review_flows.OtherFlow")
    # Both notifications sent first, so the trail read below is the one the API reads.
    for request in (first, second):
        await until(
            lambda r=request: any(e.event == "email_sent" for e in daemon.store.trail(r.id)),
            "the notification sent",
        )
    base = f"{daemon.config.http.public_url}/api/requests"

    listed = await daemon.client.get(base, headers=bearer(), params={"status": "pending"})
    by_flow = await daemon.client.get(
        base, headers=bearer(), params={"flow": "review_flows.OtherFlow", "assignee": ASSIGNEE}
    )
    shown = await daemon.client.get(f"{base}/{first.id}", headers=bearer())
    missing = await daemon.client.get(f"{base}/nosuchrequest", headers=bearer())

    assert {r["id"] for r in listed.json()} == {first.id, second.id}
    assert [r["id"] for r in by_flow.json()] == [second.id]
    expected = views.as_json(daemon.store.get(first.id), daemon.store.trail(first.id))
    assert shown.json() == expected
    assert missing.status_code == 404


async def test_cancel_and_retry_through_the_operator_api(daemon: HttpDaemon) -> None:
    pending = await asyncio.to_thread(daemon.new_request)
    add_request(daemon.store, "failedrequest01", RequestStatus.RESUME_FAILED)
    base = f"{daemon.config.http.public_url}/api/requests"

    cancelled = await daemon.client.post(f"{base}/{pending.id}/cancel", headers=bearer())
    twice = await daemon.client.post(f"{base}/{pending.id}/cancel", headers=bearer())
    retried = await daemon.client.post(f"{base}/failedrequest01/retry", headers=bearer())
    not_failed = await daemon.client.post(f"{base}/{pending.id}/retry", headers=bearer())

    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    assert twice.status_code == 409
    assert retried.status_code == 200
    assert not_failed.status_code == 409
    events = [e.event for e in daemon.store.trail("failedrequest01")]
    assert "resume_retry_requested" in events
    (cancel_event,) = [e for e in daemon.store.trail(pending.id) if e.event == "cancelled"]
    assert cancel_event.actor.startswith("api:")
    await until(lambda: daemon.sink.of("error", pending.id) or daemon.sink.messages, "cancel mail")


async def test_the_openapi_schema_describes_the_api(daemon: HttpDaemon) -> None:
    schema = (await daemon.client.get(f"{daemon.config.http.public_url}/openapi.json")).json()

    paths = schema["paths"]
    assert "/api/requests" in paths
    assert "/api/requests/{request_id}/callback" in paths
    assert {"401", "403", "409", "410", "422"} <= set(
        paths["/api/requests/{request_id}/callback"]["post"]["responses"]
    )
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


async def test_health_and_metrics_are_served_on_the_http_server(daemon: HttpDaemon) -> None:
    base = daemon.config.http.public_url
    healthz = await daemon.client.get(f"{base}/healthz")
    readyz = await daemon.client.get(f"{base}/readyz")
    metrics = await daemon.client.get(f"{base}/metrics")

    assert (healthz.status_code, healthz.text) == (200, "ok\n")
    assert (readyz.status_code, readyz.text) == (200, "ready\n")
    assert metrics.status_code == 200
    assert "hitl_requests{" in metrics.text


async def test_callback_urls_name_the_public_url_and_need_http_enabled(
    daemon: HttpDaemon,
) -> None:
    url = daemon.callback_url("abcdefghijklmnop")
    assert url.startswith(
        f"{daemon.config.http.public_url}/api/requests/abcdefghijklmnop/callback?token="
    )
    disabled = daemon.config.model_copy(
        update={"http": daemon.config.http.model_copy(update={"enabled": False})}
    )
    assert callbacks.callback_url(disabled, "abcdefghijklmnop") is None


async def test_hitl_mail_health_probes_the_http_server_when_health_is_off(
    daemon: HttpDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not daemon.config.health.enabled
    args = ["health", "--config", str(daemon.config.source)]

    code = await asyncio.to_thread(cli.main, args)

    assert (code, capsys.readouterr().out.strip()) == (0, "ready")


async def test_health_on_the_same_address_as_http_is_served_by_the_one_server(
    tmp_path: Path,
    database_url: str,
    mail_sink: MailSink,
    llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = http_config(tmp_path, database_url, mail_sink, llm)
    health = config.health.model_copy(
        update={"enabled": True, "host": config.http.host, "port": config.http.port}
    )
    monkeypatch.setattr(app_module, "Resumer", ResumeParked)

    async with (
        App(config.model_copy(update={"health": health})) as app,
        httpx.AsyncClient(timeout=20) as client,
    ):
        assert app.health_port == app.http_port == config.http.port
        ready = await client.get(f"http://127.0.0.1:{app.http_port}/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
