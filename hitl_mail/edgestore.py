"""The SMTP edge's two database operations: the RCPT read and the DATA write.

Every RCPT to a tokened address asks who the request is assigned to, whether
it is still pending (and if not, since when) and how many of its replies wait
to be processed, in one primary-key read; every DATA stores the raw message
and commits before the 250. Through the pooled engine in worker threads the
read alone cost 0.6 ms of CPU per reply (thread hand-off, pool checkout,
pre-ping and reset, statement compile), more than aiosmtpd spends on the
whole SMTP transaction. So the edge keeps connections of its own, chosen by
database:

- SQLite (`SqliteEdge`): the read runs inline on the event loop through a
  `query_only` connection: a primary-key read in WAL mode takes microseconds
  and never waits for a writer. The write runs inline too when the write lock
  is free at once (an INSERT and an fsync, about 0.3 ms); when one of the
  daemon's transactions holds it, the write waits for it in a thread of its
  own, so the edge never waits on the daemon's writers with its loop.
- PostgreSQL (`AsyncpgEdge`): two asyncpg connections on the event loop,
  one for reads and one for writes, each statement one round trip; opened at
  first use and again after an error.
- anything else (an in-memory SQLite, another driver): both through `Store`
  in worker threads (`PooledEdge`).

Both operations are coalesced (`Coalesce`): calls that arrive while one runs
share the next statement, so under load one commit (one fsync) stores many
replies and one query checks many RCPTs. An error reaches the caller, which
answers 451 (try again later); nothing is half-stored.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from hitl_mail.models import InboundMessage, InboundStatus, RequestStatus, utcnow
from hitl_mail.store import (
    InboundItem,
    ReplyTarget,
    Store,
    sqlite_pragmas,
    stored_flags,
    wait_for_write_lock,
)
from hitl_mail.waiting import Coalesce

if TYPE_CHECKING:
    import asyncpg

# The columns of `ReplyTarget`, for a request aliased `r`: one primary-key read, and
# for a pending request an index count (ix_inbound_waiting) of its replies in `inbound`.
_TARGET_COLUMNS = (
    "r.assigned_to, r.status,"
    f" CASE WHEN r.status = '{RequestStatus.PENDING}' THEN NULL"
    " ELSE coalesce(r.answered_at, r.created_at) END,"
    f" CASE WHEN r.status = '{RequestStatus.PENDING}' THEN (SELECT count(*) FROM inbound i"
    f" WHERE i.request_id = r.id AND i.status = '{InboundStatus.NEW}') ELSE 0 END"
)
SQLITE_BUSY_TIMEOUT_MS = 200  # a WAL reader waits only while a crashed writer's WAL is recovered
PG_CONNECT_TIMEOUT_S = 10
PG_APPLICATION_NAME = "hitl-mail-edge"  # how the edge's connections show in pg_stat_activity


class EdgeStore(Protocol):
    async def reply_target(self, request_id: str) -> ReplyTarget | None:
        """What RCPT needs to know of a request (None: no such request)."""
        ...

    async def store(self, item: InboundItem) -> bool:
        """Store a received message durably; False when the same message is already stored."""
        ...

    async def close(self) -> None: ...


def edge_store(store: Store) -> EdgeStore:
    url = sa.engine.make_url(store.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SqliteEdge(store, str(url.database))
    if url.get_backend_name() == "postgresql" and _has_asyncpg():
        return AsyncpgEdge(url.set(drivername="postgresql").render_as_string(hide_password=False))
    return PooledEdge(store)


def _has_asyncpg() -> bool:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return False
    return True


def _committer(
    write: Callable[[list[InboundItem]], Awaitable[list[bool]]], max_batch: int = 256
) -> Coalesce[InboundItem, bool]:
    return Coalesce(write, name="inbound-group-commit", max_batch=max_batch, split_on_error=True)


class PooledEdge:
    """Both operations through `Store` in worker threads: any database SQLAlchemy speaks."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.store = _committer(self._write)

    async def reply_target(self, request_id: str) -> ReplyTarget | None:
        return await asyncio.to_thread(self._store.reply_target, request_id)

    async def _write(self, items: list[InboundItem]) -> list[bool]:
        return await asyncio.to_thread(self._store.store_inbound_many, items)

    async def close(self) -> None:
        await self.store.wait_idle()


class SqliteEdge:
    """The read inline on a `query_only` connection; the write on a connection of its own.

    The write goes straight to `sqlite3`: through the pooled engine each
    commit cost 280 µs of CPU before its first row (checkout, events, reset),
    this way 90 µs. It runs on the event loop when `BEGIN IMMEDIATE` gets the
    write lock at the first try: handed to a thread, the same write took 1.7
    ms instead of 0.5 (p50, 3 replies a batch, during a burst), the thread
    waiting for the GIL and the loop for the thread's wake-up, and every 250
    waited that long. When the lock is taken, the batch goes to one thread of
    its own, which waits for it (`wait_for_write_lock`) while the loop serves
    other sessions. Values are encoded by the columns' own SQLAlchemy types,
    so the rows read back through the ORM exactly as rows it wrote.
    """

    READ = f"SELECT {_TARGET_COLUMNS} FROM requests r WHERE r.id = ?"
    WRITE = (
        "INSERT INTO inbound (dedupe_key, envelope_from, recipients, raw, received_at, status,"
        " request_id, attempts) VALUES {rows}"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key"
    )
    MAX_BATCH = 100  # 7 parameters a row, under SQLite's oldest limit of 999

    def __init__(self, store: Store, path: str) -> None:
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbound-commit")
        self.store = _committer(self._write, max_batch=self.MAX_BATCH)
        columns = InboundMessage.__table__.c  # type: ignore[attr-defined]
        dialect = store.engine.dialect
        as_is: Callable[[Any], Any] = lambda value: value  # noqa: E731
        self._encode_recipients = columns.recipients.type.bind_processor(dialect) or as_is
        self._encode_time = columns.received_at.type.bind_processor(dialect) or as_is
        time_type = columns.received_at.type.dialect_impl(dialect)
        self._decode_time = time_type.result_processor(dialect, None) or as_is

    async def reply_target(self, request_id: str) -> ReplyTarget | None:
        if self._reader is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only=ON")
            self._reader = conn
        row = self._reader.execute(self.READ, (request_id,)).fetchone()
        if row is None:
            return None
        assigned_to, status, closed_at, waiting = row
        return ReplyTarget(assigned_to, status, self._decode_time(closed_at), waiting)

    async def _write(self, items: list[InboundItem]) -> list[bool]:
        conn = self._writer_connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY":
                raise
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._writing, self._wait_and_write, items)
        return self._insert_and_commit(conn, items)

    def _writer_connection(self) -> sqlite3.Connection:
        if self._writer is None:
            conn = sqlite3.connect(self.path, check_same_thread=False)
            sqlite_pragmas(conn)
            conn.execute("PRAGMA busy_timeout=0")  # never wait inside the loop; see _write
            self._writer = conn
        return self._writer

    def _wait_and_write(self, items: list[InboundItem]) -> list[bool]:
        conn = self._writer_connection()
        wait_for_write_lock(conn)
        return self._insert_and_commit(conn, items)

    def _insert_and_commit(self, conn: sqlite3.Connection, items: list[InboundItem]) -> list[bool]:
        """INSERT `items` and COMMIT, inside the write transaction `conn` has begun."""
        received_at, status = self._encode_time(utcnow()), InboundStatus.NEW
        params: list[Any] = []
        for key, sender, recipients, raw, request_id in items:
            recipients_json = self._encode_recipients(recipients)
            params += (key, sender, recipients_json, raw, received_at, status, request_id)
        query = self.WRITE.format(rows=",".join(["(?,?,?,?,?,?,?,0)"] * len(items)))
        try:
            inserted = {row[0] for row in conn.execute(query, params)}
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return stored_flags([key for key, *_ in items], inserted)

    async def close(self) -> None:
        await self.store.wait_idle()
        self._writing.shutdown(wait=True)
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._writer = None


class AsyncpgEdge:
    """Both operations on asyncpg connections of their own, one statement each.

    asyncpg speaks PostgreSQL's binary protocol from C: measured against
    psycopg's async connections doing the same statements, the listener
    spent 113-128 µs of CPU per RCPT read instead of 208-367, and 205-303 µs
    per three-reply INSERT instead of 607-720 (the 3.4 KB bodies go as
    binary, not as hex text the server decodes again). Statements are
    prepared once per connection (asyncpg's statement cache); each runs as
    its own transaction, so a batch is stored, or not, whole.
    """

    READ = f"SELECT r.id, {_TARGET_COLUMNS} FROM requests r WHERE r.id = ANY($1::text[])"
    # One statement, so one round trip and one transaction for a whole batch.
    WRITE = (
        "INSERT INTO inbound"
        " (dedupe_key, envelope_from, recipients, raw, request_id, received_at, status, attempts)"
        " SELECT k, f, r::json, b, q, $1, $2, 0"
        " FROM unnest($3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[])"
        " AS t(k, f, r, b, q)"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key"
    )

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conns: dict[str, asyncpg.Connection] = {}
        self._read: Coalesce[str, ReplyTarget | None] = Coalesce(
            self._read_many, name="rcpt-lookup"
        )
        self.store = _committer(self._write)

    async def reply_target(self, request_id: str) -> ReplyTarget | None:
        return await self._read(request_id)

    async def _read_many(self, request_ids: list[str]) -> list[ReplyTarget | None]:
        rows = await self._fetch("read", self.READ, request_ids)
        found = {str(row[0]): ReplyTarget(*row[1:]) for row in rows}
        return [found.get(i) for i in request_ids]

    async def _write(self, items: list[InboundItem]) -> list[bool]:
        keys, senders, recipients, raws, request_ids = zip(*items, strict=True)
        rows = await self._fetch(
            "write",
            self.WRITE,
            utcnow(),
            InboundStatus.NEW,
            list(keys),
            list(senders),
            [json.dumps(r) for r in recipients],
            list(raws),
            list(request_ids),
        )
        return stored_flags(keys, {row[0] for row in rows})

    async def _fetch(self, role: str, query: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = self._conns.get(role)
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(
                self.dsn,
                timeout=PG_CONNECT_TIMEOUT_S,
                server_settings={"application_name": PG_APPLICATION_NAME},
            )
            self._conns[role] = conn
        try:
            return list(await conn.fetch(query, *args))
        except asyncpg.PostgresError:
            raise  # the server refused this statement; the connection is fine
        except BaseException:
            # Broken, timed out or cancelled mid-statement: replaced at the next
            # call; this batch answers 451.
            del self._conns[role]
            conn.terminate()
            raise

    async def close(self) -> None:
        await self._read.wait_idle()
        await self.store.wait_idle()
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()
