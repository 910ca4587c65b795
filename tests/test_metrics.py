"""Metrics scraped over real HTTP from HealthServer, and the health probe."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from hitl_mail.metrics import HealthServer, Metrics, probe


@dataclass
class FakeApp:
    """What the App hands to Metrics: a readiness flag and request counts."""

    ready: bool = False
    counts: dict[str, int] = field(default_factory=lambda: {"pending": 2, "resumed": 5})
    count_calls: int = 0

    def is_ready(self) -> bool:
        return self.ready

    def request_counts(self) -> Mapping[str, int]:
        self.count_calls += 1
        return self.counts


@dataclass
class Health:
    app: FakeApp
    metrics: Metrics
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def health() -> AsyncIterator[Health]:
    """A HealthServer on 127.0.0.1:<free port> over a fresh Metrics and a fake App."""
    app = FakeApp()
    metrics = Metrics(request_counts=app.request_counts, ready=app.is_ready)
    server = HealthServer(metrics)
    port = await server.start("127.0.0.1", 0)
    try:
        yield Health(app, metrics, port)
    finally:
        await server.stop()


async def http(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` as is and read until the server closes: (status, headers, body)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


async def scrape(port: int) -> dict[str, list[Sample]]:
    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(body.decode())
    return {family.name: family.samples for family in families}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, (name, labels, samples)
    return matches[0]


async def test_counters_incremented_by_the_stages_appear_in_a_real_scrape(
    health: Health,
) -> None:
    m = health.metrics
    m.email_sent("notification")
    m.email_sent("notification")
    m.email_failed("confirmation", permanent=True)
    m.reply_accepted()
    m.reply_refused("bad_token")
    m.reply_refused("bad_token")
    m.reply_refused("wrong_sender")
    m.resumed()
    m.resume_failed()
    m.llm_call("ok")
    m.answered(90.0)

    families = await scrape(health.port)

    sent = families["hitl_emails_sent"]
    assert value(sent, "hitl_emails_sent_total", kind="notification") == 2
    assert value(sent, "hitl_emails_sent_total", kind="confirmation") == 0
    failed = families["hitl_emails_failed"]
    assert value(failed, "hitl_emails_failed_total", kind="confirmation", permanent="true") == 1
    assert value(families["hitl_replies_accepted"], "hitl_replies_accepted_total") == 1
    refused = families["hitl_replies_refused"]
    assert value(refused, "hitl_replies_refused_total", reason="bad_token") == 2
    assert value(refused, "hitl_replies_refused_total", reason="wrong_sender") == 1
    assert value(refused, "hitl_replies_refused_total", reason="machine_mail") == 0
    assert value(families["hitl_resumes"], "hitl_resumes_total") == 1
    assert value(families["hitl_resume_failures"], "hitl_resume_failures_total") == 1
    assert value(families["hitl_llm_calls"], "hitl_llm_calls_total", result="ok") == 1
    answer = families["hitl_time_to_answer_seconds"]
    assert value(answer, "hitl_time_to_answer_seconds_bucket", le="60.0") == 0
    assert value(answer, "hitl_time_to_answer_seconds_bucket", le="300.0") == 1
    assert value(answer, "hitl_time_to_answer_seconds_bucket", le="604800.0") == 1
    assert value(answer, "hitl_time_to_answer_seconds_count") == 1
    assert value(families["hitl_up"], "hitl_up") == 1


async def test_request_counts_are_read_from_the_app_at_each_scrape(health: Health) -> None:
    families = await scrape(health.port)
    requests = families["hitl_requests"]
    assert value(requests, "hitl_requests", status="pending") == 2
    assert value(requests, "hitl_requests", status="resumed") == 5
    assert value(requests, "hitl_requests", status="resume_failed") == 0

    health.app.counts = {"pending": 0, "answered": 1, "cancelled": 3}
    requests = (await scrape(health.port))["hitl_requests"]
    assert value(requests, "hitl_requests", status="answered") == 1
    assert value(requests, "hitl_requests", status="cancelled") == 3
    assert health.app.count_calls == 2


def test_building_metrics_does_not_call_the_apps_callbacks() -> None:
    app = FakeApp()
    Metrics(request_counts=app.request_counts, ready=app.is_ready)
    assert app.count_calls == 0


async def test_a_failing_request_count_callback_leaves_the_gauge_out_not_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> Mapping[str, int]:
        raise RuntimeError("database is locked")

    metrics = Metrics(request_counts=broken)
    server = HealthServer(metrics)
    port = await server.start("127.0.0.1", 0)
    try:
        families = await scrape(port)
    finally:
        await server.stop()
    assert "hitl_requests" not in families
    assert value(families["hitl_up"], "hitl_up") == 1
    assert "request-count callback failed" in caplog.text


async def test_readiness_flips_from_503_to_200_when_the_app_is_ready(health: Health) -> None:
    status, _, body = await get(health.port, "/readyz")
    assert (status, body) == (503, b"not ready\n")
    assert value((await scrape(health.port))["hitl_ready"], "hitl_ready") == 0

    health.app.ready = True
    status, _, body = await get(health.port, "/readyz")
    assert (status, body) == (200, b"ready\n")
    assert value((await scrape(health.port))["hitl_ready"], "hitl_ready") == 1


async def test_liveness_answers_ok_while_the_loop_runs(health: Health) -> None:
    status, headers, body = await get(health.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert headers["content-length"] == "3"


async def test_probe_reports_readiness_and_unreachable_servers(health: Health) -> None:
    assert await asyncio.to_thread(probe, health.url("/healthz"), 5.0) is True
    assert await asyncio.to_thread(probe, health.url("/readyz"), 5.0) is False
    health.app.ready = True
    assert await asyncio.to_thread(probe, health.url("/readyz"), 5.0) is True
    assert await asyncio.to_thread(probe, health.url("/nowhere"), 5.0) is False

    spare = HealthServer(Metrics())
    closed_port = await spare.start("127.0.0.1", 0)
    await spare.stop()
    assert await asyncio.to_thread(probe, f"http://127.0.0.1:{closed_port}/healthz", 2.0) is False


def test_probe_refuses_urls_that_are_not_http() -> None:
    with pytest.raises(ValueError, match="not an http"):
        probe("file:///etc/passwd", 1.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x00\xff\xfe nonsense \x01\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
async def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(
    health: Health, raw: bytes, expected: int
) -> None:
    status, _, _ = await http(health.port, raw)
    assert status == expected
    status, _, _ = await get(health.port, "/healthz")
    assert status == 200


async def test_a_client_that_hangs_up_mid_request_does_not_kill_the_server(
    health: Health,
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", health.port)
    writer.write(b"GET /heal")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    status, _, _ = await get(health.port, "/healthz")
    assert status == 200


async def test_head_returns_headers_without_a_body(health: Health) -> None:
    status, headers, body = await http(health.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert (status, headers["content-length"], body) == (200, "3", b"")


async def test_stop_ends_a_connection_that_never_sends_its_request() -> None:
    metrics = Metrics()
    server = HealthServer(metrics)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(10):
            await server.stop()
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.reply_accepted()
    assert b"hitl_replies_accepted_total 1.0" in first.render()
    assert b"hitl_replies_accepted_total 0.0" in second.render()


async def test_a_client_that_sends_too_slowly_gets_408(
    health: Health, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hitl_mail.metrics.READ_TIMEOUT", 0.2)
    status, _, _ = await http(health.port, b"GET /healthz HTTP/1.1\r\n")
    assert status == 408
