"""The SMTP edge's rules and limits, against the real listener process and real SMTP clients.

Each test starts the listener as `serve` does (`ListenerProcess`: its own
process, its own database connections) with small limits and timeouts, and
talks to it with aiosmtplib or a raw socket, as a sending MTA or an attacker
would. No answering stage runs: stored replies stay waiting, which is what
the per-request cap counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import SECRET, add_request, free_port, self_signed, until, write_config
from sqlmodel import select

from hitl_mail import tokens
from hitl_mail.config import Config, ConfigError, InboundSettings, config_from_dict, load_config
from hitl_mail.edgeguard import EdgeGuard, client_of
from hitl_mail.listener import ListenerProcess
from hitl_mail.models import InboundMessage, InboundStatus, RequestStatus, utcnow
from hitl_mail.retention import RawRetention
from hitl_mail.store import Store

ASSIGNEE = "owner@example.com"
DOMAIN = "reply.example.com"
REPLY = b"From: owner@example.com\r\nSubject: Re: Approve?\r\nMessage-ID: <{n}@client>\r\n\r\napproved\r\n"


@pytest.fixture
def config(tmp_path: Path, database_url: str, store: Store) -> Config:
    """The test daemon's configuration; `store` has migrated its database."""
    path = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=0,
        relay_port=free_port(),
        llm_url="http://127.0.0.1:9",
    )
    return load_config(path)


def limited(config: Config, **inbound: Any) -> Config:
    """`config` with some `[inbound]` keys set, validated as if they came from the file."""
    settings = InboundSettings.model_validate({**config.inbound.model_dump(), **inbound})
    return config.model_copy(update={"inbound": settings})


@dataclass
class Edge:
    port: int
    refusals: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def listening(config: Config) -> AsyncIterator[Edge]:
    edge = Edge(0)
    listener = ListenerProcess(
        config,
        on_stored=lambda count: None,
        on_refused=edge.refusals.append,
        on_exit=lambda code: None,
    )
    edge.port = await listener.start()
    try:
        yield edge
    finally:
        await listener.stop(5.0)


def pending_request(store: Store, request_id: str, **values: Any) -> str:
    """A request assigned to ASSIGNEE, and the reply address of its notification."""
    values.setdefault("assigned_to", ASSIGNEE)
    add_request(store, request_id, **values)
    return address(request_id)


def address(request_id: str, issued: timedelta = timedelta(0), key: str = SECRET) -> str:
    token = tokens.mint(request_id, ASSIGNEE, [key], now=utcnow() - issued)
    return f"reply+{token}@{DOMAIN}"


REQUEST_IDS = [tokens.new_request_id() for _ in range(4)]


def request_id(n: int) -> str:
    return REQUEST_IDS[n]


async def connect(port: int) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False)
    await client.connect()
    return client


async def rcpt(port: int, *recipients: str) -> list[int]:
    """The code each recipient gets, in one transaction."""
    codes = []
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5) as client:
        await client.ehlo()
        await client.mail(ASSIGNEE)
        for recipient in recipients:
            try:
                codes.append((await client.rcpt(recipient)).code)
            except aiosmtplib.SMTPRecipientRefused as refused:
                codes.append(refused.code)
    return codes


async def refusal(port: int, recipient: str) -> aiosmtplib.SMTPRecipientRefused:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5) as client:
        await client.ehlo()
        await client.mail(ASSIGNEE)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(recipient)
    return refused.value


async def deliver(port: int, recipient: str, n: int) -> int:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5) as client:
        await client.mail(ASSIGNEE)
        await client.rcpt(recipient)
        return (await client.data(REPLY.replace(b"{n}", str(n).encode()))).code


def stored(store: Store) -> list[InboundMessage]:
    with store.session() as session:
        return list(session.exec(select(InboundMessage).order_by(InboundMessage.id)))  # type: ignore[arg-type]


# -- connections -----------------------------------------------------------------------------


async def test_connections_beyond_max_connections_get_421_and_a_freed_slot_serves_again(
    config: Config,
) -> None:
    # The default trusted relay (loopback) is exempt from the per-client cap, not from this one.
    async with listening(limited(config, max_connections=2, max_connections_per_ip=1)) as edge:
        first, second = await connect(edge.port), await connect(edge.port)
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await connect(edge.port)
        assert refused.value.code == 421
        assert "4.7.0 Too many connections" in refused.value.message

        await first.quit()

        async def admitted() -> aiosmtplib.SMTP | None:
            with contextlib.suppress(aiosmtplib.SMTPConnectResponseError):
                return await connect(edge.port)
            return None

        deadline = time.monotonic() + 5
        third = await admitted()
        while third is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            third = await admitted()
        assert third is not None, "the freed slot was never given to a new connection"
        for client in (second, third):
            await client.quit()
        assert "too_many_connections" in edge.refusals


async def test_one_client_gets_at_most_max_connections_per_ip_unless_it_is_a_trusted_relay(
    config: Config,
) -> None:
    untrusted = limited(config, trusted_relays=[], max_connections_per_ip=2)
    async with listening(untrusted) as edge:
        clients = [await connect(edge.port), await connect(edge.port)]
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await connect(edge.port)
        assert refused.value.code == 421
        assert "from your address" in refused.value.message
        for client in clients:
            await client.quit()

    trusted = limited(config, trusted_relays=["127.0.0.1"], max_connections_per_ip=2)
    async with listening(trusted) as edge:
        clients = [await connect(edge.port) for _ in range(4)]
        for client in clients:
            assert (await client.noop()).code == 250
            await client.quit()


async def test_a_connection_that_switched_to_tls_counts_once_and_frees_its_slot(
    config: Config, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, "reply.example.com")
    async with listening(limited(config, max_connections=1, tls_cert=cert, tls_key=key)) as edge:
        for _ in range(3):  # each one in turn gets the only slot
            client = await connect_when_free(edge.port)
            await client.starttls(validate_certs=False)
            assert (await client.noop()).code == 250
            await client.quit()


async def connect_when_free(port: int, within: float = 5.0) -> aiosmtplib.SMTP:
    deadline = time.monotonic() + within
    while True:
        try:
            return await connect(port)
        except aiosmtplib.SMTPConnectResponseError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- token guessing -------------------------------------------------------------------------


async def test_a_client_whose_recipients_keep_failing_is_held_off_with_4xx_until_the_window_passes(
    config: Config, store: Store
) -> None:
    genuine = pending_request(store, request_id(1))
    guesses = [address(request_id(1), key="not-our-secret-key-0123456789"), f"reply+x@{DOMAIN}"]
    window = 3.0  # long enough for the four RCPTs and the connection below, on a busy machine
    settings = dict(trusted_relays=[], max_rcpt_failures_per_ip=3, rcpt_failure_window=window)
    async with listening(limited(config, **settings)) as edge:
        started = time.monotonic()
        codes = await rcpt(edge.port, guesses[0], guesses[1], "x@elsewhere.example", genuine)
        assert codes == [550, 550, 550, 450]  # even the genuine address, for now
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            await connect(edge.port)
        assert refused.value.code == 421
        assert "throttled" in edge.refusals

        await asyncio.sleep(max(0.0, started + window + 0.2 - time.monotonic()))

        assert await rcpt(edge.port, genuine) == [250]


async def test_a_trusted_relay_is_never_held_off_for_the_recipients_it_relays(
    config: Config, store: Store
) -> None:
    genuine = pending_request(store, request_id(1))
    settings = dict(max_rcpt_failures_per_ip=2, rcpt_failure_window="1h")
    async with listening(limited(config, **settings)) as edge:
        codes = await rcpt(edge.port, *[f"reply+guess{n}@{DOMAIN}" for n in range(5)], genuine)
    assert codes == [550] * 5 + [250]


# -- slow clients ---------------------------------------------------------------------------


def closed_after(port: int, sends: list[bytes], pause: float, limit: float = 10.0) -> float:
    """Seconds until the server closes a raw connection that sends `sends` `pause` apart, then idles."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.settimeout(0.05)
        started = time.monotonic()
        pending = list(sends)
        next_send = started
        while time.monotonic() - started < limit:
            if pending and time.monotonic() >= next_send:
                with contextlib.suppress(OSError):
                    sock.sendall(pending.pop(0))
                next_send += pause
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - started
    raise AssertionError(f"the connection was still open after {limit}s")


async def test_an_idle_connection_and_a_command_trickled_byte_by_byte_are_closed_after_idle_timeout(
    config: Config,
) -> None:
    async with listening(limited(config, idle_timeout="0.5s")) as edge:
        idle = await asyncio.to_thread(closed_after, edge.port, [], 0.0)
        trickled = await asyncio.to_thread(
            closed_after, edge.port, [b"E", b"H", b"L", b"O"] * 5, 0.2
        )
    assert 0.4 < idle < 3.0
    assert 0.4 < trickled < 3.0  # bytes kept coming, but no whole command


async def test_a_message_trickled_in_for_longer_than_data_timeout_is_cut_off_and_not_stored(
    config: Config, store: Store
) -> None:
    genuine = pending_request(store, request_id(1))
    head = [
        b"EHLO client\r\n",
        b"MAIL FROM:<owner@example.com>\r\n",
        f"RCPT TO:<{genuine}>\r\n".encode(),
    ]
    lines = [b"DATA\r\n"] + [b"X-Line: %d\r\n" % n for n in range(40)]
    async with listening(limited(config, idle_timeout="5s", data_timeout="1s")) as edge:
        cut = await asyncio.to_thread(closed_after, edge.port, head + lines, 0.1)

        # A message sent at once leaves the connection on the idle timeout again.
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=edge.port, timeout=5) as client:
            await client.mail(ASSIGNEE)
            await client.rcpt(genuine)
            assert (await client.data(REPLY.replace(b"{n}", b"1"))).code == 250
            await asyncio.sleep(1.5)
            assert (await client.noop()).code == 250
    assert 1.0 < cut < 4.0  # DATA began after 0.3 s; the idle timeout would have been 5 s
    assert [row.dedupe_key for row in stored(store)] == ["mid:<1@client>"]


# -- recipients -----------------------------------------------------------------------------


async def test_recipients_beyond_max_recipients_get_452_too_many_recipients(
    config: Config, store: Store
) -> None:
    recipients = [pending_request(store, request_id(n)) for n in range(3)]
    async with listening(limited(config, max_recipients=2)) as edge:
        codes = await rcpt(edge.port, *recipients)
        third = await refusal_after(edge.port, recipients)
    assert codes == [250, 250, 452]
    assert "4.5.3 Too many recipients" in third


async def refusal_after(port: int, recipients: list[str]) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5) as client:
        await client.ehlo()
        await client.mail(ASSIGNEE)
        for recipient in recipients[:-1]:
            await client.rcpt(recipient)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(recipients[-1])
    return refused.value.message


async def test_a_request_with_max_pending_replies_waiting_gets_a_temporary_452_and_others_do_not(
    config: Config, store: Store
) -> None:
    flooded, other = request_id(1), request_id(2)
    flooded_address, other_address = pending_request(store, flooded), pending_request(store, other)
    async with listening(limited(config, max_pending_replies_per_request=2)) as edge:
        assert [await deliver(edge.port, flooded_address, n) for n in range(2)] == [250, 250]

        pushed_back = await refusal(edge.port, flooded_address)
        assert (pushed_back.code, await rcpt(edge.port, other_address)) == (452, [250])
        assert "4.2.2" in pushed_back.message

        first = stored(store)[0]
        assert first.id is not None
        assert first.request_id == flooded
        store.finish_inbound(first.id, "answered", flooded)  # one processed: room for one more
        assert await rcpt(edge.port, flooded_address) == [250]
    assert "request_busy" in edge.refusals


# -- tokens past their grace period ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "closed_days_ago", "code"),
    [
        (RequestStatus.ANSWERED, 1, 250),
        (RequestStatus.ANSWERED, 8, 550),
        (RequestStatus.RESUMED, 8, 550),
        (RequestStatus.CANCELLED, 8, 550),
    ],
)
async def test_a_request_closed_longer_ago_than_closed_grace_refuses_replies_at_rcpt(
    config: Config, store: Store, status: str, closed_days_ago: int, code: int
) -> None:
    closed_at = utcnow() - timedelta(days=closed_days_ago)
    recipient = pending_request(store, request_id(1), status=status, answered_at=closed_at)
    async with listening(limited(config, closed_grace="7d")) as edge:
        assert await rcpt(edge.port, recipient) == [code]
        if code == 550:
            refused = await refusal(edge.port, recipient)
            assert "answered or cancelled a while ago" in refused.message


@pytest.mark.parametrize(("issued_days_ago", "code"), [(10, 250), (15, 550)])
async def test_a_token_expired_longer_ago_than_expired_grace_is_refused_at_rcpt(
    config: Config, store: Store, issued_days_ago: int, code: int
) -> None:
    # [tokens].max_age is 7 days: issued 10 days ago, it expired 3 days ago (within the
    # grace, so its sender is told by mail); issued 15 days ago, 8 days ago.
    pending_request(store, request_id(1))
    recipient = address(request_id(1), issued=timedelta(days=issued_days_ago))
    async with listening(limited(config, expired_grace="7d")) as edge:
        assert await rcpt(edge.port, recipient) == [code]
        if code == 550:
            assert "has expired" in (await refusal(edge.port, recipient)).message


async def test_an_old_forged_token_is_refused_as_unknown_never_as_expired(
    config: Config, store: Store
) -> None:
    pending_request(store, request_id(1))
    forged = address(request_id(1), issued=timedelta(days=60), key="not-our-secret-key-0123456789")
    async with listening(config) as edge:
        refused = await refusal(edge.port, forged)
    assert refused.code == 550
    assert "No such reply address" in refused.message


# -- the bare local part --------------------------------------------------------------------


BARE = ["reply@reply.example.com", "REPLY@Reply.Example.COM", '"reply"@reply.example.com']


async def test_the_bare_reply_address_is_refused_in_any_spelling_by_default(
    config: Config,
) -> None:
    async with listening(config) as edge:
        for recipient in BARE:
            refused = await refusal(edge.port, recipient)
            assert refused.code == 550
            assert "Reply on the review email" in refused.message
    assert edge.refusals.count("bare_address") == len(BARE)


@pytest.mark.parametrize(
    "fallback",
    [
        {"thread_fallback": True},
        {"authentication": {"require": "dmarc", "trusted_authserv_ids": ["mx.example.com"]}},
    ],
    ids=["thread_fallback", "authentication"],
)
async def test_the_bare_reply_address_is_taken_where_the_thread_fallback_may_place_it(
    config: Config, fallback: dict[str, Any]
) -> None:
    async with listening(limited(config, **fallback)) as edge:
        assert await rcpt(edge.port, *BARE) == [250, 250, 250]


# -- raw messages past their retention ------------------------------------------------------


async def test_processed_replies_lose_their_raw_bytes_after_raw_retention_and_stay_duplicates(
    config: Config, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        assert store.store_inbound(f"mid:<{n}@x>", ASSIGNEE, ["r@x"], b"raw %d" % n, None)
    for row in stored(store)[:2]:
        assert row.id is not None
        store.finish_inbound(row.id, "answered", None)  # rows 0 and 1 done; row 2 still waiting
    purge = RawRetention(limited(config, raw_retention="0s"), store)
    stopping = asyncio.Event()
    running = asyncio.create_task(purge.run(stopping))
    try:
        await until(
            lambda: [r.raw for r in stored(store)] == [b"", b"", b"raw 2"], "the purge at start"
        )
    finally:
        stopping.set()
        await running
    assert [r.status for r in stored(store)] == ["purged", "purged", InboundStatus.NEW]
    assert store.store_inbound("mid:<0@x>", ASSIGNEE, ["r@x"], b"raw 0", None) is False


async def test_replies_processed_within_raw_retention_keep_their_raw_bytes(
    config: Config, store: Store
) -> None:
    assert store.store_inbound("mid:<0@x>", ASSIGNEE, ["r@x"], b"raw", None)
    [row] = stored(store)
    assert row.id is not None
    store.finish_inbound(row.id, "answered", None)

    assert await RawRetention(config, store).purge() == 0  # default retention: 7 days

    assert [r.raw for r in stored(store)] == [b"raw"]


# -- configuration and bookkeeping ----------------------------------------------------------


@pytest.mark.sqlite_only
def test_the_edge_limits_have_safe_defaults() -> None:
    inbound = InboundSettings(reply_domain=DOMAIN)
    assert inbound.max_message_size == 1_000_000
    assert inbound.takes_bare_address is False
    assert (inbound.closed_grace, inbound.expired_grace) == (timedelta(days=7), timedelta(days=7))
    assert inbound.idle_timeout == timedelta(seconds=30)
    assert (inbound.max_connections, inbound.max_connections_per_ip) == (100, 10)
    assert [str(n) for n in inbound.trusted_relays] == ["127.0.0.0/8", "::1/128"]


@pytest.mark.sqlite_only
def test_a_bad_edge_limit_is_reported_with_its_key_path() -> None:
    base: dict[str, Any] = {
        "daemon": {"secret_key": SECRET},
        "outbound": {"from_address": "reviews@example.com"},
    }
    inbound = {
        "reply_domain": DOMAIN,
        "trusted_relays": ["127.0.0.1", "postfix.local"],
        "max_recipients": 0,
        "idle_timeout": "soon",
    }
    with pytest.raises(ConfigError) as error:
        config_from_dict({**base, "inbound": inbound})
    problems = "\n".join(error.value.problems)
    assert "inbound.trusted_relays[1]: 'postfix.local' is not an IP address" in problems
    assert "inbound.max_recipients:" in problems
    assert "inbound.idle_timeout: 'soon' is not a duration" in problems


@pytest.mark.sqlite_only
def test_a_client_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert client_of(("192.0.2.7", 25)) == "192.0.2.7"
    assert client_of(("::ffff:192.0.2.7", 25, 0, 0)) == "192.0.2.7"
    assert client_of(("2001:db8:1:2:aaaa::1", 25, 0, 0)) == "2001:db8:1:2::/64"
    assert client_of(("2001:db8:1:2:bbbb::9", 25, 0, 0)) == "2001:db8:1:2::/64"


@pytest.mark.sqlite_only
def test_failures_of_clients_long_quiet_are_forgotten() -> None:
    now = [0.0]
    settings = InboundSettings(
        reply_domain=DOMAIN, trusted_relays=[], max_rcpt_failures_per_ip=2, rcpt_failure_window=10
    )
    guard = EdgeGuard(settings, clock=lambda: now[0])
    for n in range(1000):
        guard.failed(f"192.0.2.{n % 250}")
        now[0] += 0.001
    assert guard.throttled("192.0.2.1")
    now[0] += 11
    guard.failed("198.51.100.1")
    assert not guard.throttled("192.0.2.1")
    assert len(guard._failures) == 1
