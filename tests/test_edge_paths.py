"""The SMTP edge reads MAIL and RCPT paths exactly as aiosmtpd does, only faster.

`EdgeSMTP._getaddr` takes a regular expression's road for `<local@domain>`
made of dot-atoms and hands everything else to aiosmtpd's own parser. Both
must give the same (address, parameters) for any path a client sends: the
cases below pin the forms around the edge of the fast road, and generated
paths (Hypothesis) from an alphabet rich in the characters that change a
parse compare the two answers directly.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from hitl_mail.inbound import EdgeSMTP

pytestmark = pytest.mark.sqlite_only

TRICKY = [*"ab.@<> \t()\"[]\\:;,=+-_!#~'\r\n", "é", "\x00", "\u2028", "reply", "example.com"]


def both(arg: str, local_part_limit: int = 0) -> tuple[object, object]:
    """What aiosmtpd's parse and the edge's give for `arg`: a result, or the exception's type.

    (The stdlib parser under aiosmtpd raises IndexError for some paths, a lone
    `"` for one; aiosmtpd answers those 500, and the edge must do the same.)
    """
    stock, edge = SMTP.__new__(SMTP), EdgeSMTP.__new__(EdgeSMTP)
    stock.local_part_limit = edge.local_part_limit = local_part_limit
    return outcome(SMTP._getaddr, stock, arg), outcome(EdgeSMTP._getaddr, edge, arg)


def outcome(parse: Any, server: SMTP, arg: str) -> object:
    try:
        return parse(server, arg)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize(
    "arg",
    [
        "<reply+abc234@reply.example.com>",
        "<owner@example.com> SIZE=3400 BODY=8BITMIME",
        "<owner@example.com>\tSIZE=1 ",
        "  <a.b-c+d@x-y.example>",
        "<a@b.c>x",
        "<a@b.c> (comment) SIZE=1",
        "<a@b.c>(comment)",
        "<a..b@c>",
        "<.a@b>",
        "<a@b.>",
        "<a@[192.0.2.1]>",
        '<"quoted local"@example.com>',
        "<a(c)@b>",
        "< a@b.c >",
        "<>",
        "<> SIZE=1",
        "a@b.c SIZE=1",
        "<jörg@example.com>",
        "<a@b.c>\n",
        "",
    ],
)
def test_a_path_reads_as_aiosmtpd_reads_it(arg: str) -> None:
    stock, edge = both(arg)
    assert edge == stock


def test_a_local_part_over_the_limit_is_refused_as_aiosmtpd_refuses_it() -> None:
    assert both("<abcdef@example.com>", local_part_limit=5) == ((None, None), (None, None))
    assert both("<abcde@example.com>", local_part_limit=5)[1] == ("abcde@example.com", "")


@settings(max_examples=1500, deadline=None)
@given(
    parts=st.lists(st.sampled_from(TRICKY), max_size=24),
    limit=st.sampled_from([0, 5, 64]),
)
def test_any_generated_path_reads_as_aiosmtpd_reads_it(parts: list[str], limit: int) -> None:
    arg = "".join(parts)
    stock, edge = both(arg, limit)
    assert edge == stock, repr(arg)


@settings(max_examples=1500, deadline=None)
@given(
    local=st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,20}", fullmatch=True),
    domain=st.from_regex(r"[A-Za-z0-9.-]{1,20}", fullmatch=True),
    rest=st.sampled_from(["", " SIZE=1", "\tBODY=7BIT", "  A B", " (c) X", "x"]),
)
def test_generated_plain_looking_paths_read_as_aiosmtpd_reads_them(
    local: str, domain: str, rest: str
) -> None:
    arg = f"<{local}@{domain}>{rest}"
    stock, edge = both(arg)
    assert edge == stock, repr(arg)
