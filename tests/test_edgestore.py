"""The SMTP edge's database operations (edgestore.py), on the backend under test.

Each test runs against the edge store `edge_store` picks for this database
(`SqliteEdge` or `AsyncpgEdge`) and against `PooledEdge`, which every other
database gets; rows written are read back through the ORM the answering
stage uses, so a column the edge encodes differently would show here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TypeVar

import pytest
from conftest import BACKEND, add_request
from sqlmodel import select

from hitl_mail.edgestore import AsyncpgEdge, EdgeStore, PooledEdge, SqliteEdge, edge_store
from hitl_mail.models import InboundMessage, InboundStatus, RequestStatus, utcnow
from hitl_mail.store import InboundItem, Store


@pytest.fixture(params=["native", "pooled"])
async def edge(request: pytest.FixtureRequest, store: Store) -> AsyncIterator[EdgeStore]:
    chosen = edge_store(store) if request.param == "native" else PooledEdge(store)
    yield chosen
    await chosen.close()


def stored_rows(store: Store) -> list[InboundMessage]:
    with store.session() as session:
        return list(session.exec(select(InboundMessage).order_by(InboundMessage.id)))  # type: ignore[arg-type]


def test_the_daemon_s_own_databases_get_an_edge_of_their_own(store: Store) -> None:
    expected = SqliteEdge if BACKEND == "sqlite" else AsyncpgEdge
    assert type(edge_store(store)) is expected


async def test_the_read_answers_the_assignee_and_nothing_for_an_unknown_request(
    edge: EdgeStore, store: Store
) -> None:
    add_request(store, "r1", assigned_to="owner@example.com")
    add_request(store, "r2")
    assert await edge.reply_target("r1") == ("owner@example.com", "pending", None, 0)
    assert await edge.reply_target("r2") == (None, "pending", None, 0)
    assert await edge.reply_target("nosuchrequest") is None


async def test_the_read_says_when_a_request_closed_and_how_many_of_its_replies_wait(
    edge: EdgeStore, store: Store
) -> None:
    answered_at = utcnow() - timedelta(days=3)
    add_request(store, "open", assigned_to="o@x")
    add_request(
        store, "answered", RequestStatus.ANSWERED, assigned_to="o@x", answered_at=answered_at
    )
    for n, request_id in enumerate(["open", "open", "open", "answered", "other"]):
        store.store_inbound(f"mid:<{n}@x>", "o@x", ["r@x"], b"m", request_id)
    store.finish_inbound(1, "answered", "open")  # processed: no longer waiting

    assert await edge.reply_target("open") == ("o@x", "pending", None, 2)
    closed = await edge.reply_target("answered")
    assert closed is not None
    assert (closed.status, closed.closed_at, closed.waiting) == ("answered", answered_at, 0)


async def test_reads_made_at_once_each_get_their_own_answer(edge: EdgeStore, store: Store) -> None:
    for n in range(10):
        add_request(store, f"r{n}", assigned_to=f"person{n}@example.com")
    ids = [f"r{n % 12}" for n in range(60)]  # r10 and r11 do not exist
    answers = await asyncio.gather(*(edge.reply_target(i) for i in ids))
    assert [a and a.assigned_to for a in answers] == [
        f"person{i[1:]}@example.com" if int(i[1:]) < 10 else None for i in ids
    ]


async def test_a_stored_message_reads_back_whole_and_a_second_delivery_is_a_duplicate(
    edge: EdgeStore, store: Store
) -> None:
    raw = b"Message-ID: <a@x>\r\nSubject: caf\xc3\xa9\r\n\r\napproved\r\n\x00\xff"
    item = InboundItem(
        "mid:<a@x>", "owner@example.com", ["reply+tok@reply.example.com", "b@x"], raw, "R1"
    )
    assert await edge.store(item) is True
    assert await edge.store(item) is False
    [row] = stored_rows(store)
    assert (row.dedupe_key, row.envelope_from, row.recipients, row.raw, row.request_id) == item
    assert (row.status, row.attempts, row.lease_until) == (InboundStatus.NEW, 0, None)
    assert abs((utcnow() - row.received_at).total_seconds()) < 60


async def test_messages_stored_at_once_share_commits_and_each_gets_its_own_answer(
    edge: EdgeStore, store: Store
) -> None:
    keys = [f"mid:<{n % 40}@x>" for n in range(60)]  # the last 20 repeat earlier ones
    results = await asyncio.gather(
        *(edge.store(InboundItem(key, "o@x", ["r@x"], key.encode())) for key in keys)
    )
    assert sum(results) == 40
    assert results[:40] == [True] * 40
    assert sorted(r.dedupe_key for r in stored_rows(store)) == sorted(set(keys))
    assert edge.store.runs < 20  # type: ignore[attr-defined]


@pytest.mark.skipif(
    BACKEND != "postgres", reason="SQLite stores any string; PostgreSQL refuses NUL"
)
async def test_one_message_the_database_refuses_does_not_refuse_the_others_stored_with_it(
    edge: EdgeStore, store: Store
) -> None:
    items = [
        InboundItem(f"mid:<{n}@x>", "o\x00@x" if n == 3 else "o@x", ["r@x"], b"m") for n in range(8)
    ]
    results = await asyncio.gather(*(edge.store(item) for item in items), return_exceptions=True)
    assert [isinstance(r, Exception) for r in results] == [n == 3 for n in range(8)]
    assert len(stored_rows(store)) == 7


E = TypeVar("E")


def own_edge(store: Store, kind: type[E]) -> E:
    """The edge `edge_store` picks for `store`, which must be `kind`, and a request r1 for o@x."""
    edge = edge_store(store)
    assert isinstance(edge, kind)
    add_request(store, "r1", assigned_to="o@x")
    return edge


@pytest.mark.sqlite_only
async def test_while_a_daemon_transaction_holds_sqlite_s_write_lock_the_loop_serves_on(
    store: Store,
) -> None:
    """The write waits for the lock in its thread; reads (RCPTs) are answered meanwhile."""
    import sqlite3

    edge = own_edge(store, SqliteEdge)
    daemon = sqlite3.connect(edge.path, isolation_level=None)
    daemon.execute("BEGIN IMMEDIATE")  # as one of the daemon's transactions does
    try:
        stored = asyncio.create_task(edge.store(InboundItem("mid:<1@x>", "o@x", ["r@x"], b"m")))
        for _ in range(20):  # the loop is free: reads go on while the write waits
            assert await edge.reply_target("r1") is not None
            await asyncio.sleep(0.005)
        assert not stored.done()
    finally:
        daemon.execute("COMMIT")
        daemon.close()
    assert await asyncio.wait_for(stored, 10) is True
    assert [r.dedupe_key for r in stored_rows(store)] == ["mid:<1@x>"]
    # With the lock free again, the next write takes the loop's own road.
    assert await edge.store(InboundItem("mid:<2@x>", "o@x", ["r@x"], b"m")) is True
    await edge.close()


@pytest.mark.skipif(BACKEND != "postgres", reason="the edge's own connections are PostgreSQL's")
async def test_a_connection_cut_in_mid_statement_fails_that_call_and_the_next_gets_a_new_one(
    store: Store,
) -> None:
    """The call whose statement was cut off raises (its SMTP command answers 451)."""
    import sqlalchemy as sa

    edge = own_edge(store, AsyncpgEdge)
    assert await edge.reply_target("r1") is not None
    first = await edge._fetch("read", "SELECT pg_backend_pid()")
    sleeping = asyncio.create_task(edge._fetch("read", "SELECT pg_sleep(30)"))
    await asyncio.sleep(0.3)
    with store.engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first[0][0]})
    import asyncpg

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await asyncio.wait_for(sleeping, 10)

    assert await edge.reply_target("r1") == ("o@x", "pending", None, 0)
    assert (await edge._fetch("read", "SELECT pg_backend_pid()"))[0][0] != first[0][0]
    await edge.close()
