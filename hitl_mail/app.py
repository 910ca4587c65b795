"""One `App` owns the daemon's life: store, stages, SMTP listener, then ready; shutdown in reverse.

Startup: migrations, the SMTP listener, the sending, answering, resume and
timer stages, the HTTP server and the health endpoint; `serve` then says `READY=1` to systemd. Shutdown: stop
accepting mail, let the stages finish what they hold within
`[daemon].shutdown_timeout` (anything unfinished stays in its table for the
next start), close the store. Usable as `async with App(config) as app:`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from hitl_mail import outcomes, systemd
from hitl_mail.answering import Answering
from hitl_mail.api import HttpApi, HttpServer
from hitl_mail.config import Config
from hitl_mail.delivery import Deliveries
from hitl_mail.listener import ListenerProcess
from hitl_mail.metrics import HealthServer, Metrics
from hitl_mail.models import RequestStatus
from hitl_mail.outbound import Outbox
from hitl_mail.resume import Resumer
from hitl_mail.retention import RawRetention
from hitl_mail.store import Store
from hitl_mail.timers import Timers
from hitl_mail.waiting import Arrivals

log = logging.getLogger(__name__)

STAGES_NICENESS = 2  # the daemon's own process, after the SMTP listener has started


_lowered = False


def _lower_priority_once() -> None:
    """`STAGES_NICENESS` below the listener, once per process (an App may start again in it)."""
    global _lowered
    if not _lowered:
        os.nice(STAGES_NICENESS)
        _lowered = True


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(config.daemon.database_url)
        self.stopping = asyncio.Event()
        self.ready = False
        self.smtp_port = 0
        self.health_port = 0
        self.http_port = 0
        self.metrics = Metrics(
            request_counts=self.store.counts_by_status,
            ready=lambda: self.ready,
            request_statuses=tuple(RequestStatus),
        )
        # Replies the SMTP listener stored lately: during a flood of them, every
        # stage waits (at most waiting.MAX_YIELD at a time) and leaves the CPU
        # and SQLite's write lock to the listener.
        self.arrivals = Arrivals()
        self.outbox = Outbox(
            self.store,
            config.outbound,
            config.daemon.poll_interval,
            observe=self._observe_send,
            arrivals=self.arrivals,
        )
        self.resumer = Resumer(
            config,
            self.store,
            on_paused_again=self.outbox.wakeup.set,
            observe=self._observe_resume,
            arrivals=self.arrivals,
        )
        self.answering = Answering(
            config,
            self.store,
            on_processed=self._reply_processed,
            metrics=self.metrics,
            arrivals=self.arrivals,
        )
        self.timers = Timers(config, self.store, on_fired=self._timer_fired, arrivals=self.arrivals)
        self.deliveries = Deliveries(
            config,
            self.store,
            config.daemon.poll_interval,
            observe=self.metrics.webhook_attempt,
            arrivals=self.arrivals,
        )
        self.retention = RawRetention(config, self.store)
        self.listener = ListenerProcess(
            config,
            on_stored=self._stored,
            on_refused=self.metrics.reply_refused,
            on_exit=self._listener_exited,
        )
        self._health: HealthServer | None = None
        self._http: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.failed: str | None = None  # the stage whose crash stopped the daemon

    async def __aenter__(self) -> App:
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def startup(self) -> None:
        """Migrate, listen, start the stages; raises OSError when a port cannot be bound.

        Not `systemd.ready()`: the caller handles signals before calling this, and
        says ready when `ready` is set. A stop (`stopping`) arriving meanwhile ends
        the start-up between two steps, not ready; `shutdown()` stops what started.
        """
        config = self.config
        await asyncio.to_thread(self.store.migrate)
        if self.stopping.is_set():
            return
        self.smtp_port = await self.listener.start()
        if self.stopping.is_set():
            return
        # Accepting mail comes first: an SMTP client waits on every 250, while
        # answering, sending and resuming only have to keep up. The listener
        # keeps its priority; this process (and the resume workers it starts
        # next, lower still) yields the CPU to it under load.
        _lower_priority_once()
        self.resumer.warm_up()
        # litellm takes seconds to import: do it now, off the loop, and never wait for it.
        threading.Thread(target=outcomes.preload, name="preload-litellm", daemon=True).start()
        for stage in (
            self.outbox,
            self.answering,
            self.resumer,
            self.timers,
            self.retention,
            self.deliveries,
        ):
            task = asyncio.create_task(stage.run(self.stopping), name=type(stage).__name__)
            task.add_done_callback(self._stage_ended)
            self._tasks.append(task)
        if config.http.enabled:
            await self._start_http()
        if config.health.enabled and not self._health_on_http():
            self._health = HealthServer(self.metrics)
            self.health_port = await self._health.start(config.health.host, config.health.port)
        if self.stopping.is_set():
            return
        self.ready = True
        log.info(
            "ready: SMTP on %s:%d (listener process %s), database %s",
            config.inbound.host,
            self.smtp_port,
            self.listener.pid,
            _redacted(config.daemon.database_url),
        )

    async def _start_http(self) -> None:
        api = HttpApi(
            self.config,
            self.store,
            self.metrics,
            on_answered=self._reply_processed,
            on_created=self._request_created,
        )
        self._http = HttpServer(api)
        self.http_port = await self._http.start(self.config.http.host, self.config.http.port)
        if self._health_on_http():
            self.health_port = self.http_port

    def _health_on_http(self) -> bool:
        """[health] naming [http]'s own address: the one server serves both."""
        health, http = self.config.health, self.config.http
        return http.enabled and (health.host, health.port) == (http.host, http.port)

    async def shutdown(self) -> None:
        self.ready = False
        systemd.stopping()
        log.info("stopping")
        # One budget for everything, so `serve` exits within shutdown_timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.daemon.shutdown_timeout.total_seconds()
        self.stopping.set()
        await self.listener.stop((deadline - loop.time()) / 2)
        if self._http is not None:
            await self._http.stop()  # no more answers over HTTP either
        await self.resumer.drain(max(deadline - loop.time(), 0.0))
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=max(deadline - loop.time(), 0.1))
            for task in late:
                task.cancel()
        if self._health is not None:
            await self._health.stop()
        await outcomes.close_llm_clients()
        self.store.close()
        log.info("stopped")

    def reload(self, config: Config) -> None:
        """SIGHUP: routing, auto-response and LLM settings change without dropping a connection."""
        self.config = config
        self.answering.config = config
        self.timers.config = config
        self.deliveries.reload(config)
        self.retention.config = config
        self.resumer.reload(config)
        if self._http is not None:
            self._http.api.reload(config)
        log.info("configuration reloaded from %s", config.source)

    def _stage_ended(self, task: asyncio.Task[None]) -> None:
        """A stage that raised stops the daemon: a silent stall is worse than a restart.

        Nothing is lost: the stage's work stays in its table, and the service
        manager (`Restart=on-failure`) starts a daemon that takes it up again.
        """
        if task.cancelled() or task.exception() is None:
            return
        log.critical(
            "the %s stage failed; stopping so that the daemon is restarted",
            task.get_name(),
            exc_info=task.exception(),
        )
        self.failed = self.failed or task.get_name()
        self.stopping.set()

    def _listener_exited(self, code: int | None) -> None:
        log.critical(
            "the SMTP listener process ended (exit code %s); stopping so that the daemon is restarted",
            code,
        )
        self.failed = self.failed or "SMTP listener"
        self.stopping.set()

    def _stored(self, count: int) -> None:
        self.metrics.reply_accepted(count)
        self.arrivals.note(count)
        self.answering.wakeup.set()

    def _observe_send(self, kind: str, result: str) -> None:
        kind = kind.partition(":")[0]  # "error:expired" counts as an error email
        if result == "sent":
            self.metrics.email_sent(kind)
        else:
            self.metrics.email_failed(kind, permanent=result == "failed")

    def _timer_fired(self, kind: str) -> None:
        self.resumer.wakeup.set()
        self.outbox.wakeup.set()
        self.deliveries.wakeup.set()

    def _request_created(self) -> None:
        self.outbox.wakeup.set()
        self.deliveries.wakeup.set()

    def _reply_processed(self) -> None:
        self.resumer.wakeup.set()
        self.outbox.wakeup.set()
        self.deliveries.wakeup.set()

    def _observe_resume(self, ok: bool) -> None:
        (self.metrics.resumed if ok else self.metrics.resume_failed)()


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"
