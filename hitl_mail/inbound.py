"""The SMTP edge: accept replies for our reply domain, store them durably, answer 250.

aiosmtpd owns the protocol; this handler only decides RCPT and DATA. RCPT
refuses what can be refused early (another domain: never an open relay; a
local part that is not one of our signed tokens). DATA stores the raw bytes
and commits before answering 250, so a crash right after the 250 loses
nothing. Concurrent DATA handlers share commits (`GroupCommit`): each 250
still waits for the commit that holds its message. No parsing beyond the
Message-ID, no LLM, no flow code and no outbound mail happen inside the SMTP
transaction (see answering.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from hitl_mail import tokens
from hitl_mail.config import InboundSettings
from hitl_mail.store import InboundItem, Store

log = logging.getLogger(__name__)

OK = "250 2.0.0 OK"
QUEUED = "250 2.0.0 OK: stored"
RELAY_DENIED = "550 5.7.1 Relaying denied: this server only accepts replies to review emails"
NO_SUCH_ADDRESS = "550 5.1.1 No such reply address"
TRY_LATER = "451 4.3.0 Temporary local problem, please try again later"

RefusalObserver = Callable[[str], None]  # reason


def dedupe_key(raw: bytes) -> str:
    """The Message-ID, or a hash of the content when a message has none."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw[:65536])
    message_id = str(headers.get("Message-ID") or "").replace("\x00", "").strip()
    if message_id:
        return "mid:" + message_id[:480]
    return "sha256:" + hashlib.sha256(raw).hexdigest()


class GroupCommit:
    """Stores messages from many concurrent DATA handlers with as few commits as possible.

    Each handler awaits `add(item)`; one writer at a time stores everything
    that is waiting in one transaction (`Store.store_inbound_many`), and
    messages that arrive meanwhile form the next batch. A handler's result,
    and so its 250, comes only after the commit that contains its message;
    if that commit fails, every handler of the batch gets the exception (451).
    Under load, one fsync covers many replies; alone, a reply waits for one
    commit as before.
    """

    MAX_BATCH = 256

    def __init__(self, store: Store) -> None:
        self._store = store
        self._waiting: list[tuple[InboundItem, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, item: InboundItem) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="inbound-group-commit")
        return await done

    async def _write(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.MAX_BATCH]
            del self._waiting[: self.MAX_BATCH]
            await self._commit(batch, split_on_error=True)

    async def _commit(
        self, batch: list[tuple[InboundItem, asyncio.Future[bool]]], split_on_error: bool
    ) -> None:
        try:
            stored = await asyncio.to_thread(
                self._store.store_inbound_many, [item for item, _ in batch]
            )
        except Exception as exc:
            if split_on_error and len(batch) > 1:
                # One message the database refuses must not refuse its neighbours.
                for one in batch:
                    await self._commit([one], split_on_error=False)
                return
            for _, done in batch:
                if not done.done():  # a handler whose client went away is cancelled
                    done.set_exception(exc)
            return
        for (_, done), result in zip(batch, stored, strict=True):
            if not done.done():
                done.set_result(result)


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
        self.store = store
        self.addressing = addressing
        self.keys = keys
        self.on_stored = on_stored
        self.observe_refusal = observe_refusal or (lambda reason: None)
        self.commits = GroupCommit(store)

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
        if token is not None and not await asyncio.to_thread(self._signed_by_us, token):
            self.observe_refusal("bad_token")
            return NO_SUCH_ADDRESS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = envelope.mail_from or ""
        try:
            stored = await self.commits.add((dedupe_key(raw), sender, list(envelope.rcpt_tos), raw))
        except Exception:
            log.exception("could not store a reply from %s; answered 451", sender)
            return TRY_LATER
        if stored:
            log.info(
                "reply stored from %s for %s (%d bytes)",
                sender,
                ",".join(envelope.rcpt_tos),
                len(raw),
            )
            self.on_stored()
        else:
            log.info("duplicate delivery from %s ignored", sender)
        return QUEUED

    def _signed_by_us(self, token: str) -> bool:
        """The token names a request of ours and is signed for its current assignee.

        Expiry is not checked here: an expired link deserves an explanation,
        which is sent after DATA (answering.py).
        """
        assignee = self.store.assignee(tokens.read(token).request_id)
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
    settings: InboundSettings, handler: ReplyHandler, hostname: str
) -> asyncio.Server:
    """Listen on `[inbound].host:port` in the running loop; raises OSError when the port is taken."""
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
    return await loop.create_server(factory, host=settings.host, port=settings.port)
