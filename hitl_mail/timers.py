"""Fire reminders, escalations and auto-responses on time, once, across restarts and daemons.

The `timers` table is the truth. APScheduler holds a single job, set to the
earliest unfired timer; when it rings, the stage fires everything due (timers
that passed while the daemon was down fire at once, at start), then sets the
job to the next one. Every poll interval the stage looks for an earlier timer that a
flow process stored meanwhile. Memory does not grow with the number of
pending deadlines.

Each timer fires in one transaction that claims it (`fired_at` set by one
conditional update) and changes its request with another (`status =
'pending'` still true), so a reply arriving at the same instant, or a second
daemon on the same PostgreSQL database, still yields exactly one answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from hitl_mail import compose, tokens, transitions
from hitl_mail.config import Config
from hitl_mail.deadlines import effective_policy
from hitl_mail.intake import addressing, content_of, notification_row, sender
from hitl_mail.models import FeedbackRequest, RequestStatus, Timer, TimerKind
from hitl_mail.outbound import queue_row
from hitl_mail.store import Store, Transition
from hitl_mail.waiting import Arrivals, idle, let_flood_pass

log = logging.getLogger(__name__)

ACTOR = "hitl-mail"
BATCH = 500
FIRE_JOB = "fire-due-timers"


class Timers:
    """The timer stage; `on_fired(kind)` is told after each timer that changed something."""

    def __init__(
        self,
        config: Config,
        store: Store,
        on_fired: Callable[[str], None],
        arrivals: Arrivals | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_fired = on_fired
        self.arrivals = arrivals or Arrivals()  # replies the SMTP listener stored lately
        self.scheduler: AsyncIOScheduler | None = None
        self._next: datetime | None = None
        self._due = asyncio.Event()

    @property
    def events(self) -> transitions.Events | None:
        return transitions.events_of(self.config)  # the configuration may be reloaded

    async def run(self, stopping: asyncio.Event) -> None:
        self.scheduler = AsyncIOScheduler(timezone=UTC, event_loop=asyncio.get_running_loop())
        self.scheduler.start()
        self._due.set()  # fire at once whatever fell due while we were down
        try:
            while not stopping.is_set():
                if self._due.is_set():
                    self._due.clear()
                    await self._fire_due()
                else:
                    await self._refresh()
                await idle(self._due, stopping, self.config.daemon.poll_interval.total_seconds())
                await let_flood_pass(self.arrivals, stopping, "timers")
        finally:
            # Firing happens here, in this loop, never inside a scheduler job,
            # so stopping never abandons a firing half-way.
            self.scheduler.shutdown(wait=False)

    def _schedule(self, at: datetime) -> None:
        """Ring at `at`: the scheduler's one job only wakes this loop."""
        assert self.scheduler is not None
        self._next = at
        self.scheduler.add_job(
            self._ring,
            "date",
            run_date=at,
            id=FIRE_JOB,
            replace_existing=True,
            misfire_grace_time=None,
        )

    async def _ring(self) -> None:
        self._due.set()

    async def _refresh(self) -> None:
        """Bring the alarm forward when a flow process stored an earlier timer meanwhile."""
        due = await asyncio.to_thread(self.store.next_timer_due)
        if due is not None and (self._next is None or due < self._next):
            self._schedule(due)

    async def _fire_due(self) -> None:
        self._next = None
        while batch := await asyncio.to_thread(self.store.due_timers, BATCH):
            for timer in batch:
                await asyncio.to_thread(self.fire, timer)
        due = await asyncio.to_thread(self.store.next_timer_due)
        if due is not None:
            self._schedule(due)

    def fire(self, timer: Timer) -> bool:
        assert timer.id is not None
        act = {
            TimerKind.REMINDER: self._remind,
            TimerKind.ESCALATE: self._escalate,
            TimerKind.AUTO: self._auto_respond,
        }[timer.kind]
        acted = self.store.fire_timer(timer.id, act)
        if acted:
            log.info("request %s: %s timer fired", timer.request_id, timer.kind)
            self.on_fired(timer.kind)
        return acted

    def _remind(self, request: FeedbackRequest) -> Transition | None:
        if request.status != RequestStatus.PENDING or not request.token:
            return None
        message = compose.reminder(
            content_of(request, self.config),
            sender=sender(self.config),
            to=request.assigned_to or "",
            reply_to=addressing(self.config).address(request.token),
            thread_id=request.notification_id or "",
        )
        mail = queue_row(
            message, kind="reminder", request_id=request.id, recipient=request.assigned_to or ""
        )
        return transitions.reminded(request, mail=mail, events=self.events)

    def _escalate(self, request: FeedbackRequest) -> Transition | None:
        policy = effective_policy(
            self.config, request.routing_rule, request.method_name, request.flow_class
        )
        new = (policy["escalate_to"] or "").lower()
        if request.status != RequestStatus.PENDING or not new or new == request.assigned_to:
            return None
        old, old_thread = request.assigned_to or "", request.notification_id or ""
        token = tokens.mint(request.id, new, self.config.secret_keys)
        values = {
            "assigned_to": new,
            "token": token,
            "notification_id": compose.make_message_id(self.config.outbound.domain),
        }
        for name, value in values.items():  # the request is detached: only to compose with
            setattr(request, name, value)
        told = compose.error_mail(
            "reassigned",
            content_of(request, self.config, reader=old),
            sender=sender(self.config),
            to=old,
            thread_id=old_thread,
            reply_to=None,
            replied=False,
            reassigned_to=new,
            reassigned_after=policy["escalate_after"],
        )
        why = compose.Reassignment(old, policy["escalate_after"])
        mail = [
            notification_row(self.config, request, reassigned=why),
            queue_row(told, kind="error:reassigned", request_id=request.id, recipient=old),
        ]
        return transitions.escalated(
            request.id, before=old, after=values, mail=mail, events=self.events
        )

    def _auto_respond(self, request: FeedbackRequest) -> Transition | None:
        outcome = request.auto_outcome
        if outcome is None:
            return None
        to = request.assigned_to or ""
        message = compose.auto_response(
            content_of(request, self.config),
            sender=sender(self.config),
            to=to,
            thread_id=request.notification_id or "",
            outcome=outcome,
        )
        mail = queue_row(message, kind="auto-response", request_id=request.id, recipient=to)
        # A person who answered first wins: this change then matches no row and writes nothing.
        return transitions.auto_answered(request, mail=mail, events=self.events)
