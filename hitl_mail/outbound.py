"""Send what the outbox holds: one reused SMTP connection, retries with backoff, every attempt audited.

Rows in `outbox` hold the finished message bytes, so a retry after a restart
sends exactly what was composed. A row is sent at most once per lease: it is
claimed, sent, then marked (the rows of one claim together, in one commit);
a crash between send and mark can repeat the messages not yet marked, never
lose one (mail is at-least-once by nature, and the repeat carries the same
Message-ID, which receiving clients collapse).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from datetime import datetime, timedelta
from email.message import EmailMessage

import aiosmtplib

from hitl_mail import compose
from hitl_mail.config import OutboundSettings
from hitl_mail.models import OutboxMessage, OutboxStatus, utcnow
from hitl_mail.store import Sending, Store, audit_event
from hitl_mail.waiting import Arrivals, idle, let_flood_pass

log = logging.getLogger(__name__)

ACTOR = "hitl-mail"
BATCH = 50  # messages per claim, and per commit of their "sent" marks

SendObserver = Callable[[str, str], None]  # (kind, "sent" | "retry" | "failed")


class PermanentFailure(Exception):
    """The relay refused for good (5xx); retrying cannot help."""


class TemporaryFailure(Exception):
    """The relay is down or said 4xx; try again later."""


def queue_row(
    message: EmailMessage, *, kind: str, request_id: str | None, recipient: str
) -> OutboxMessage:
    """An outbox row holding the finished bytes of `message`, due now."""
    now = utcnow()
    return OutboxMessage(
        request_id=request_id,
        kind=kind,
        recipient=recipient,
        message_id=str(message["Message-ID"]),
        raw=compose.message_bytes(message),
        next_attempt_at=now,
        created_at=now,
    )


class SmtpSender:
    """One SMTP connection to the relay, opened on demand and reused across messages."""

    def __init__(self, settings: OutboundSettings) -> None:
        self.settings = settings
        self.envelope_from = settings.from_addr_spec  # parsed once, not per message
        self._client: aiosmtplib.SMTP | None = None

    async def send(self, raw: bytes, recipient: str) -> None:
        try:
            client = await self._connected()
            errors, _ = await client.sendmail(self.envelope_from, [recipient], raw)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self.close()
            raise _classified(exc.recipients[0].code, exc.recipients[0].message) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            raise _classified(exc.code, exc.message) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from exc
        if errors:
            code, text = next(iter(errors.values()))
            raise _classified(code, text)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            return self._client
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout.total_seconds(),
            use_tls=s.use_tls,
            start_tls=_start_tls(s),
            tls_context=_tls_context(s),
        )
        await client.connect()
        if s.tls_required and client.get_transport_info("sslcontext") is None:
            client.close()  # never a login, a token or a message in clear text
            raise aiosmtplib.SMTPException("the relay did not start TLS, which is required")
        if s.username:
            await client.login(s.username, s.password or "")
        self._client = client
        return client


def _start_tls(settings: OutboundSettings) -> bool | None:
    """aiosmtplib's start_tls: True required, False never, None when the relay offers it."""
    if settings.use_tls:
        return False  # TLS from the first byte
    if settings.tls_required:
        return True
    return settings.starttls  # None: opportunistic (RFC 7435), False: off


def _tls_context(settings: OutboundSettings) -> ssl.SSLContext | None:
    """Verified when TLS is required; unverified when opportunistic, as MTAs do (RFC 7435 §3).

    Opportunistic TLS is against eavesdropping only: a relay with a
    self-signed certificate must not stop the mail it would have taken in clear.
    """
    if settings.tls_required:
        return ssl.create_default_context()
    if settings.starttls is False:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _classified(code: int, text: str) -> Exception:
    message = f"{code} {text}".strip()
    return PermanentFailure(message) if 500 <= code < 600 else TemporaryFailure(message)


def backoff(settings: OutboundSettings, attempts: int) -> timedelta:
    """Exponential from `retry_initial`, capped at `retry_max`, with ±10% jitter."""
    base = settings.retry_initial * (2 ** max(attempts - 1, 0))
    capped = min(base, settings.retry_max)
    jittered: timedelta = capped * random.uniform(0.9, 1.1)
    return jittered


class Outbox:
    """The sending stage: claim due rows, send, and record each attempt."""

    def __init__(
        self,
        store: Store,
        settings: OutboundSettings,
        poll: timedelta,
        observe: SendObserver | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.poll = poll.total_seconds()
        self.arrivals = arrivals or Arrivals()  # replies the SMTP listener stored lately
        self.sender = SmtpSender(settings)
        self.wakeup = asyncio.Event()
        self._observe = observe or (lambda kind, result: None)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await let_flood_pass(self.arrivals, stopping, "sending")
            sent_any = await self.drain_once(stopping)
            if sent_any:
                continue
            await self._idle(stopping)
        await self.sender.close()

    async def drain_once(self, stopping: asyncio.Event | None = None) -> bool:
        """Send what one claim leased, then record the sent ones in one commit.

        One commit per message cost more than sending it (an fsync each on
        SQLite), and commits in a thread beside the sending loop took the GIL
        from it at every send (PostgreSQL: 72 % of the bare loop's rate, 85 %
        recording once per claim). A crash before that commit re-sends the
        claim's messages once their lease runs out (at least once, same
        Message-ID), never loses one.
        """
        lease = self.settings.timeout * 3
        rows = await asyncio.to_thread(self.store.claim_outbox, BATCH, lease)
        sent: list[tuple[Sending, int]] = []
        try:
            for row in rows:
                if stopping is not None and stopping.is_set():
                    # Leave the rest leased; the lease runs out and the next start sends them.
                    await asyncio.to_thread(self._release, row)
                    continue
                attempt = row.attempts + 1
                if await self._send(row, attempt):
                    sent.append((row, attempt))
        finally:
            if sent:
                await asyncio.to_thread(self._sent_many, sent)
        return bool(rows)

    async def _send(self, row: Sending, attempt: int) -> bool:
        """Send one row; True when the relay took it (the caller records that), else recorded here."""
        try:
            await self.sender.send(row.raw, row.recipient)
        except PermanentFailure as exc:
            await asyncio.to_thread(self._failed, row, attempt, str(exc))
            return False
        except TemporaryFailure as exc:
            if attempt >= self.settings.max_attempts:
                await asyncio.to_thread(
                    self._failed, row, attempt, f"gave up after {attempt} attempts: {exc}"
                )
            else:
                await asyncio.to_thread(self._retry, row, attempt, str(exc))
            return False
        return True

    def _sent_many(self, sent: list[tuple[Sending, int]]) -> None:
        now = utcnow()
        self.store.update_outbox_many(
            [
                (
                    row.id,
                    {
                        "status": OutboxStatus.SENT,
                        "attempts": attempt,
                        "sent_at": now,
                        "lease_until": None,
                    },
                )
                for row, attempt in sent
            ],
            [
                audit_event(row.request_id, "email_sent", ACTOR, detail=_detail(row, attempt))
                for row, attempt in sent
            ],
        )
        for row, _ in sent:
            log.info(
                "request %s: %s sent to %s (%s)",
                row.request_id,
                row.kind,
                row.recipient,
                row.message_id,
            )
            self._observe(row.kind, "sent")

    def _retry(self, row: Sending, attempt: int, error: str) -> None:
        next_at: datetime = utcnow() + backoff(self.settings, attempt)
        detail = {**_detail(row, attempt), "error": error, "next_attempt_at": next_at.isoformat()}
        event = audit_event(row.request_id, "email_retry", ACTOR, detail=detail)
        self.store.update_outbox(
            row.id,
            [event],
            attempts=attempt,
            next_attempt_at=next_at,
            lease_until=None,
            last_error=error,
        )
        log.warning(
            "request %s: %s to %s failed (attempt %d), next try %s: %s",
            row.request_id,
            row.kind,
            row.recipient,
            attempt,
            next_at.isoformat(),
            error,
        )
        self._observe(row.kind, "retry")

    def _failed(self, row: Sending, attempt: int, error: str) -> None:
        event = audit_event(
            row.request_id, "email_failed", ACTOR, detail={**_detail(row, attempt), "error": error}
        )
        self.store.update_outbox(
            row.id,
            [event],
            status=OutboxStatus.FAILED,
            attempts=attempt,
            lease_until=None,
            last_error=error,
        )
        log.error(
            "request %s: %s to %s failed permanently: %s",
            row.request_id,
            row.kind,
            row.recipient,
            error,
        )
        self._observe(row.kind, "failed")

    def _release(self, row: Sending) -> None:
        self.store.update_outbox(row.id, (), lease_until=None)

    async def _idle(self, stopping: asyncio.Event) -> None:
        self.wakeup.clear()  # before looking, so a row queued meanwhile still wakes us
        due = await asyncio.to_thread(self.store.next_outbox_due)
        wait = self.poll
        if due is not None:
            wait = min(wait, max((due - utcnow()).total_seconds(), 0.0))
        await idle(self.wakeup, stopping, wait)


def _detail(row: Sending, attempt: int) -> dict[str, object]:
    return {"kind": row.kind, "to": row.recipient, "message_id": row.message_id, "attempt": attempt}
