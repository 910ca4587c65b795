"""Turn each stored reply into an answer, or into a recorded refusal; queue what to tell whom.

The life of one reply: parse (replies.py) → find the request (token in the
recipient; else, only when senders must authenticate or `thread_fallback` is
on, the notification's Message-ID in In-Reply-To/References) → ignore machine
mail → check the sender against the token, then its authentication
(authentication.py) → check expiry and status → decide the outcome
(outcomes.py) → answer the request with one conditional update, queue the
confirmation, and mark the stored reply done, all in one transaction. Nothing
here ever mails the sender of a reply whose From does not match the token:
that is how a forged reply stays harmless.

The parse runs in a worker process with a time bound (parsing.py); a reply
that could not be read safely is refused as malformed before anything else.
Fairness: stored replies are claimed taking turns per request, never more
than one of a request at a time (store.claim_inbound), so a flood aimed at
some requests waits behind one reply to each other request. Every check up
to the decision is cheap; a reply that needs the LLM then leaves its slot
for a lane of its own (`[llm].concurrency` at once), so the `concurrency`
slots never all sit on LLM calls and exact answers never wait behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import NamedTuple

from hitl_mail import authentication, compose, tokens, transitions
from hitl_mail.config import Config
from hitl_mail.intake import addressing, content_of, reply_to_of, sender
from hitl_mail.metrics import Metrics
from hitl_mail.models import AnswerSource, FeedbackRequest, InboundMessage, RequestStatus, utcnow
from hitl_mail.outbound import queue_row
from hitl_mail.outcomes import Decision, LLMSettings, decide, exact_match
from hitl_mail.parsing import Ours, Parsers
from hitl_mail.replies import ParsedReply
from hitl_mail.store import Store, Transition
from hitl_mail.transitions import ErrorMail, MailLimit, Refusal, RefusalKind, Tell
from hitl_mail.waiting import Arrivals, Coalesce, idle, let_flood_pass

log = logging.getLogger(__name__)

BATCH = 32
# A claimed reply's lease is renewed while this daemon holds it, so it can be
# short: a daemon killed mid-answer delays the reply by at most LEASE.
LEASE = timedelta(seconds=20)
RENEW_EVERY = 5.0
RETRY_AFTER = timedelta(minutes=5)  # a reply whose processing raised is taken again then
ERROR_MAIL_WINDOW = timedelta(days=1)
ERROR_MAILS_PER_REQUEST = 3  # in ERROR_MAIL_WINDOW, whatever their kinds
# Replies waiting for the LLM lane at most; more are handed back for DEFER_FOR.
LLM_BACKLOG = 64
DEFER_FOR = timedelta(seconds=5)
# Characters of a reply kept in the audit trail: its new text only, never the raw
# message or the quoted history (SPEC 9); audit_event redacts any token in it.
TEXT_KEPT = 20_000
THREAD_IDS = 20  # Message-IDs of In-Reply-To/References looked up, nearest first


class _Answer(NamedTuple):
    """A reply that passed every check, with its decided outcome: to be recorded."""

    row: InboundMessage
    parsed: ParsedReply
    request: FeedbackRequest
    issued_to: str
    decision: Decision


@dataclass(frozen=True)
class _Checked:
    """A parsed reply, its request if found, and either who may answer it or why it was refused."""

    parsed: ParsedReply
    request: FeedbackRequest | None
    issued_to: str = ""
    refused: str | None = None  # the refusal's result, already recorded


class _Slot:
    """One of the stage's `concurrency` slots, held by a reply until it is released (once)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


def llm_settings(config: Config) -> LLMSettings:
    llm = config.llm
    return LLMSettings(
        model=llm.model,
        api_base=llm.api_base,
        api_key=llm.api_key,
        timeout=llm.timeout.total_seconds(),
        retries=llm.retries,
    )


async def decide_feedback(
    config: Config, metrics: Metrics, request: FeedbackRequest, feedback: str
) -> Decision:
    """`feedback` collapsed into one of `request`'s outcomes, its LLM call counted: email and HTTP alike."""
    decision = await decide(
        feedback, request.emit, request.default_outcome, request.llm, llm_settings(config)
    )
    if decision.llm_calls:
        metrics.llm_call("ok" if decision.method == "llm" else "error")
    return decision


class Answering:
    """The answering stage: claims stored replies and processes a few at a time."""

    def __init__(
        self,
        config: Config,
        store: Store,
        on_processed: Callable[[], None],
        metrics: Metrics | None = None,
        concurrency: int = 8,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_processed = on_processed
        self.metrics = metrics or Metrics()
        self.wakeup = asyncio.Event()
        self.arrivals = arrivals or Arrivals()  # replies the SMTP listener stored lately
        self.dnsfunc: authentication.DnsFunc = authentication.system_dns  # DKIM key lookups
        self._slots = asyncio.Semaphore(concurrency)
        self._llm_slots = asyncio.Semaphore(config.llm.concurrency)
        self._llm_waiting = 0  # replies in the LLM lane, deciding or waiting to
        self._tasks: set[asyncio.Task[None]] = set()
        # Claimed and not yet finished, with their requests: leases to renew,
        # and requests not to claim another reply of meanwhile.
        self._held: dict[int, str | None] = {}
        self.parsers = Parsers(
            Ours(
                frozenset({config.outbound.from_addr_spec}),
                frozenset({config.inbound.reply_domain.lower()}),
            ),
            timeout=config.inbound.parse_timeout.total_seconds(),
        )
        # Answers decided at about the same time are recorded in one transaction;
        # if it fails, each is tried alone, so one bad row does not fail the rest.
        self._recording = Coalesce(
            self._record_together, "answering-record", max_batch=BATCH, split_on_error=True
        )

    async def run(self, stopping: asyncio.Event) -> None:
        self.parsers.start()  # from the loop's thread, which lives as long as the stage
        renewing = asyncio.create_task(self._keep_leases())
        try:
            while not stopping.is_set():
                self.wakeup.clear()
                await self.arrivals.settle()  # woken by a reply: is it a burst's first?
                waited = await let_flood_pass(self.arrivals, stopping, "answering")
                busy = {request_id for request_id in self._held.values() if request_id}
                rows = await asyncio.to_thread(self.store.claim_inbound, BATCH, LEASE, busy)
                self._held.update((row.id, row.request_id) for row in rows if row.id is not None)
                for row in rows:
                    # A flood that starts during a batch holds the rest of it
                    # (leased, renewed) until it has passed: once per batch.
                    if not waited:
                        waited = await let_flood_pass(self.arrivals, stopping, "answering")
                    await self._slots.acquire()
                    task = asyncio.create_task(self._process_released(row, _Slot(self._slots)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if not rows:
                    await idle(
                        self.wakeup, stopping, self.config.daemon.poll_interval.total_seconds()
                    )
            if self._tasks:
                await asyncio.wait(
                    self._tasks, timeout=self.config.daemon.shutdown_timeout.total_seconds()
                )
        finally:
            renewing.cancel()
            self.parsers.close()

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            if self._held:
                await asyncio.to_thread(self.store.renew_inbound_leases, list(self._held), LEASE)

    async def _process_released(self, row: InboundMessage, slot: _Slot) -> None:
        try:
            await self.process(row, slot)
        except Exception:
            log.exception(
                "reply %s: processing failed; it stays stored and is retried after its lease",
                row.id,
            )
            if row.id is not None:
                self._held.pop(row.id, None)  # no longer renewed: the retry waits RETRY_AFTER
                with contextlib.suppress(Exception):  # else it is retried after LEASE
                    await asyncio.to_thread(self.store.renew_inbound_leases, [row.id], RETRY_AFTER)
        finally:
            self._held.pop(row.id or 0, None)
            slot.release()
            self.wakeup.set()  # the next reply to the same request may be claimed now

    async def process(self, row: InboundMessage, slot: _Slot | None = None) -> str:
        """Answer the request `row` replies to, or record why not; the result's name.

        The parse goes to a worker process (`parsers`); then one worker-thread
        hop for everything up to the decision (find the request, the checks,
        and a refusal's records), then one shared by the answers recorded
        together (`_recording`). A reply that needs the LLM gives back its
        `slot` and waits for the LLM lane; "deferred" when that lane is full
        (the reply is taken again after DEFER_FOR).
        """
        assert row.id is not None
        parsed = await self.parsers.parse(row.raw, row.envelope_from)
        checked = await asyncio.to_thread(self._check, row, parsed)
        if checked.refused:
            result = checked.refused
        elif not self._needs_llm(checked):
            result = await self._decide_and_record(row, checked)
        elif self._llm_waiting >= LLM_BACKLOG:
            self._held.pop(row.id, None)
            await asyncio.to_thread(self.store.renew_inbound_leases, [row.id], DEFER_FOR)
            log.info("reply %s: the LLM lane is full; taken again later", row.id)
            return "deferred"
        else:
            if slot is not None:
                slot.release()
            self._llm_waiting += 1
            try:
                async with self._llm_slots:
                    result = await self._decide_and_record(row, checked)
            finally:
                self._llm_waiting -= 1
        request_id = checked.request.id if checked.request else None
        log.info(
            "reply %s (%s) for request %s: %s",
            row.id,
            checked.parsed.message_id,
            request_id,
            result,
        )
        if result != "answered":
            self.metrics.reply_refused(result)
        self.on_processed()  # an answer to resume, or a confirmation or error email to send
        return result

    def _check(self, row: InboundMessage, parsed: ParsedReply) -> _Checked:
        """Find the request, check the reply may answer it; a refusal is recorded here."""
        request: FeedbackRequest | None = None
        if parsed.malformed is not None:  # before anything else reads what it says
            if row.request_id is not None:
                request = self.store.find(row.request_id, with_state=False)
            refused = self._refuse(
                row, parsed, request, Refusal(RefusalKind.MALFORMED, parsed.malformed)
            )
            return _Checked(parsed, request, refused=refused)
        try:
            token, request = self._locate(row, parsed)
            issued_to = self._admissible(row, parsed, token, request)
        except Refusal as refusal:
            return _Checked(parsed, request, refused=self._refuse(row, parsed, request, refusal))
        return _Checked(parsed, request, issued_to)

    def _locate(self, row: InboundMessage, parsed: ParsedReply) -> tuple[str, FeedbackRequest]:
        """The reply's token and request: from its recipient, else (if allowed) its thread.

        A reply matched through its thread answers with the request's current
        token, so every later check (signed for the assignee, expiry) holds it too.
        """
        token = _token_of(row, addressing(self.config))
        if token is not None:
            request = self.store.find(tokens.read(token).request_id, with_state=False)
            if request is None:
                raise Refusal(RefusalKind.UNMATCHED, "the token names no request of ours")
            return token, request
        inbound = self.config.inbound
        if not inbound.thread_fallback and inbound.authentication.require == "none":
            raise Refusal(
                RefusalKind.UNMATCHED,
                "no token in the recipient; matching by In-Reply-To/References needs "
                "[inbound.authentication].require or [inbound].thread_fallback",
            )
        request = self.store.find_by_notification(_thread_ids(parsed))
        if request is None or request.token is None:
            raise Refusal(
                RefusalKind.UNMATCHED,
                "no token in the recipient, no notification of ours in the thread",
            )
        return request.token, request

    def _authenticated(self, row: InboundMessage, parsed: ParsedReply) -> None:
        """Refuse, unless the From domain is authenticated as `[inbound.authentication]` requires."""
        verdict = authentication.check(
            row.raw, parsed.from_address or "", self.config.inbound.authentication, self.dnsfunc
        )
        if not verdict.passed:
            raise Refusal(RefusalKind.UNAUTHENTICATED, verdict.reason)

    def _admissible(
        self, row: InboundMessage, parsed: ParsedReply, token: str, request: FeedbackRequest
    ) -> str:
        """The address that may answer `request`, once the reply passed every check but the outcome."""
        if parsed.machine_reason is not None:
            raise Refusal(RefusalKind.MACHINE_MAIL, parsed.machine_reason)
        if parsed.from_address is None:  # no one mailbox in From: nobody to tell, nobody told
            raise Refusal(RefusalKind.WRONG_SENDER, parsed.from_error or "no From address")
        issued_to = self._issued_to(token, request)
        if parsed.from_address != issued_to:
            ignored = Tell(issued_to, "wrong_sender", {"from_address": parsed.from_address})
            why = f"From {parsed.from_address} is not {issued_to}"
            raise Refusal(RefusalKind.WRONG_SENDER, why, ignored)
        self._authenticated(row, parsed)  # never told: the sender may not be who From says
        try:
            tokens.verify(token, issued_to, self.config.secret_keys, self.config.tokens.max_age)
        except tokens.ExpiredToken as exc:
            issued = f"token issued {exc.parts.issued_at.isoformat()}"
            raise Refusal(
                RefusalKind.EXPIRED, issued, Tell(issued_to, "expired", renew=token)
            ) from None
        if request.status == RequestStatus.CANCELLED:
            cancelled = Tell(issued_to, "cancelled")
            raise Refusal(RefusalKind.CANCELLED, "the request was cancelled", cancelled)
        if request.status != RequestStatus.PENDING:
            told = _already_answered(request, issued_to)
            raise Refusal(RefusalKind.ALREADY_ANSWERED, request.status, told)
        if _revoked(token, request):
            replaced = Tell(issued_to, "expired", renew=token)
            raise Refusal(
                RefusalKind.EXPIRED, "revoked: a fresh link replaced this token", replaced
            )
        return issued_to

    def _fresh_link(
        self, request: FeedbackRequest, to: str, token: str
    ) -> tuple[str, Transition | None]:
        """The link offered for a reply through an expired or revoked one, and its change if new.

        A pending request's assignee gets its current link if that one still
        works, else a fresh token (the old ones revoked, `transitions.token_renewed`),
        recorded only with the mail that carries it: the error-mail limits
        hold, so a flood of replies to an old link mints no flood of tokens.
        """
        current, keys = request.token or "", self.config.secret_keys
        if current != token and _works(current, to, keys, self.config.tokens.max_age):
            return addressing(self.config).address(current), None
        fresh = tokens.mint(request.id, to, keys)
        renewed = transitions.token_renewed(request.id, before=current, after=fresh, to=to)
        return addressing(self.config).address(fresh), renewed

    @staticmethod
    def _needs_llm(checked: _Checked) -> bool:
        """Whether deciding takes an LLM call: as `outcomes.decide` would, without it."""
        emit = checked.request.emit if checked.request else None
        feedback = checked.parsed.first_line
        return bool(emit) and bool(feedback.strip()) and exact_match(feedback, emit or ()) is None

    async def _decide_and_record(self, row: InboundMessage, checked: _Checked) -> str:
        parsed, request, issued_to = checked.parsed, checked.request, checked.issued_to
        assert request is not None
        decision = await decide_feedback(self.config, self.metrics, request, parsed.first_line)
        if decision.method == "undecided":
            refusal = Refusal(
                RefusalKind.UNDECIDED,
                {
                    "reason": decision.detail,
                    "text": parsed.text[:TEXT_KEPT],
                    "llm_calls": decision.llm_calls,
                },
            )
            # Why (the LLM's answer, the provider's error) is for the audit trail only.
            told = Tell(issued_to, "undecided", {"your_reply": parsed.first_line})
            refusal = replace(refusal, tell=told)
            return await asyncio.to_thread(self._refuse, row, parsed, request, refusal)
        if not await self._recording(_Answer(row, parsed, request, issued_to, decision)):
            return await asyncio.to_thread(self._lost_race, row, parsed, request, issued_to)
        self.metrics.answered((utcnow() - request.created_at).total_seconds())
        return "answered"

    def _lost_race(
        self, row: InboundMessage, parsed: ParsedReply, request: FeedbackRequest, issued_to: str
    ) -> str:
        """Another answer was recorded first: refuse this one, telling what the answer was."""
        latest = self.store.get(request.id)
        told = _already_answered(latest, issued_to)
        why = "another answer won the race"
        return self._refuse(row, parsed, request, Refusal(RefusalKind.ALREADY_ANSWERED, why, told))

    def _refuse(
        self,
        row: InboundMessage,
        parsed: ParsedReply,
        request: FeedbackRequest | None,
        refusal: Refusal,
    ) -> str:
        """Record the refusal: its reason in the trail, its error mail if any, the reply done.

        One transaction (`transitions.refused`); returns the refusal's result.
        """
        assert row.id is not None
        detail = {
            "from": parsed.from_address,
            "message_id": parsed.message_id,
            "why": refusal.reason,
        }
        transitions.refused(
            self.store,
            refusal,
            request_id=request.id if request else None,
            actor=parsed.from_address or "unknown",
            source=AnswerSource.EMAIL,
            detail=detail,
            inbound=row.id,
            mail=self._error_mail(request, refusal.tell),
            events=transitions.events_of(self.config),
        )
        return str(refusal.kind)

    def _error_mail(self, request: FeedbackRequest | None, tell: Tell | None) -> ErrorMail | None:
        """The error mail a refusal asks for, with its limits: per request, one per address and kind a day.

        Rejection mail is how servers get blocklisted, so it is rate-limited,
        per request so that one error never hides feedback on another: one
        mail per address and kind, ERROR_MAILS_PER_REQUEST in all, a day. It
        only ever goes to the address the token was issued to. A reply through
        a dead link is offered one that works while the request is pending.
        """
        if request is None or tell is None:
            return None
        extra, change = dict(tell.extra), None
        reply_to = reply_to_of(self.config, request)
        if tell.renew is not None and request.status == RequestStatus.PENDING:
            extra["fresh_reply_to"], change = self._fresh_link(request, tell.to, tell.renew)
            reply_to = None if change is not None else reply_to
        message = compose.error_mail(
            tell.kind,
            content_of(request, self.config),
            sender=sender(self.config),
            to=tell.to,
            thread_id=request.notification_id or "",
            reply_to=reply_to,
            **extra,
        )
        kind = f"error:{tell.kind}"
        row = queue_row(message, kind=kind, request_id=request.id, recipient=tell.to)
        limits = (
            MailLimit(ERROR_MAIL_WINDOW, to=tell.to, kind=kind, request_id=request.id),
            MailLimit(ERROR_MAIL_WINDOW, request_id=request.id, at_most=ERROR_MAILS_PER_REQUEST),
        )
        return ErrorMail(row, limits, change)

    def _issued_to(self, token: str, request: FeedbackRequest) -> str:
        """The address the token was issued to: the request's assignee, if the token is signed for it."""
        assignee = request.assigned_to or ""
        try:
            tokens.verify(token, assignee, self.config.secret_keys, max_age=None)
        except tokens.BadToken:
            raise Refusal(
                RefusalKind.BAD_TOKEN, "not signed for the current assignee (reassigned or forged)"
            ) from None
        return assignee

    async def _record_together(self, answers: list[_Answer]) -> list[bool]:
        return await asyncio.to_thread(self._record, answers)

    def _record(self, answers: list[_Answer]) -> list[bool]:
        """Answer each request, queue its confirmation, mark its reply done: one commit for all.

        Which answers won: one that lost its race (another answer came first)
        wrote nothing.
        """
        events = transitions.events_of(self.config)
        return transitions.record(self.store, [self._answered(a, events) for a in answers])

    def _answered(self, answer: _Answer, events: transitions.Events | None) -> Transition:
        row, parsed, request, issued_to, decision = answer
        assert row.id is not None
        outcome = decision.outcome if request.emit else None
        confirmation = compose.confirmation(
            content_of(request, self.config),
            sender=sender(self.config),
            to=issued_to,
            thread_id=request.notification_id or "",
            outcome=outcome,
            feedback=parsed.first_line,
            read_as=decision.method,
        )
        detail = {
            "outcome": outcome,
            "method": decision.method,
            "decision": decision.detail,
            "llm_calls": decision.llm_calls,
            "message_id": parsed.message_id,
            "text": parsed.text[:TEXT_KEPT],
        }
        mail = queue_row(
            confirmation, kind="confirmation", request_id=request.id, recipient=issued_to
        )
        recorded = transitions.Answer(
            outcome, parsed.first_line, AnswerSource.EMAIL, issued_to, detail
        )
        return transitions.answered(request.id, recorded, mail=mail, inbound=row.id, events=events)


def _already_answered(request: FeedbackRequest, to: str) -> Tell:
    """Tell `to` the request was already answered, and how."""
    extra = {"answered_outcome": request.outcome, "answered_feedback": request.feedback}
    return Tell(to, "already_answered", extra)


def _revoked(token: str, request: FeedbackRequest) -> bool:
    """Whether `token` was issued before the request's current token: replaced by a fresh link."""
    current = request.token
    return current is not None and tokens.read(token).issued_at < tokens.read(current).issued_at


def _works(token: str, address: str, keys: Sequence[str], max_age: timedelta) -> bool:
    try:
        tokens.verify(token, address, keys, max_age)
    except (tokens.BadToken, tokens.ExpiredToken):
        return False
    return True


def _token_of(row: InboundMessage, reply_addressing: tokens.ReplyAddressing) -> str | None:
    """The token in the first of the reply's recipients that carries one."""
    for recipient in row.recipients:
        try:
            token = reply_addressing.token_in(recipient)
        except tokens.BadToken:
            continue
        if token is not None:
            return token
    return None


def _thread_ids(parsed: ParsedReply) -> list[str]:
    """The Message-IDs a reply answers, nearest first, as stored: `<id>`, ours lowercase."""
    nearest = [*parsed.in_reply_to, *reversed(parsed.references)][:THREAD_IDS]
    ids = [f"<{m.strip().strip('<>').strip()}>" for m in nearest]
    return list(dict.fromkeys(i for m in ids for i in (m, m.lower())))
