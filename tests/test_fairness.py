"""Replies are worked through fairly: a flood aimed at some requests never delays the others.

The answering stage claims stored replies taking turns per request (the
oldest reply of each request first, none of a request it is still working
on), keeps the LLM-bound decisions on a small lane of their own so that exact
answers never wait behind them, and limits error mail per request.
"""

from __future__ import annotations

import itertools
from datetime import timedelta

from conftest import add_request

from hitl_mail.store import Store

LEASE = timedelta(minutes=1)


_serial = itertools.count()


def stored(store: Store, count: int, request_id: str | None, sender: str = "a@x.example") -> None:
    for _ in range(count):
        key = f"mid:<{next(_serial)}@x.example>"
        assert store.store_inbound(key, sender, ["reply@x"], b"Subject: x\r\n\r\nok", request_id)


def test_a_claim_takes_the_oldest_reply_of_each_request_before_a_second_of_any(
    store: Store,
) -> None:
    for request_id in ("FLOODED", "QUIET1", "QUIET2"):
        add_request(store, request_id)
    stored(store, 50, "FLOODED")
    stored(store, 1, "QUIET1")
    stored(store, 1, "QUIET2")

    claimed = store.claim_inbound(10, LEASE)

    assert sorted(row.request_id or "" for row in claimed) == ["FLOODED", "QUIET1", "QUIET2"]


def test_replies_naming_no_request_take_turns_per_envelope_sender(store: Store) -> None:
    stored(store, 20, None, sender="flood@x.example")
    stored(store, 1, None, sender="person@y.example")

    claimed = store.claim_inbound(10, LEASE)

    assert sorted(row.envelope_from for row in claimed) == ["flood@x.example", "person@y.example"]


def test_a_claim_leaves_the_requests_whose_replies_are_in_hand_for_later(store: Store) -> None:
    for request_id in ("BUSY", "OTHER"):
        add_request(store, request_id)
    stored(store, 3, "BUSY")
    stored(store, 1, "OTHER")

    first = store.claim_inbound(10, LEASE, busy={"BUSY"})
    second = store.claim_inbound(10, LEASE)
    third = store.claim_inbound(10, LEASE)

    assert [row.request_id for row in first] == ["OTHER"]
    assert [row.request_id for row in second] == ["BUSY"]
    assert [row.request_id for row in third] == ["BUSY"]
    assert (second[0].id or 0) < (third[0].id or 0)  # its oldest first
