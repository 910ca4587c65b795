"""The SMTP edge: accept replies for our reply domain, store them durably, answer 250.

aiosmtpd owns the protocol; this handler only decides RCPT and DATA, and
`EdgeSMTP` adds the abuse limits (edgeguard.py) around aiosmtpd's session,
which reads DATA in blocks and answers it as aiosmtpd does (`BlockDataSMTP`).
RCPT refuses what can be refused early: another domain (never an open
relay); a local part that is not one of our signed tokens, or the bare
`reply@` unless the thread fallback may place it (`thread_fallback`, or
sender authentication required: SPEC 9); a token whose request
closed, or which expired, longer ago than its grace period (within it the
reply is taken, so its sender hears why it changed nothing); and, for the
time being, a request with `max_pending_replies_per_request` replies already
waiting (a temporary 452, which the sending MTA retries). DATA stores the raw bytes
and commits before answering 250, so a crash right after the 250 loses
nothing. Concurrent DATA handlers share commits, and concurrent RCPTs share
queries (edgestore.py): each 250 still waits for the commit that holds its
message. No parsing beyond the Message-ID, no LLM, no flow code and no
outbound mail happen inside the SMTP transaction (see answering.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
import ssl
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from hitl_mail import tokens
from hitl_mail.config import InboundSettings, TokenSettings
from hitl_mail.edgeguard import EdgeGuard, client_of
from hitl_mail.edgestore import edge_store
from hitl_mail.models import utcnow
from hitl_mail.store import InboundItem, ReplyTarget, Store

log = logging.getLogger(__name__)

OK = "250 2.0.0 OK"
QUEUED = "250 2.0.0 OK: stored"
RELAY_DENIED = "550 5.7.1 Relaying denied: this server only accepts replies to review emails"
NO_SUCH_ADDRESS = "550 5.1.1 No such reply address"
TRY_LATER = "451 4.3.0 Temporary local problem, please try again later"
# Refusals a person reads in their bounce. RFC 3463: X.2.1, the mailbox takes no
# mail (any more); X.2.2, it is full for now; X.5.3, too many recipients.
BARE_ADDRESS = (
    "550 5.1.1 This address takes no replies: answer with Reply on the review email,"
    " which carries its own reply address"
)
REQUEST_CLOSED = (
    "550 5.2.1 This review request was answered or cancelled a while ago;"
    " replies to it are no longer read"
)
LINK_EXPIRED = "550 5.2.1 This reply address has expired; replies to it are no longer read"
REQUEST_BUSY = "452 4.2.2 Too many replies to this review request are waiting, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
THROTTLED = "450 4.7.1 Too many unknown recipients from your address, try again later"
# Refusals that count towards a client's `max_rcpt_failures_per_ip`: guesses at
# addresses, not a person replying to an old but genuine link.
GUESSES = frozenset({"foreign_domain", "bad_token", "bare_address"})

RefusalObserver = Callable[[str], None]  # reason

# `<local@domain>` in its plainest form (RFC 5321 4.1.2: a dot-atom at a dot-atom domain),
# then the parameters after spaces or tabs; see EdgeSMTP._getaddr.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(?![ \t(])(.*)",
    re.DOTALL,
)
_DATA_END = b".\r\n"  # after CRLF, or first in DATA: the end of the message (RFC 5321 4.1.1.4)
DATA_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"  # aiosmtpd's words, as before
DATA_TOO_MUCH = "552 Error: Too much mail data"
_MESSAGE_ID = re.compile(rb"\nmessage-id[ \t]*:")  # searched in the lowercased header block
_FOLDED_VALUE = re.compile(rb"[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*")  # RFC 5322 2.2.3


def dedupe_key(raw: bytes) -> str:
    """The Message-ID, or a hash of the content when a message has none.

    Found with `find` and two small patterns rather than an email parser:
    this runs inside every DATA, and the parser spent 40 µs a reply on
    headers nothing here reads.
    """
    end = 0 if raw.startswith((b"\r\n", b"\n")) else raw.find(b"\r\n\r\n", 0, 65536)
    if end < 0:
        end = raw.find(b"\n\n", 0, 65536)
    head = b"\n" + raw[: end if end >= 0 else 65536]
    found = _MESSAGE_ID.search(head.lower())
    folded = _FOLDED_VALUE.match(head, found.end()) if found else None
    message_id = b" ".join(folded.group().split()).replace(b"\x00", b"") if folded else b""
    if message_id:
        return "mid:" + message_id.decode("utf-8", "replace")[:480]
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class ReplyHandler:
    """aiosmtpd handler: the return value of each hook is the SMTP reply."""

    def __init__(
        self,
        store: Store,
        addressing: tokens.ReplyAddressing,
        keys: tuple[str, ...],
        on_stored: Callable[[], None],
        observe_refusal: RefusalObserver | None = None,
        *,
        settings: InboundSettings | None = None,
        token_max_age: timedelta | None = None,
    ) -> None:
        self.db = edge_store(store)
        self.addressing = addressing
        self.keys = keys
        self.on_stored = on_stored
        self.observe_refusal = observe_refusal or (lambda reason: None)
        self.settings = settings or InboundSettings(reply_domain=addressing.domain)
        self.token_max_age = token_max_age or TokenSettings().max_age
        self.guard = EdgeGuard(self.settings)

    async def close(self) -> None:
        await self.db.close()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        client = server.client if isinstance(server, EdgeSMTP) else client_of(session.peer)
        if self.guard.throttled(client):
            self.observe_refusal("throttled")
            return THROTTLED
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            self.observe_refusal("too_many_recipients")
            return TOO_MANY_RECIPIENTS
        try:
            refused = await self._refusal(address)
        except Exception:
            log.exception("could not check the reply address %s; answered 451", address)
            return TRY_LATER
        if refused is not None:
            reason, reply = refused
            self.observe_refusal(reason)
            if reason in GUESSES:
                self.guard.failed(client)
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        # A NUL from a broken client would make PostgreSQL refuse the row on every retry.
        sender = (envelope.mail_from or "").replace("\x00", "")
        recipients = [r.replace("\x00", "") for r in envelope.rcpt_tos]
        item = InboundItem(dedupe_key(raw), sender, recipients, raw, self._request_of(recipients))
        try:
            stored = await self.db.store(item)
        except Exception:
            log.exception("could not store a reply from %s; answered 451", sender)
            return TRY_LATER
        if stored:
            log.info(
                "reply stored from %s for %s (%d bytes)",
                sender,
                tokens.redact(",".join(recipients)),
                len(raw),
            )
            self.on_stored()
        else:
            log.info("duplicate delivery from %s ignored", sender)
        return QUEUED

    def _request_of(self, recipients: list[str]) -> str | None:
        """The request the first tokened recipient names (RCPT checked its signature)."""
        for recipient in recipients:
            with contextlib.suppress(tokens.BadToken):
                token = self.addressing.token_in(recipient)
                if token is not None:
                    return tokens.read(token).request_id
        return None

    async def _refusal(self, address: str) -> tuple[str, str] | None:
        """Why `address` takes no reply now, as (reason, SMTP reply); None when it does."""
        if not self.addressing.is_ours(address):
            return "foreign_domain", RELAY_DENIED
        try:
            token = self.addressing.token_in(address)
        except tokens.BadToken:
            return "bad_token", NO_SUCH_ADDRESS
        if token is None:
            return None if self.settings.takes_bare_address else ("bare_address", BARE_ADDRESS)
        target = await self.db.reply_target(tokens.read(token).request_id)
        if target is None or target.assigned_to is None:
            return "bad_token", NO_SUCH_ADDRESS
        try:  # the signature first: a forged token is never told it merely expired
            parts = tokens.verify(token, target.assigned_to, self.keys, max_age=None)
        except tokens.BadToken:
            return "bad_token", NO_SUCH_ADDRESS
        return self._stale(parts, target)

    def _stale(self, parts: tokens.TokenParts, target: ReplyTarget) -> tuple[str, str] | None:
        """A genuine token that is past its grace period, or whose request is flooded.

        Within the grace periods the reply is taken: answering.py tells its
        sender that the link expired or that the request was already answered.
        """
        now = utcnow()
        if parts.issued_at + self.token_max_age + self.settings.expired_grace < now:
            return "link_expired", LINK_EXPIRED
        if target.closed_at is not None and target.closed_at + self.settings.closed_grace < now:
            return "request_closed", REQUEST_CLOSED
        if target.waiting >= self.settings.max_pending_replies_per_request:
            return "request_busy", REQUEST_BUSY
        return None


class BlockDataSMTP(SMTP):
    """aiosmtpd's SMTP session, reading DATA in blocks instead of line by line."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA answered as aiosmtpd answers it, the message read in a few blocks.

        aiosmtpd awaits `readuntil(CRLF)` for each line, ~90 for a 3.4 KB
        reply: 78 µs of the listener's CPU per reply. Here the reader looks
        for `.CRLF` and checks that the dot begins a line, so a message takes
        a few reads. The answers are aiosmtpd's, refusals included (checked
        over the lines once the message is in, `data_refusal`), as
        tests/test_edge_data.py shows against aiosmtpd on generated input.
        Uses aiosmtpd 1.4's `_reader`, `_writer`, `_call_handler_hook` and
        `_set_post_data_state`.
        """
        if self._decode_data:  # not the edge's setting; aiosmtpd's own code knows it
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        read = await self._read_message()
        if read is None:
            return  # the connection closed before the end of the message
        if isinstance(read, str):
            await self.push(read)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = read
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_message(self) -> bytes | str | None:
        """The message, un-stuffed; or the refusal to answer once it ended; or None.

        Memory stays bounded as in aiosmtpd: past `data_size_limit` plus one
        line, the refusal is already decided by what came, which is dropped
        while the rest is read to its end.
        """
        reader, line_limit, size_limit = self._reader, self.line_length_limit, self.data_size_limit
        decided_at = size_limit + line_limit + 2 if size_limit else None
        body, dropped, refusal = bytearray(), 0, None
        while self.transport is not None:
            try:
                try:
                    body += await reader.readuntil(_DATA_END)
                except asyncio.LimitOverrunError as exc:  # no `.CRLF` within the reader's limit
                    body += await reader.read(exc.consumed)
                    ended = False
                else:
                    ended = True
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            dot = len(body) - len(_DATA_END)
            if ended and (dropped + dot == 0 or body[dot - 2 : dot] == b"\r\n"):
                del body[dot:]
                if refusal is None:
                    refusal = data_refusal(body, size_limit, line_limit, complete=True)
                if refusal is not None:
                    return refusal
                message = bytes(body)
                body.clear()  # at most two copies at a time, as in aiosmtpd
                if message.startswith(b"."):
                    message = message[1:]
                return message.replace(b"\r\n.", b"\r\n")
            if decided_at is not None and dropped + len(body) > decided_at:
                if refusal is None:
                    refusal = data_refusal(body, size_limit, line_limit, complete=False)
                    assert refusal is not None  # see data_refusal
                dropped += len(body) - 2
                del body[:-2]  # the last two bytes: does a dot after them begin a line?
        return None


class EdgeSMTP(BlockDataSMTP):
    """aiosmtpd's SMTP session, with the edge's connection limits and a bound on DATA.

    A connection over a limit (edgeguard.py) is answered 421 and closed before
    aiosmtpd sees it: no session, no greeting, no task. Everything else is
    aiosmtpd's, including its one timer: restarted at each complete command,
    it is both the idle timeout and the time allowed to send one command line
    (`[inbound].idle_timeout`), so a client trickling bytes is closed too.
    For DATA the timer is set once to `[inbound].data_timeout`, which bounds
    the whole message however steadily its lines come.

    Memory: a message is buffered whole, and once more as its dots are
    un-stuffed, and refused (552) past `max_message_size`; so the edge holds at
    most about 2 x max_message_size x max_connections of mail (200 MB with
    the defaults), however many clients try.
    """

    def __init__(self, handler: ReplyHandler, *, data_timeout: float, **options: Any) -> None:
        super().__init__(handler, **options)
        self.guard = handler.guard
        self.observe_refusal = handler.observe_refusal
        self.data_timeout = data_timeout
        self.client = ""  # set when admitted
        self._admitted = False
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self._admitted:  # not the STARTTLS layer
            self.client = client_of(transport.get_extra_info("peername"))
            refusal = self.guard.admit(self.client)
            if refusal is not None:
                self._refused = True
                self.observe_refusal("too_many_connections")
                log.debug("connection from %s refused: %s", self.client, refusal)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(refusal.encode("ascii") + b"\r\n")
                transport.close()
                return
            self._admitted = True
        super().connection_made(transport)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a MAIL or RCPT path, with a fast road for the plain form.

        aiosmtpd builds a class and runs the RFC 5322 header parser for every
        path: 71 µs each, twice per reply, a tenth of the edge's CPU in a
        burst. `<local@domain>` made only of dot-atoms, then parameters, reads
        the same either way (tests/test_edge_paths.py compares the two on
        generated paths); anything else (quotes, comments, literals, the null
        path, 8-bit text) still goes to aiosmtpd.
        """
        plain = _PLAIN_PATH.fullmatch(arg.lstrip(" \t"))
        if plain is None or (self.local_part_limit and plain[1].index("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return plain[1], plain[2]

    def eof_received(self) -> bool | None:
        return False if self._refused else super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # aiosmtpd never saw this connection
        if self._admitted:
            self._admitted = False
            self.guard.release(self.client)
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd 1.4's timer restart, a private method: test_edge_limits.py
        # shows the bound holds, so an aiosmtpd that changes it fails a test.
        self._reset_timeout(self.data_timeout)
        await super().smtp_DATA(arg)
        if self.transport is not None:
            self._reset_timeout()  # back to the idle timeout for the next command


def data_refusal(
    data: bytes | bytearray, size_limit: int | None, line_limit: int, *, complete: bool
) -> str | None:
    """What aiosmtpd answers a message of `data` (as sent, dots still stuffed): None for 250.

    aiosmtpd decides line by line, by the first of: a line longer than its
    reader's limit (`line_limit` bytes before CRLF, noticed as it arrives),
    the message past `size_limit`, a line with its CRLF longer than
    `line_limit`. When `complete` is false `data` is cut anywhere, and is
    longer than `size_limit + line_limit + 2`: its complete lines decide, or
    else the last, already longer than the reader's limit.
    """
    lines = data.split(b"\r\n")
    partial = lines.pop()  # b"" when the message ends with its CRLF
    longest = max(map(len, lines), default=0)
    if (not size_limit or len(data) <= size_limit) and longest + 2 <= line_limit and complete:
        return None
    size = 0
    for line in lines:
        if len(line) > line_limit:
            return DATA_TOO_LONG
        size += len(line) + 2
        if size_limit and size > size_limit:
            return DATA_TOO_MUCH
        if len(line) + 2 > line_limit:
            return DATA_TOO_LONG
    return DATA_TOO_LONG if len(partial) > line_limit else None


def tls_context(settings: InboundSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def start_listener(
    settings: InboundSettings,
    handler: ReplyHandler,
    hostname: str,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    """Listen on `sock`, or on `[inbound].host:port`, in the running loop.

    Raises OSError when the port is taken.
    """
    context = tls_context(settings)

    def factory() -> Any:
        return EdgeSMTP(
            handler,
            data_timeout=settings.data_timeout.total_seconds(),
            timeout=settings.idle_timeout.total_seconds(),
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="hitl-mail",
            tls_context=context,
            require_starttls=settings.require_starttls,
        )

    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock)
    return await loop.create_server(factory, host=settings.host, port=settings.port)
