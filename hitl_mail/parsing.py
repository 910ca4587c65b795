"""Parse stored replies in worker processes of our own, each parse bounded in time.

A stranger's message can make parsing slow: a charset whose codec is
quadratic, a structure that defeats a parser's shortcuts. In a thread of the
daemon such a parse would hold that thread, and through the GIL the whole
daemon, for as long as it takes. So `raw bytes -> ParsedReply` runs here, in
a few worker processes forked from the fork server (which has already
imported `hitl_mail.replies`): the daemon sends the raw message over a pipe
and waits at most `[inbound].parse_timeout` for the answer. A worker that
overruns is killed and replaced, and the message reads as malformed, which
answering refuses before any other check. A round trip costs a pickle and a
pipe each way, not a process per message.

Workers die with the daemon (`children.die_with_parent`; their parent is the
fork server, which ends when the daemon does) and ignore the signals a
terminal or a service manager sends to a whole process group: the daemon
closes their pipes when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from hitl_mail import children
from hitl_mail.replies import ParsedReply, parse_reply

log = logging.getLogger(__name__)

WORKERS = 2  # parses are milliseconds each: two keep up with two cores' worth of replies
STOP_TIMEOUT = 2.0

_forkserver = multiprocessing.get_context("forkserver")


def unreadable(why: str) -> ParsedReply:
    """What is known of a message that could not be read safely: nothing but why."""
    return ParsedReply(
        message_id=None,
        from_address=None,
        subject="",
        in_reply_to=(),
        references=(),
        machine_reason=None,
        text="",
        first_line="",
        malformed=why,
    )


Parse = Callable[..., ParsedReply]  # parse_reply's shape: (raw, *, envelope_from, own_...)


@dataclass(frozen=True)
class Ours:
    """Our own addresses and domains: mail from them is our own (machine mail)."""

    addresses: frozenset[str]
    domains: frozenset[str]


class _Worker:
    """One worker process and the daemon's end of its pipe."""

    def __init__(self, ours: Ours, parse: Parse) -> None:
        mine, theirs = _forkserver.Pipe(duplex=True)
        # The fork server was started before the daemon lowered its own priority:
        # a worker would otherwise parse at the SMTP listener's priority, not below it.
        niceness = os.getpriority(os.PRIO_PROCESS, 0)
        self.process: BaseProcess = _forkserver.Process(
            target=work,
            args=(theirs, ours, parse, niceness),
            name="hitl-mail-parse",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            theirs.close()  # the child holds its own copy
        self.pipe: Connection = mine

    async def parse(self, raw: bytes, envelope_from: str | None, timeout: float) -> ParsedReply:
        """The worker's reading of `raw`; raises TimeoutError, or EOFError/OSError if it died."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fd = self.pipe.fileno()

        def answered() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, answered)
        try:
            self.pipe.send((bytes(raw), envelope_from))
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(fd)
        answer = self.pipe.recv()
        assert isinstance(answer, ParsedReply)
        return answer

    def stop(self, kill: bool = False) -> None:
        """Close the pipe (the worker exits at its end) and reap it; kill it first if asked."""
        if kill and self.process.is_alive():
            self.process.kill()
        self.pipe.close()
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_TIMEOUT)


class Parsers:
    """A small pool of parse workers: `await parsers.parse(raw, envelope_from)`.

    Callable from any event loop (one at a time waits on each worker), so a
    stage run by `asyncio.run` more than once still shares one pool. Workers
    start at first use or at `start()`; `close()` ends them for good. `parse`
    is what a worker runs: `parse_reply`, or a module-level function of the
    same shape (tests bring a slow one).
    """

    def __init__(
        self, ours: Ours, timeout: float, size: int = WORKERS, parse: Parse = parse_reply
    ) -> None:
        self.ours = ours
        self.timeout = timeout
        self.size = size
        self.parse_function = parse
        self._all: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._closed = False
        self.replaced = 0  # workers killed for overrunning or crashing, since start

    def start(self) -> None:
        while len(self._all) < self.size and not self._closed:
            self._idle.append(self._new())

    async def parse(self, raw: bytes, envelope_from: str | None) -> ParsedReply:
        worker = await self._take()
        try:
            parsed = await worker.parse(raw, envelope_from, self.timeout)
        except TimeoutError:
            log.warning("a stored reply took longer than %gs to read; refused", self.timeout)
            self._replace(worker)
            return unreadable(f"took longer than {self.timeout:g}s to read")
        except (EOFError, OSError) as exc:
            log.warning("the parse worker ended while reading a stored reply (%r); refused", exc)
            self._replace(worker)
            return unreadable("its parser crashed")
        except BaseException:  # cancelled mid-parse: its answer would confuse the next caller
            self._replace(worker)
            raise
        self._give_back(worker)
        return parsed

    def close(self) -> None:
        """End every worker (idle or not: a parse still running reads as crashed)."""
        self._closed = True
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        idle, self._idle = set(self._idle), []
        for worker in list(self._all):
            self._end(worker, kill=worker not in idle)  # an idle one ends at its pipe's end

    def _new(self) -> _Worker:
        worker = _Worker(self.ours, self.parse_function)
        self._all.add(worker)
        return worker

    def _end(self, worker: _Worker, kill: bool) -> None:
        self._all.discard(worker)
        worker.stop(kill=kill)

    async def _take(self) -> _Worker:
        if self._closed:
            raise RuntimeError("the parse workers are closed")
        if self._idle:
            return self._idle.pop()
        if len(self._all) < self.size:
            return self._new()
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed over just as we were cancelled
            raise

    def _give_back(self, worker: _Worker) -> None:
        if self._closed:
            self._end(worker, kill=True)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_hand_over, waiter, worker, self)
                return
        self._idle.append(worker)

    def _replace(self, worker: _Worker) -> None:
        self.replaced += 1
        self._end(worker, kill=True)
        if self._closed:
            return
        try:
            fresh = self._new()
        except Exception:
            log.exception("could not start a parse worker; one is started at the next parse")
            return
        self._give_back(fresh)


def _hand_over(waiter: asyncio.Future[_Worker], worker: _Worker, parsers: Parsers) -> None:
    if waiter.done():  # cancelled meanwhile: the next waiter, or the idle list, gets it
        parsers._give_back(worker)
    else:
        waiter.set_result(worker)


# -- in the worker ------------------------------------------------------------------------


def work(pipe: Connection, ours: Ours, parse: Parse = parse_reply, niceness: int = 0) -> None:
    """The worker's entry point: parse what comes down the pipe until it closes.

    Parsing is the answering stage's work: it runs at the daemon's niceness
    (`niceness`), so under load the SMTP listener comes first, as it does for
    the daemon itself.
    """
    children.die_with_parent()
    if niceness > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            raw, envelope_from = pipe.recv()
        except (EOFError, OSError):
            return
        try:
            parsed = parse(
                raw,
                envelope_from=envelope_from,
                own_addresses=ours.addresses,
                own_domains=ours.domains,
            )
        except Exception as exc:  # parse_reply reads anything; if it ever fails, say so
            parsed = unreadable(f"could not be read ({type(exc).__name__})")
        with contextlib.suppress(OSError):
            pipe.send(parsed)
