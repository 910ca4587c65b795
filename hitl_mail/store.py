"""The database: one engine, migrations at start, and every read or claim the stages make.

Work moves between stages as rows. A stage takes a row with a conditional
update (`... WHERE status = 'x' AND lease expired`), so a crash leaves the row
to be taken again once its lease runs out and two daemons sharing one
PostgreSQL database never take the same row at once. Methods are synchronous;
the daemon calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import defer
from sqlmodel import Session, col, func, select

from hitl_mail import tokens
from hitl_mail.callbacks import BRIDGED_PREFIX
from hitl_mail.models import (
    AuditEvent,
    FeedbackRequest,
    InboundMessage,
    InboundStatus,
    OutboxMessage,
    OutboxStatus,
    RequestStatus,
    Timer,
    utcnow,
)

log = logging.getLogger(__name__)


class InboundItem(NamedTuple):
    """A received message as the SMTP edge stores it."""

    dedupe_key: str
    envelope_from: str
    recipients: list[str]
    raw: bytes
    request_id: str | None = None  # from the recipient's token: claims take turns per request


class ReplyTarget(NamedTuple):
    """What the SMTP edge reads at RCPT about the request a token names: one primary-key read."""

    assigned_to: str | None
    status: str
    closed_at: datetime | None  # when it left `pending` (None while it is pending)
    waiting: int  # its stored replies not yet processed (0 unless it is pending)


_MIGRATION_LOCK = 7_437_001  # pg_advisory_lock key: one migrator at a time
_BUSY_TIMEOUT_MS = 30_000  # how long an SQLite statement waits for a lock before failing
_READ_ONLY = "hitl_mail_read_only"  # execution option: a transaction that only reads


class NotFound(LookupError):
    """No request with that id."""


class Sending(NamedTuple):
    """A claimed outbox row, as the sending stage needs it (ORM objects cost more than the send)."""

    id: int
    request_id: str | None
    kind: str
    recipient: str
    message_id: str
    raw: bytes
    attempts: int


class Transition(NamedTuple):
    """One conditional state change of a request (see `Store.transition`)."""

    request_id: str
    from_status: tuple[str, ...]
    values: dict[str, Any]
    also: tuple[Any, ...] = ()
    finish_inbound: tuple[int, str] | None = None  # (inbound id, result): mark that reply done
    # Rows made inside the transaction once the change won (an event carrying
    # the request as it now is), and whether the request's timers stop with it.
    then: Callable[[Session], Sequence[Any]] | None = None
    stop_timers: bool = False
    expect: tuple[tuple[str, Any], ...] = ()  # (column, value): further conditions to move


@dataclass(frozen=True)
class Resumable:
    """What the resume stage needs of a claimed request (the worker loads the rest)."""

    id: str
    flow_class: str
    resume_attempts: int


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _create_private(sa.engine.make_url(url).database)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return sa.create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _create_private(path: str | None) -> None:
    """Create a missing SQLite file readable by its owner only (0600), whatever the umask.

    It holds replies, tokens' requests and flow state. SQLite creates the WAL
    and shared-memory files with the database file's permissions, so they
    are 0600 too. An existing file keeps the permissions its owner gave it.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError, FileNotFoundError):  # no folder: SQLite says so
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def sqlite_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we answer 250 (an SMTP 250 is a promise).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at BEGIN, so two writers queue for it instead of
    # failing with "database is locked" on lock upgrade. A read through
    # `Store.reader` takes no lock: its one SELECT is its own transaction, and
    # in WAL mode it neither waits for nor holds up a writer, so an RCPT check
    # never queues behind commits.
    if conn.get_execution_options().get(_READ_ONLY):
        return
    raw = conn.connection.dbapi_connection
    raw.execute("PRAGMA busy_timeout=0")
    try:
        wait_for_write_lock(raw)
    finally:
        raw.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")


def wait_for_write_lock(raw: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, retried every 0.2 ms at first, then up to every 5 ms.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between
    tries, so a writer that found the lock taken for 0.3 ms (one commit here)
    waited 1 ms or more; with the daemon's stages and resume workers all
    committing, those waits were most of a resume worker's time spent writing.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    pause = 0.0002
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY" or (
                time.monotonic() >= deadline
            ):
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


class Store:
    """All database access. Built once per process from `[daemon].database_url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.reader = self.engine.execution_options(**{_READ_ONLY: True})
        inbound = InboundMessage.__table__  # type: ignore[attr-defined]
        self._store_inbound = _insert_ignoring(
            self.engine.dialect.name, inbound, "dedupe_key"
        ).returning(inbound.c.dedupe_key)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for one SELECT: on SQLite it takes no write lock (see `_sqlite_begin_immediate`).

        A `session()` begins with BEGIN IMMEDIATE, so a plain read through it
        queued for the write lock behind every commit: during a drain the
        resume workers' request read waited up to 87 ms for it.
        """
        with Session(self.reader, expire_on_commit=False) as session:
            yield session

    # -- schema -----------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (safe to call from several processes)."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(resources.files("hitl_mail") / "migrations"))
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                    conn.commit()

    # -- requests and audit -----------------------------------------------

    def add(self, *rows: Any) -> None:
        """Insert rows in one transaction: a request, its audit events, its notification."""
        with self.session() as session:
            session.add_all(rows)
            session.commit()

    def get(self, request_id: str) -> FeedbackRequest:
        with self.reading() as session:
            row = session.get(FeedbackRequest, request_id)
        if row is None:
            raise NotFound(request_id)
        return row

    def find(self, request_id: str, *, with_state: bool = True) -> FeedbackRequest | None:
        """The request, or None; `with_state=False` leaves out the flow state and context.

        Those two columns are the large ones (the whole flow state as JSON) and
        only a resume needs them; reading them without it raises.
        """
        with self.reading() as session:
            return session.get(
                FeedbackRequest, request_id, options=() if with_state else _WITHOUT_STATE
            )

    def find_by_notification(self, message_ids: Sequence[str]) -> FeedbackRequest | None:
        """The request whose current notification has one of `message_ids` (the first listed wins).

        Without flow state, like `find(with_state=False)`. A reply that lost its
        token is matched this way, through its In-Reply-To and References.
        """
        if not message_ids:
            return None
        query = (
            select(FeedbackRequest)
            .where(col(FeedbackRequest.notification_id).in_(message_ids))
            .options(*_WITHOUT_STATE)
        )
        with self.reading() as session:
            found = {row.notification_id: row for row in session.exec(query)}
        return next((found[m] for m in message_ids if m in found), None)

    def reply_target(self, request_id: str) -> ReplyTarget | None:
        """Whom a request is assigned to, its status, when it closed, its waiting replies.

        The SMTP edge asks this at every RCPT, so it is one statement (no write
        lock on SQLite) reading a few columns and an index count, instead of
        loading the whole request. None: no such request.
        """
        with self.reader.connect() as conn:
            row = conn.execute(_REPLY_TARGET, {"rid": request_id}).one_or_none()
        return None if row is None else ReplyTarget(*row)

    def requests(self, status: str | None = None, limit: int = 1000) -> list[FeedbackRequest]:
        query = select(FeedbackRequest).order_by(col(FeedbackRequest.created_at).desc())
        if status:
            query = query.where(FeedbackRequest.status == status)
        with self.reading() as session:
            return list(session.exec(query.limit(limit)))

    def counts_by_status(self) -> dict[str, int]:
        query = select(FeedbackRequest.status, func.count()).group_by(FeedbackRequest.status)
        with self.reading() as session:
            return {status: count for status, count in session.exec(query)}

    def trail(self, request_id: str) -> list[AuditEvent]:
        query = (
            select(AuditEvent)
            .where(AuditEvent.request_id == request_id)
            .order_by(col(AuditEvent.at), col(AuditEvent.id))
        )
        with self.reading() as session:
            return list(session.exec(query))

    def transition(
        self,
        request_id: str,
        from_status: Sequence[str],
        values: dict[str, Any],
        also: Sequence[Any] = (),
        finish_inbound: tuple[int, str] | None = None,
    ) -> bool:
        """Move a request on only if it is still in one of `from_status`; insert `also` with it.

        This one conditional update is what makes "answered at most once"
        hold whatever races: the loser's update matches no row.
        """
        change = Transition(request_id, tuple(from_status), values, tuple(also), finish_inbound)
        return self.transitions([change])[0]

    def transitions(self, changes: Sequence[Transition]) -> list[bool]:
        """Several `transition`s in one transaction (one commit); which of them moved their request.

        A change that loses its race writes nothing (neither `also` nor the
        inbound row), as if it had been made alone. If any statement fails,
        nothing is written.
        """
        with self.session() as session:
            won = apply(session, changes)
            if not any(won):
                session.rollback()
                return won
            session.commit()
        return won

    # -- resume queue -------------------------------------------------------

    def claim_resumable(self, limit: int, lease: timedelta) -> list[Resumable]:
        """Lease up to `limit` requests to resume: failed ones due again, then answered ones oldest first."""
        now = utcnow()
        rows = self._claim(FeedbackRequest, _RESUMABLE, now, limit, lease, _RESUMABLE_COLUMNS)
        return [Resumable(*row) for row in rows]

    def renew_lease(self, request_id: str, lease: timedelta) -> None:
        self._set_lease(request_id, utcnow() + lease)

    def release_lease(self, request_id: str) -> None:
        self._set_lease(request_id, None)

    def _set_lease(self, request_id: str, until: datetime | None) -> None:
        with self.session() as session:
            session.execute(
                sa.update(FeedbackRequest)
                .where(col(FeedbackRequest.id) == request_id)
                .values(lease_until=until)
            )
            session.commit()

    # -- timers -------------------------------------------------------------------

    def next_timer_due(self) -> datetime | None:
        query = select(func.min(Timer.due_at)).where(col(Timer.fired_at).is_(None))
        with self.reading() as session:
            return session.exec(query).one()

    def due_timers(self, limit: int) -> list[Timer]:
        query = (
            select(Timer)
            .where(col(Timer.fired_at).is_(None))
            .where(col(Timer.due_at) <= utcnow())
            .order_by(col(Timer.due_at), col(Timer.id))
            .limit(limit)
        )
        with self.reading() as session:
            return list(session.exec(query))

    def timers_of(self, request_id: str) -> list[Timer]:
        query = select(Timer).where(Timer.request_id == request_id).order_by(col(Timer.due_at))
        with self.reading() as session:
            return list(session.exec(query))

    def fire_timer(
        self, timer_id: int, act: Callable[[FeedbackRequest], Transition | None]
    ) -> bool:
        """Claim the timer (the one conditional update that wins) and change its request, atomically.

        `act` gets the request (detached: what it sets on it is not written)
        and returns the change to make, or None when the request no longer
        needs it; the timer is marked fired either way, so it never fires twice.
        """
        with self.session() as session:
            claimed = session.execute(
                sa.update(Timer)
                .where(col(Timer.id) == timer_id)
                .where(col(Timer.fired_at).is_(None))
                .values(fired_at=utcnow())
            )
            if getattr(claimed, "rowcount", 0) != 1:
                session.rollback()
                return False
            timer = session.get(Timer, timer_id)
            request = session.get(FeedbackRequest, timer.request_id) if timer else None
            change = None
            if request is not None:
                session.expunge(request)
                change = act(request)
            acted = change is not None and apply(session, [change])[0]
            session.commit()
            return acted

    # -- outbox ---------------------------------------------------------------

    def claim_outbox(self, limit: int, lease: timedelta) -> list[Sending]:
        """Lease up to `limit` due messages; what sending needs of each, straight from the UPDATE."""
        now = utcnow()
        return [
            Sending(*row)
            for row in self._claim(OutboxMessage, _SENDABLE, now, limit, lease, _SENDING_COLUMNS)
        ]

    def update_outbox(self, message_id: int, also: Sequence[Any] = (), **values: Any) -> None:
        with self.session() as session:
            session.execute(
                sa.update(OutboxMessage).where(col(OutboxMessage.id) == message_id).values(**values)
            )
            session.add_all(also)
            session.commit()

    def update_outbox_many(
        self, updates: Sequence[tuple[int, dict[str, Any]]], events: Sequence[AuditEvent] = ()
    ) -> None:
        """Several outbox rows changed, (id, values) each, and their audit events, in one commit.

        Core statements, not ORM objects: the sending stage marks every sent
        message, and an ORM UPDATE cost more than the sending itself.
        """
        outbox = OutboxMessage.__table__  # type: ignore[attr-defined]
        audit = AuditEvent.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            for keys, params in _by_keys(updates).items():
                statement = (
                    sa.update(outbox)
                    .where(outbox.c.id == sa.bindparam("_id"))
                    .values({key: sa.bindparam(key) for key in keys})
                )
                conn.execute(statement, params)  # one executemany per shape of change
            if events:
                conn.execute(
                    sa.insert(audit),
                    [
                        {c.name: getattr(e, c.name) for c in audit.columns if c.name != "id"}
                        for e in events
                    ],
                )

    def next_outbox_due(self) -> datetime | None:
        query = select(func.min(OutboxMessage.next_attempt_at)).where(
            OutboxMessage.status == OutboxStatus.QUEUED
        )
        with self.reading() as session:
            return session.exec(query).one()

    def outbox_for(self, request_id: str) -> list[OutboxMessage]:
        query = (
            select(OutboxMessage)
            .where(OutboxMessage.request_id == request_id)
            .order_by(col(OutboxMessage.id))
        )
        with self.reading() as session:
            return list(session.exec(query))

    # -- inbound --------------------------------------------------------------

    def store_inbound(
        self,
        dedupe_key: str,
        envelope_from: str,
        recipients: list[str],
        raw: bytes,
        request_id: str | None = None,
    ) -> bool:
        """Durably store a received message; False when the same message is already stored."""
        item = InboundItem(dedupe_key, envelope_from, recipients, raw, request_id)
        return self.store_inbound_many([item])[0]

    def store_inbound_many(self, messages: Sequence[InboundItem]) -> list[bool]:
        """Store several received messages with ONE statement and ONE commit.

        Each item is an `InboundItem`; the result says, per item, whether it
        was stored (False: a message with that key is already stored, or came
        earlier in the same batch). Either
        every message is committed or, on an exception, none is. The INSERT
        skips duplicate keys and RETURNs the keys it stored (SQLite ≥ 3.35).
        The rows go as executemany parameters, which SQLAlchemy sends as one
        multi-row INSERT from one cached compilation; rows spelt out with
        `.values(rows)` were compiled afresh for each batch, at 75 µs a row.
        """
        if not messages:
            return []
        now = utcnow()
        rows = [
            {
                "dedupe_key": key,
                "envelope_from": envelope_from,
                "recipients": recipients,
                "raw": raw,
                "received_at": now,
                "status": InboundStatus.NEW,
                "attempts": 0,
                "request_id": request_id,
            }
            for key, envelope_from, recipients, raw, request_id in messages
        ]
        with self.engine.begin() as conn:
            inserted = set(conn.execute(self._store_inbound, rows).scalars())
        return stored_flags([key for key, *_ in messages], inserted)

    def claim_inbound(
        self, limit: int, lease: timedelta, busy: Collection[str] = ()
    ) -> list[InboundMessage]:
        """Lease stored replies to process, taking turns per request: the oldest of each first.

        At most one reply per request (per envelope sender for replies that
        name none) in one claim, and none for the requests in `busy` (their
        replies already in hand); requests with fewer replies waiting come
        first. A flood of replies to some requests waits its turn behind one
        reply to each other request, never in front of it.
        """
        params = {"busy": list(busy)}
        return self._claim(InboundMessage, _UNANSWERED, utcnow(), limit, lease, params=params)

    def renew_inbound_leases(self, inbound_ids: Sequence[int], lease: timedelta) -> None:
        """Extend the leases of stored replies this daemon is still working on."""
        with self.session() as session:
            session.execute(
                sa.update(InboundMessage)
                .where(col(InboundMessage.id).in_(list(inbound_ids)))
                .where(col(InboundMessage.status) == InboundStatus.NEW)
                .values(lease_until=utcnow() + lease)
            )
            session.commit()

    def finish_inbound(
        self, inbound_id: int, result: str, request_id: str | None, also: Sequence[Any] = ()
    ) -> None:
        with self.session() as session:
            finish_replies(session, [(inbound_id, result, request_id)])
            session.add_all(also)
            session.commit()

    def purge_raw(self, received_before: datetime, limit: int) -> int:
        """Clear the raw bytes of processed replies received before `received_before`; how many.

        Looks at the `limit` oldest processed replies only (ix_inbound_due), so
        each call costs the same however many were purged before; a result
        under `limit` means the rest are younger. The row stays, with its
        dedupe key, sender, request and result: a late re-delivery is still
        a duplicate, and the reply's text stays in the audit trail.
        """
        oldest = (
            sa.select(_inbound.c.id)
            .where(_inbound.c.status == InboundStatus.DONE)
            .order_by(_inbound.c.id)
            .limit(limit)
        )
        purge = (
            sa.update(_inbound)
            .where(_inbound.c.id.in_(oldest.scalar_subquery()))
            .where(_inbound.c.received_at < received_before)
            .values(raw=b"", status=InboundStatus.PURGED)
        )
        with self.session() as session:
            purged: int = session.execute(purge).rowcount  # type: ignore[attr-defined]
            session.commit()
        return purged

    # -- shared claim ---------------------------------------------------------

    def _claim(
        self,
        table: Any,
        candidates: Any,
        now: datetime,
        limit: int,
        lease: timedelta,
        columns: tuple[Any, ...] | None = None,
        params: dict[str, Any] | None = None,
    ) -> list[Any]:
        """Lease the candidate rows whose lease is free, in one conditional update; return those won.

        `candidates` selects ids with the bound parameters `now` and `limit`
        (and `params`).
        The update's RETURNING names exactly the rows this caller leased: a
        row another daemon leased in between fails the condition and is not
        returned. With `columns`, those columns of the won rows come back as
        tuples, straight from the update, instead of whole ORM objects. The
        statements are built once (module level, `_claim_update`): building
        them at every claim cost more than running them.

        The candidates are first looked for without the write lock: most
        polls find none, and on SQLite each stage's poll took the lock from
        the SMTP edge's commits four times a second, a burst included.
        """
        bound = {"now": now, "limit": limit, **(params or {})}
        with self.reading() as session:
            if session.execute(candidates, bound).first() is None:
                return []
        with self.session() as session:
            ids = list(session.execute(candidates, bound).scalars())
            if not ids:
                session.rollback()
                return []
            returned = list(
                session.connection().execute(
                    _claim_update(table.__table__, columns),
                    {"ids": ids, "now": now, "until": now + lease},
                )
            )
            session.commit()
            if columns is not None:  # in the candidates' order
                order = {row_id: index for index, row_id in enumerate(ids)}
                return sorted((tuple(row) for row in returned), key=lambda row: order[row[0]])
            won = [row[0] for row in returned]
            if not won:
                return []
            return list(session.exec(select(table).where(table.id.in_(won)).order_by(table.id)))


@functools.cache
def _claim_update(rows: Any, columns: tuple[Any, ...] | None) -> Any:
    return (
        sa.update(rows)
        .where(rows.c.id.in_(sa.bindparam("ids", expanding=True)))
        .where(_lease_free(rows))
        .values(lease_until=sa.bindparam("until"))
        .returning(*(columns or (rows.c.id,)))
    )


def _lease_free(rows: Any) -> Any:
    return sa.or_(rows.c.lease_until.is_(None), rows.c.lease_until < sa.bindparam("now"))


def _candidates(rows: Any, status: str, order: Any, *where: Any) -> Any:
    return (
        sa.select(rows.c.id)
        .where(rows.c.status == status, _lease_free(rows), *where)
        .order_by(*order)
        .limit(sa.bindparam("limit"))
    )


_requests = FeedbackRequest.__table__  # type: ignore[attr-defined]
# Built once: options made afresh at each call cost a quarter of the read.
_WITHOUT_STATE = tuple(
    defer(getattr(FeedbackRequest, name), raiseload=True) for name in ("state", "context")
)
# Two candidate lists, each read in index order and cut at the limit: one query
# with OR over both sorted every answered request at each claim, milliseconds
# per resume under a backlog of thousands (ix_requests_resumable, migration 0003).
# A bridged request is resumed on crewAI's hosted platform, by a POST from the
# HTTP outbox (callbacks.py), never by importing a flow here.
_LOCAL_FLOW = sa.not_(_requests.c.flow_class.startswith(BRIDGED_PREFIX, autoescape=True))
_failed_due = _candidates(
    _requests,
    RequestStatus.RESUME_FAILED,
    [_requests.c.resume_after],
    _requests.c.resume_after <= sa.bindparam("now"),
    _LOCAL_FLOW,
).subquery()
_answered = _candidates(
    _requests, RequestStatus.ANSWERED, [_requests.c.answered_at], _LOCAL_FLOW
).subquery()
_RESUMABLE = sa.union_all(sa.select(_failed_due.c.id), sa.select(_answered.c.id)).limit(
    sa.bindparam("limit")
)
_RESUMABLE_COLUMNS = (_requests.c.id, _requests.c.flow_class, _requests.c.resume_attempts)

_outbox = OutboxMessage.__table__  # type: ignore[attr-defined]
_SENDABLE = _candidates(
    _outbox,
    OutboxStatus.QUEUED,
    [_outbox.c.next_attempt_at, _outbox.c.id],
    _outbox.c.next_attempt_at <= sa.bindparam("now"),
)
_SENDING_COLUMNS = tuple(getattr(_outbox.c, name) for name in Sending._fields)

_inbound = InboundMessage.__table__  # type: ignore[attr-defined]
# Turns are counted among the oldest FAIR_WINDOW waiting replies: the ranking
# sorts them at each claim, so its cost stays bounded (a few milliseconds)
# whatever the backlog; beyond the window, replies wait oldest first.
FAIR_WINDOW = 5000
_waiting = (
    sa.select(
        _inbound.c.id,
        sa.func.coalesce(_inbound.c.request_id, "from:" + _inbound.c.envelope_from).label("whose"),
    )
    .where(
        _inbound.c.status == InboundStatus.NEW,
        _lease_free(_inbound),
        sa.or_(
            _inbound.c.request_id.is_(None),
            _inbound.c.request_id.not_in(sa.bindparam("busy", expanding=True)),
        ),
    )
    .order_by(_inbound.c.id)
    .limit(FAIR_WINDOW)
    .subquery()
)
# The oldest reply of each request, the requests with the fewest replies waiting
# first: one flooded with replies takes its turn after every quiet one.
_turns = sa.select(
    _waiting.c.id,
    sa.func.row_number().over(partition_by=_waiting.c.whose, order_by=_waiting.c.id).label("turn"),
    sa.func.count().over(partition_by=_waiting.c.whose).label("queued"),
).subquery()
_UNANSWERED = (
    sa.select(_turns.c.id)
    .where(_turns.c.turn == 1)
    .order_by(_turns.c.queued, _turns.c.id)
    .limit(sa.bindparam("limit"))
)


_pending = _requests.c.status == RequestStatus.PENDING
_REPLY_TARGET = sa.select(
    _requests.c.assigned_to,
    _requests.c.status,
    # Answering and cancelling both set answered_at; created_at stands in for a row without one.
    sa.case(
        (_pending, None), else_=sa.func.coalesce(_requests.c.answered_at, _requests.c.created_at)
    ),
    sa.case(
        (
            _pending,
            sa.select(sa.func.count())
            .where(_inbound.c.request_id == _requests.c.id, _inbound.c.status == InboundStatus.NEW)
            .scalar_subquery(),
        ),
        else_=0,
    ),
).where(_requests.c.id == sa.bindparam("rid"))


def stored_flags(keys: Sequence[str], inserted: set[str]) -> list[bool]:
    """Per key, in order, whether an INSERT that RETURNed `inserted` stored it.

    A key that comes twice in one batch was stored once: its second copy is a
    duplicate like any other.
    """
    left = set(inserted)
    flags = []
    for key in keys:
        flags.append(key in left)
        left.discard(key)
    return flags


def _by_keys(
    updates: Sequence[tuple[int, dict[str, Any]]],
) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row_id, values in updates:
        grouped.setdefault(tuple(sorted(values)), []).append({"_id": row_id, **values})
    return grouped


def _insert_ignoring(dialect: str, table: Any, unique_column: str) -> Any:
    """INSERT ... ON CONFLICT (unique_column) DO NOTHING, for SQLite and PostgreSQL."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=[unique_column])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing(index_elements=[unique_column])


def advance(
    session: Session,
    request_id: str,
    from_status: Sequence[str],
    values: dict[str, Any],
    expect: tuple[tuple[str, Any], ...] = (),
) -> bool:
    """The conditional update behind every state change of a request (see `Store.transition`).

    A core UPDATE on the session's connection (same transaction): the ORM's
    bulk-update path, which also synchronises loaded objects, cost more than
    the rest of answering a reply. `expect` adds (column, value) conditions.
    """
    requests = FeedbackRequest.__table__  # type: ignore[attr-defined]
    result = session.connection().execute(
        sa.update(requests)
        .where(requests.c.id == request_id)
        .where(requests.c.status.in_(list(from_status)))
        .where(*(requests.c[name] == value for name, value in expect))
        .values(**values)
    )
    return result.rowcount == 1


def apply(session: Session, changes: Sequence[Transition]) -> list[bool]:
    """Make each change in the session's transaction (not committed); which of them won.

    A change that loses its race writes nothing: neither its rows, nor its
    reply marked done, nor its `then`.
    """
    won: list[bool] = []
    rows: list[Any] = []
    finished: list[tuple[int, str, str | None]] = []
    stopped: list[str] = []
    for change in changes:
        moved = advance(
            session, change.request_id, change.from_status, change.values, change.expect
        )
        won.append(moved)
        if not moved:
            continue
        rows.extend(change.also)
        if change.then is not None:
            rows.extend(change.then(session))
        if change.finish_inbound is not None:
            finished.append((*change.finish_inbound, change.request_id))
        if change.stop_timers:
            stopped.append(change.request_id)
    insert_rows(session, rows)
    if finished:
        finish_replies(session, finished)
    if stopped:
        session.connection().execute(
            sa.update(Timer)
            .where(col(Timer.request_id).in_(stopped))
            .where(col(Timer.fired_at).is_(None))
            .values(fired_at=utcnow())
        )
    return won


def insert_rows(session: Session, rows: Sequence[Any]) -> None:
    """Insert new table objects (audit events, outbox rows) with core INSERTs, one per table.

    What `session.add_all` + flush would write, without the unit of work: the
    objects' own defaults are already set, and nobody reads their ids back.
    """
    by_shape: dict[tuple[Any, tuple[str, ...]], list[dict[str, Any]]] = {}
    for row in rows:
        table = type(row).__table__
        values = {
            c.name: getattr(row, c.name)
            for c in table.columns
            if not (c.primary_key and getattr(row, c.name) is None)
        }
        by_shape.setdefault((table, tuple(values)), []).append(values)
    for (table, _), batch in by_shape.items():
        session.connection().execute(sa.insert(table), batch)


_FINISH_INBOUND = (
    sa.update(_inbound)
    .where(_inbound.c.id == sa.bindparam("inbound_id"))
    .values(
        status=InboundStatus.DONE,
        result=sa.bindparam("outcome_of_reply"),
        request_id=sa.bindparam("rid"),
    )
)


def finish_replies(session: Session, finished: Sequence[tuple[int, str, str | None]]) -> None:
    """Mark stored replies done: (inbound id, result, request id) each, in one statement."""
    session.connection().execute(
        _FINISH_INBOUND,
        [
            {"inbound_id": inbound_id, "outcome_of_reply": result, "rid": request_id}
            for inbound_id, result, request_id in finished
        ],
    )


def audit_event(
    request_id: str | None, event: str, actor: str, source: str | None = None, detail: Any = None
) -> AuditEvent:
    """One audit row; tokens in actor and detail are cut to a prefix, for every caller (SPEC 9)."""
    return AuditEvent(
        request_id=request_id,
        at=utcnow(),
        event=event,
        actor=tokens.redact(actor),
        source=source,
        detail=tokens.redacted(detail),
    )
