"""The HTTP outbox as a queue: claim due POSTs in order, record each attempt.

The table is written by state changes (webhooks.py builds the rows) and read
here by the delivery stage. A claim leases rows of one destination whose turn
it is: due, lease free, and no earlier row of the same request to the same
destination still waiting (pending, or in flight as `sending`), so a
webhook sees one request's events in the order they happened. A claimed row
is `sending` until its attempt is recorded; a daemon killed mid-POST leaves
it leased, and once the lease runs out it is claimed and POSTed again
(at-least-once; receivers deduplicate by `event_id`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from hitl_mail.models import AuditEvent, HttpOutboxRow, HttpOutboxStatus, utcnow
from hitl_mail.store import Store, insert_rows

_rows = HttpOutboxRow.__table__  # type: ignore[attr-defined]
_WAITING = (HttpOutboxStatus.PENDING, HttpOutboxStatus.SENDING)
_lease_free = sa.or_(_rows.c.lease_until.is_(None), _rows.c.lease_until < sa.bindparam("now"))
_earlier = _rows.alias("earlier")
_TURN = (
    sa.select(_rows.c.id)
    .where(
        _rows.c.destination == sa.bindparam("destination"),
        _rows.c.status.in_(_WAITING),
        _rows.c.next_attempt_at <= sa.bindparam("now"),
        _lease_free,
        ~sa.exists().where(
            _earlier.c.request_id == _rows.c.request_id,
            _earlier.c.destination == _rows.c.destination,
            _earlier.c.id < _rows.c.id,
            _earlier.c.status.in_(_WAITING),
        ),
    )
    .order_by(_rows.c.next_attempt_at, _rows.c.id)
    .limit(sa.bindparam("limit"))
)


@dataclass(frozen=True)
class Claimed:
    """A leased row, with what an attempt needs."""

    id: int
    request_id: str | None
    destination: str
    url: str
    event: str
    event_id: str
    body: bytes
    attempts: int
    first_attempt_at: datetime | None


_CLAIMED = tuple(getattr(_rows.c, name) for name in Claimed.__dataclass_fields__)
_CLAIM = (
    sa.update(_rows)
    .where(_rows.c.id.in_(sa.bindparam("ids", expanding=True)))
    .where(_rows.c.status.in_(_WAITING), _lease_free)
    .values(status=HttpOutboxStatus.SENDING, lease_until=sa.bindparam("until"))
    .returning(*_CLAIMED)
)


class HttpQueue:
    """Every read and write of `http_outbox` the delivery stage makes (synchronous; run in a thread)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def due_by_destination(self) -> dict[str, datetime]:
        """Per destination, the earliest moment a waiting, unleased row is due."""
        now = utcnow()
        query = (
            sa.select(_rows.c.destination, sa.func.min(_rows.c.next_attempt_at))
            .where(_rows.c.status.in_(_WAITING), _lease_free)
            .group_by(_rows.c.destination)
        )
        with self.store.reader.connect() as conn:
            result = conn.execute(query, {"now": now})
            return {destination: due for destination, due in result}

    def claim(self, destination: str, limit: int, lease: timedelta) -> list[Claimed]:
        """Lease up to `limit` rows of `destination` whose turn it is, oldest due first.

        The candidates are read without a write lock (most polls find none);
        the conditional update then takes only those still waiting and free.
        """
        now = utcnow()
        params = {"destination": destination, "now": now, "limit": limit}
        with self.store.reader.connect() as conn:
            ids = list(conn.execute(_TURN, params).scalars())
        if not ids:
            return []
        with self.store.engine.begin() as conn:
            won = conn.execute(_CLAIM, {"ids": ids, "now": now, "until": now + lease})
            rows = [Claimed(*row) for row in won]
        order = {row_id: index for index, row_id in enumerate(ids)}
        return sorted(rows, key=lambda row: order[row.id])

    def record(
        self,
        row_id: int,
        values: dict[str, Any],
        events: Sequence[AuditEvent],
        then: Callable[[Session], object] | None = None,
    ) -> None:
        """The outcome of one attempt and its audit row, in one commit (with `then`'s writes)."""
        with self.store.session() as session:
            session.connection().execute(
                sa.update(_rows)
                .where(_rows.c.id == row_id, _rows.c.status == HttpOutboxStatus.SENDING)
                .values(lease_until=None, **values)
            )
            insert_rows(session, events)
            if then is not None:
                then(session)
            session.commit()

    def release(self, row_ids: Sequence[int]) -> None:
        """Give rows back unsent (shutdown): due again at once, for this daemon or another."""
        if not row_ids:
            return
        with self.store.engine.begin() as conn:
            conn.execute(
                sa.update(_rows)
                .where(_rows.c.id.in_(list(row_ids)), _rows.c.status == HttpOutboxStatus.SENDING)
                .values(status=HttpOutboxStatus.PENDING, lease_until=None)
            )

    def rows_for(self, request_id: str) -> list[HttpOutboxRow]:
        query = (
            select(HttpOutboxRow)
            .where(HttpOutboxRow.request_id == request_id)
            .order_by(col(HttpOutboxRow.id))
        )
        with self.store.reading() as session:
            return list(session.exec(query))
