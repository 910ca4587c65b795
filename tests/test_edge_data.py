"""The SMTP edge reads DATA exactly as aiosmtpd does, in blocks instead of lines.

`BlockDataSMTP` (the edge's session) looks for `.CRLF` and checks that the
dot begins a line, then applies aiosmtpd's checks over the lines. Both
servers run here on loopback and take the same bytes, sent in the same
pieces: every reply the client gets and every message the handler is given
must be the same. Generated sessions (Hypothesis) mix stuffed dots, bare CR
and LF, lines around the 1001-byte limit, messages around a small size
limit, an early `.` line, and pieces cut anywhere, CRLF included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from hitl_mail.inbound import DATA_TOO_LONG, DATA_TOO_MUCH, BlockDataSMTP, data_refusal

pytestmark = pytest.mark.sqlite_only

SIZE_LIMIT = 3000
HEAD = b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
TAIL = b"\r\n.\r\nQUIT\r\n"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope.original_content or b"")
        return "250 stored"


class Pair:
    """aiosmtpd and the block reader, on two loopback ports of one event loop the test drives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.recorders = (Recorder(), Recorder())
        self.ports: list[int] = []
        self.servers: list[asyncio.Server] = []
        for kind, recorder in zip((SMTP, BlockDataSMTP), self.recorders, strict=True):

            def factory(kind: type[SMTP] = kind, recorder: Recorder = recorder) -> SMTP:
                return kind(recorder, data_size_limit=SIZE_LIMIT, enable_SMTPUTF8=True)

            server = self.loop.run_until_complete(self.loop.create_server(factory, "127.0.0.1", 0))
            self.servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    def session(self, pieces: list[bytes]) -> tuple[tuple[bytes, list[bytes]], ...]:
        """What each server answered `pieces`, and the messages it was given."""
        results = []
        for port, recorder in zip(self.ports, self.recorders, strict=True):
            recorder.messages.clear()
            replies = self.loop.run_until_complete(talk(port, pieces))
            results.append((replies, list(recorder.messages)))
        return tuple(results)

    def close(self) -> None:
        for server in self.servers:
            server.close()
            self.loop.run_until_complete(server.wait_closed())
        self.loop.close()


async def talk(port: int, pieces: list[bytes]) -> bytes:
    """Send `pieces` one write each, then read every reply until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.0005)  # a piece of its own at the server, most of the time
    try:
        replies = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # The greeting names the host and time; the rest must be the same bytes.
    return replies.split(b"\r\n", 1)[1]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    servers = Pair()
    yield servers
    servers.close()


def cut(data: bytes, at: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(p % (len(data) + 1) for p in at)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def same(pair: Pair, body: bytes, at: list[int] | None = None) -> tuple[bytes, list[bytes]]:
    stock, blocks = pair.session(cut(HEAD + body + TAIL, at or []))
    assert blocks == stock
    return stock


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: hi\r\n\r\napproved",
        b"",
        b".",
        b"..",
        b".hidden first line\r\n..\r\n...\r\nThanks.",
        b"a line ending in a dot.\r\nx.\r\n. \r\n.x",
        b"bare\nLF and bare\rCR\r\n\n.\r\r\n.",
        b"a bare LF\n.\r\nis no end",
        b"a bare CR\r.\r\nis no end",
        b"x" * 999,
        b"x" * 1000,
        b"x" * 1001,
        b"x" * 1002,
        b"x" * 5000,
        b"short\r\n" + b"y" * 1500 + b"\r\nmore",
        (b"z" * 900 + b"\r\n") * 3 + b"end",
        (b"z" * 900 + b"\r\n") * 4 + b"end",
        (b"z" * 998 + b"\r\n") * 3 + b"w" * 1000,
        (b"z" * 900 + b"\r\n") * 40,
        b"x" * 20000 + b"\r\n." + b"\r\n",
    ],
)
def test_data_reads_and_answers_as_aiosmtpd(pair: Pair, body: bytes) -> None:
    replies, messages = same(pair, body)
    assert replies.count(b"\r\n221 ") == 1  # both read to the end and took QUIT
    assert len(messages) <= 1


def test_a_message_with_stuffed_dots_is_given_with_them_unstuffed(pair: Pair) -> None:
    replies, messages = same(pair, b"..one\r\ntwo\r\n...three")
    assert b"250 stored" in replies
    assert messages == [b".one\r\ntwo\r\n..three\r\n"]


def test_a_lone_dot_ends_the_message_and_what_follows_is_read_as_commands(pair: Pair) -> None:
    replies, messages = same(pair, b"first\r\n.\r\nNOOP")
    assert messages == [b"first\r\n"]
    assert b"\r\n250 OK\r\n" in replies  # NOOP's answer


def test_the_end_of_a_message_split_across_pieces_anywhere_is_found(pair: Pair) -> None:
    data = b"line one\r\nline two."
    for at in range(len(HEAD), len(HEAD) + len(data) + len(TAIL)):
        messages = same(pair, data, [at, at + 1])[1]
        assert messages == [data + b"\r\n"], at


def test_refusals_answer_once_the_message_ends(pair: Pair) -> None:
    assert DATA_TOO_LONG.encode() in same(pair, b"x" * 1500)[0]
    assert DATA_TOO_MUCH.encode() in same(pair, (b"z" * 900 + b"\r\n") * 4)[0]
    # A long line after the size is passed: the size decides, as in aiosmtpd.
    assert DATA_TOO_MUCH.encode() in same(pair, (b"z" * 998 + b"\r\n") * 4 + b"w" * 1200)[0]
    # The line that passes the size: over the reader's limit (1001) it is "too long"
    # before it is counted; at the limit, counted first.
    two = (b"z" * 998 + b"\r\n") * 2
    assert DATA_TOO_LONG.encode() in same(pair, two + b"x" * 1002)[0]
    assert DATA_TOO_MUCH.encode() in same(pair, two + b"x" * 1001)[0]


PIECES = st.sampled_from(
    [b"a", b"Z", b" ", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\n.\r\n"]
    + [b"x" * n for n in (10, 200, 500, 990, 1001)]
)


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(PIECES, max_size=40).map(b"".join),
    at=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
)
def test_generated_sessions_read_as_aiosmtpd_reads_them(
    pair: Pair, body: bytes, at: list[int]
) -> None:
    same(pair, body, at)


@pytest.mark.parametrize("complete", [True, False])
def test_a_refusal_decided_early_is_the_one_the_whole_message_gets(complete: bool) -> None:
    """Past `size + line + 2` bytes, the lines so far decide; the rest changes nothing."""
    size, line = 3000, 1001
    for head in ((b"z" * 900 + b"\r\n") * 4, (b"z" * 500 + b"\r\n") * 2 + b"y" * 3000):
        early = data_refusal(head, size, line, complete=False)
        assert early is not None
        for rest in (b"", b"\r\n", b"a\r\n" * 10, b"b" * 2000 + b"\r\n"):
            whole = head + rest
            if complete and not whole.endswith(b"\r\n"):
                whole += b"\r\n"
            assert data_refusal(whole, size, line, complete=True) == early
