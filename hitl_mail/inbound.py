"""The SMTP edge: accept replies for our reply domain, store them durably, answer 250.

aiosmtpd owns the protocol; this handler only decides RCPT and DATA. RCPT
refuses what can be refused early (another domain: never an open relay; a
local part that is not one of our signed tokens). DATA stores the raw bytes
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
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from hitl_mail import tokens
from hitl_mail.config import InboundSettings
from hitl_mail.edgestore import edge_store
from hitl_mail.store import InboundItem, Store

log = logging.getLogger(__name__)

OK = "250 2.0.0 OK"
QUEUED = "250 2.0.0 OK: stored"
RELAY_DENIED = "550 5.7.1 Relaying denied: this server only accepts replies to review emails"
NO_SUCH_ADDRESS = "550 5.1.1 No such reply address"
TRY_LATER = "451 4.3.0 Temporary local problem, please try again later"

RefusalObserver = Callable[[str], None]  # reason

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
    ) -> None:
        self.db = edge_store(store)
        self.addressing = addressing
        self.keys = keys
        self.on_stored = on_stored
        self.observe_refusal = observe_refusal or (lambda reason: None)

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
        if not self.addressing.is_ours(address):
            self.observe_refusal("foreign_domain")
            return RELAY_DENIED
        try:
            token = self.addressing.token_in(address)
        except tokens.BadToken:
            self.observe_refusal("bad_token")
            return NO_SUCH_ADDRESS
        try:
            signed = token is None or await self._signed_by_us(token)
        except Exception:
            log.exception("could not check the reply address %s; answered 451", address)
            return TRY_LATER
        if not signed:
            self.observe_refusal("bad_token")
            return NO_SUCH_ADDRESS
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

    async def _signed_by_us(self, token: str) -> bool:
        """The token names a request of ours and is signed for its current assignee.

        Expiry is not checked here: an expired link deserves an explanation,
        which is sent after DATA (answering.py).
        """
        assignee = await self.db.assignee(tokens.read(token).request_id)
        if assignee is None:
            return False
        try:
            tokens.verify(token, assignee, self.keys, max_age=None)
        except tokens.BadToken:
            return False
        return True


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
        return SMTP(
            handler,
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
