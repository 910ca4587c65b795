"""The SMTP edge in a process of its own, so the 250s keep their pace while the daemon drains.

In the daemon's process the listener shared the GIL and the event loop with
answering, sending and recording: during a burst of 2,000 replies it accepted
150 a second, against 1,250 for the edge alone; in a process of its own, 468,
with the backlog drained as fast as before (bench/findings.md).

The daemon binds the listening socket itself, so a port in use fails `serve`
at once and port 0 works, and hands it to a child forked from a fork server
that has already imported `hitl_mail.inbound` (milliseconds per start, not an
interpreter's import time). The child runs `inbound.ReplyHandler` with a
`Store` of its own and reports through a pipe: how many replies it stored,
once per turn of its event loop (one message for a whole group commit), which
wakes the answering stage, and each refusal's reason, for /metrics. It
ignores SIGINT, SIGTERM and SIGHUP (a terminal or a service manager may send
them to every process of the daemon): the daemon stops it over the pipe once
it stops accepting mail, after the commits in flight, and the child also stops
by itself when the pipe closes because the daemon is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
from collections.abc import Callable
from multiprocessing.connection import Connection

from hitl_mail.config import Config

log = logging.getLogger(__name__)

READY = b"ready"
STORED = b"s:"  # + how many, in ASCII digits
REFUSED = b"r:"  # + the reason
STOP = b"stop"
START_TIMEOUT = 60.0

_forkserver = multiprocessing.get_context("forkserver")
# The first module keeps the fork server alive through a stop signal sent to the group.
_forkserver.set_forkserver_preload(
    ["hitl_mail.forkserver_preload", "hitl_mail.listener", "hitl_mail.inbound", "hitl_mail.parsing"]
)


class ListenerProcess:
    """Starts, watches and stops the child that runs the SMTP listener."""

    def __init__(
        self,
        config: Config,
        on_stored: Callable[[int], None],
        on_refused: Callable[[str], None],
        on_exit: Callable[[int | None], None],
    ) -> None:
        self.config = config
        self.on_stored = on_stored
        self.on_refused = on_refused
        self.on_exit = on_exit  # the child ended without being asked to (its exit code)
        self.process: multiprocessing.process.BaseProcess | None = None
        self._pipe: Connection | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def start(self) -> int:
        """Bind, start the child, wait until it listens; the port. Raises OSError when the port is taken."""
        settings = self.config.inbound
        sock = socket.create_server((settings.host, settings.port), backlog=1024)
        port: int = sock.getsockname()[1]
        ours, theirs = _forkserver.Pipe(duplex=True)
        try:
            self.process = _forkserver.Process(
                target=serve, args=(self.config, sock, theirs), name="hitl-mail-smtp", daemon=True
            )
            self.process.start()
        finally:
            theirs.close()  # the child holds its own copies of both
            sock.close()
        self._pipe = ours
        try:
            said = await asyncio.wait_for(asyncio.to_thread(ours.recv_bytes), START_TIMEOUT)
        except (EOFError, TimeoutError):
            said = b""
        if said != READY:
            await self._end(0.0)
            raise OSError(f"the SMTP listener did not start (exit code {self.process.exitcode})")
        asyncio.get_running_loop().add_reader(ours.fileno(), self._read)
        return port

    async def stop(self, timeout: float) -> None:
        """Stop accepting; the child finishes its commits in flight within `timeout`."""
        self._stopping = True
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.send_bytes(STOP)
        await self._end(timeout)

    async def _end(self, timeout: float) -> None:
        process, pipe = self.process, self._pipe
        if process is not None and process.pid is not None:
            await asyncio.to_thread(process.join, timeout)
            if process.is_alive():
                log.warning("the SMTP listener did not stop within %.0fs; killed", timeout)
                process.kill()
                await asyncio.to_thread(process.join, 5.0)
        if pipe is not None:
            with contextlib.suppress(ValueError, OSError):  # already closed
                asyncio.get_running_loop().remove_reader(pipe.fileno())
            pipe.close()
            self._pipe = None

    def _read(self) -> None:
        pipe = self._pipe
        assert pipe is not None
        try:
            while pipe.poll():
                said = pipe.recv_bytes()
                if said.startswith(STORED):
                    self.on_stored(int(said[len(STORED) :]))
                elif said.startswith(REFUSED):
                    self.on_refused(said[len(REFUSED) :].decode())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            if not self._stopping:
                process = self.process
                if process is not None:
                    process.join(5.0)
                self.on_exit(process.exitcode if process is not None else None)


# -- in the child ---------------------------------------------------------------------


class StoredCount:
    """Stored replies, told once per turn of the event loop with their count.

    The DATA handlers whose group commit has just finished all run in one
    turn; telling the daemon once for all of them saves the listener a write
    and the daemon a wake-up per reply.
    """

    def __init__(self, tell: Callable[[int], None]) -> None:
        self.tell = tell
        self.count = 0

    def __call__(self) -> None:
        if self.count == 0:
            asyncio.get_running_loop().call_soon(self._flush)
        self.count += 1

    def _flush(self) -> None:
        count, self.count = self.count, 0
        self.tell(count)


def serve(config: Config, sock: socket.socket, pipe: Connection) -> None:
    """The child's entry point: serve SMTP on `sock` until told to stop."""
    from hitl_mail.children import die_with_parent

    die_with_parent()  # the fork server, which itself ends when the daemon does
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from hitl_mail import logs

    logs.setup(config.logging)
    asyncio.run(_serve(config, sock, pipe))


async def _serve(config: Config, sock: socket.socket, pipe: Connection) -> None:
    from hitl_mail.inbound import ReplyHandler, start_listener
    from hitl_mail.intake import addressing
    from hitl_mail.store import Store

    def tell(what: bytes) -> None:
        with contextlib.suppress(OSError):  # the daemon is gone; the pipe's EOF stops us
            pipe.send_bytes(what)

    store = Store(config.daemon.database_url)
    handler = ReplyHandler(
        store,
        addressing(config),
        config.secret_keys,
        on_stored=StoredCount(lambda count: tell(STORED + str(count).encode())),
        observe_refusal=lambda reason: tell(REFUSED + reason.encode()),
        settings=config.inbound,
        token_max_age=config.tokens.max_age,
    )
    server = await start_listener(config.inbound, handler, config.outbound.domain, sock=sock)
    stop = asyncio.Event()

    def read() -> None:
        try:
            while pipe.poll():
                if pipe.recv_bytes() == STOP:
                    stop.set()
        except (EOFError, OSError):
            stop.set()

    loop = asyncio.get_running_loop()
    loop.add_reader(pipe.fileno(), read)
    tell(READY)
    await stop.wait()
    loop.remove_reader(pipe.fileno())
    server.close()
    await handler.close()  # the commits in flight finish: their 250s are promises
    store.close()
    pipe.close()
