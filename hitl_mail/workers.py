"""Resume workers forked from a zygote that has crewAI imported, so they share its memory.

A worker started as a fresh interpreter imports crewAI by itself: about 290 MB
and 1.7 s (more on a loaded machine) per worker. Here one process per pool,
the zygote, imports crewAI, hitl-mail's resume code and the modules of the
flows still waiting for an answer, moves everything it imported out of the
garbage collector's way (`gc.freeze`: no collection writes to those pages
again), and then forks the workers on request. They start in milliseconds
and share the zygote's pages copy-on-write.

The zygote is a multiprocessing fork server of its own (the stdlib's
`forkserver.main` loop, run after that preloading), not the process-wide one
the SMTP listener is started from: preloading crewAI there would put it into
the listener's heap and delay the listener's start by crewAI's import time.
`WorkerPool` is a `ProcessPoolExecutor` whose processes come from the
zygote, so the resume stage keeps the executor's semantics (futures, a dead
worker breaks the pool).

Lifetime: the zygote is started from the daemon's event-loop thread (the
kernel's parent-death signal fires when the *thread* that forked a process
ends) and ends when the daemon ends (`children.die_with_parent`); each worker
does the same with the zygote as its parent. The zygote ignores SIGINT,
SIGTERM and SIGHUP, the workers SIGINT and SIGHUP (a terminal or a service
manager may signal every process of the daemon; the daemon decides; the pool
itself ends workers with SIGTERM), and `WorkerPool.stop` kills them all.

Priority: the zygote imports at a niceness `WORKER_NICENESS` below the
daemon, then takes the workers' `[daemon].resume_priority` ("idle":
SCHED_IDLE), which the workers inherit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import (
    connection,
    context,
    forkserver,
    popen_forkserver,
    reduction,
    resource_tracker,
    spawn,
    util,
)
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any

from hitl_mail.children import die_with_parent

log = logging.getLogger(__name__)

# The stdlib fork server's own helpers, used the way it uses them (not in typeshed).
_connection: Any = connection
_context: Any = context
_util: Any = util

WORKER_NICENESS = 5
JOIN_AFTER_KILL = 2.0  # seconds a killed worker gets to be reaped, each

# Set in the zygote, and therefore in every worker it forks: the worker's parent.
ZYGOTE_PID: int | None = None


class WorkersDidNotStart(BrokenProcessPool):
    """The zygote ended before its workers could be forked (an import that crashed it, a kill)."""


class Zygote(forkserver.ForkServer):
    """The daemon's handle on one zygote: started once, stopped once, never restarted.

    A zygote that died is not started again from wherever a worker happens to
    be asked for (a worker thread, say): its workers died with it, the pool is
    broken, and the resume stage starts a new pool.
    """

    # the stdlib's ForkServer's own attributes
    _lock: threading.Lock
    _forkserver_pid: int | None
    _forkserver_alive_fd: int | None
    _forkserver_address: Any

    def __init__(self, preload: dict[str, Any]) -> None:
        super().__init__()
        self.preload = preload
        self.ready_fd: int | None = None  # readable once the zygote has imported everything
        self.reading = False  # a thread waits on ready_fd (which it then closes)
        self._popen: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def pid(self) -> int | None:
        return self._forkserver_pid

    def ensure_running(self) -> None:
        with self._lock:
            resource_tracker.ensure_running()
            if self._popen is not None:
                if self._popen.poll() is None:
                    return
                self._forkserver_pid = None  # reaped
            if self._started:
                raise WorkersDidNotStart("the resume workers' zygote process ended")
            self._started = True
            self._spawn()

    def _spawn(self) -> None:
        with socket.socket(socket.AF_UNIX) as listener:
            address = _connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            ready_r, ready_w = os.pipe()
            try:
                code = (
                    "from hitl_mail.workers import zygote_main; "
                    f"zygote_main({listener.fileno()}, {alive_r}, {ready_w}, {self.preload!r})"
                )
                exe = spawn.get_executable()
                # A session of its own: a signal sent to the daemon's process group (a
                # terminal's Ctrl-C, a service manager) reaches neither it nor its workers,
                # not even while it starts, before it can ignore one.
                self._popen = subprocess.Popen(
                    [exe, *_util._args_from_interpreter_flags(), "-c", code],
                    pass_fds=(listener.fileno(), alive_r, ready_w),
                    start_new_session=True,
                )
            except BaseException:
                for fd in (alive_w, ready_r):
                    os.close(fd)
                raise
            finally:
                os.close(alive_r)
                os.close(ready_w)
        self._forkserver_address = address
        self._forkserver_alive_fd = alive_w
        self._forkserver_pid = self._popen.pid
        self.ready_fd = ready_r

    def stop(self) -> None:
        """Kill the zygote (its idle workers die with it) and reap it."""
        with self._lock:
            self._started = True  # never started after this
            self._forkserver_pid = None
            if self._popen is not None:
                self._popen.kill()  # nothing if reaped already
                self._popen.wait()
            if self._forkserver_alive_fd is not None:
                os.close(self._forkserver_alive_fd)
                self._forkserver_alive_fd = None
            if self.ready_fd is not None and not self.reading:
                os.close(self.ready_fd)
                self.ready_fd = None
            if self._forkserver_address is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._forkserver_address)
                self._forkserver_address = None


class _Popen(popen_forkserver.Popen):
    """`popen_forkserver.Popen`, asking this pool's zygote instead of the process-wide server."""

    _fds: list[int]

    def __init__(self, process_obj: WorkerProcess) -> None:
        self._zygote = process_obj.zygote
        super().__init__(process_obj)

    def _launch(self, process_obj: Any) -> None:  # as the stdlib's, another server
        import io

        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        _context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            _context.set_spawning_popen(None)
        self.sentinel, w = self._zygote.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = _util.Finalize(self, _util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class WorkerProcess(ForkServerProcess):
    zygote: Zygote

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("zygote", None)  # the daemon's handle; the worker has no use for it
        return state


class _ZygoteContext(ForkServerContext):
    def __init__(self, zygote: Zygote) -> None:
        self._zygote = zygote

    def Process(self, *args: Any, **kwargs: Any) -> WorkerProcess:  # type: ignore[override]
        process = WorkerProcess(*args, **kwargs)
        process.zygote = self._zygote
        return process


class WorkerPool(ProcessPoolExecutor):
    """A process pool whose workers fork from a zygote; `start()` before the first `submit`.

    `start()` waits, off the event loop, for the zygote's imports and then
    forks every worker; a `submit` before that would block its caller for as
    long as crewAI takes to import.
    """

    def __init__(
        self,
        max_workers: int,
        preload: dict[str, Any],
        initializer: Callable[..., None],
        initargs: tuple[Any, ...],
    ) -> None:
        self.zygote = Zygote(preload)
        super().__init__(
            max_workers=max_workers,
            mp_context=_ZygoteContext(self.zygote),
            initializer=initializer,
            initargs=initargs,
        )
        self._started: asyncio.Future[None] | None = None
        self._stopped = False

    async def start(self, flow_classes: Callable[[], Sequence[str]] = tuple) -> None:
        """Start the zygote (from this thread: the loop's), wait for it, fork the workers.

        `flow_classes` (called in a worker thread, once) names the flows whose
        modules the zygote imports too. Every caller waits for the same start.
        """
        if self._started is None:
            self._started = asyncio.ensure_future(self._start(flow_classes))
            self._started.add_done_callback(_retrieve)  # when every waiter was cancelled
        await asyncio.shield(self._started)

    async def _start(self, flow_classes: Callable[[], Sequence[str]]) -> None:
        try:
            await self._start_zygote_then_workers(flow_classes)
        except OSError as exc:  # no process or socket to be had, say
            raise WorkersDidNotStart(f"the resume workers could not be started: {exc}") from exc

    async def _start_zygote_then_workers(self, flow_classes: Callable[[], Sequence[str]]) -> None:
        names = list(await asyncio.to_thread(flow_classes))
        if self._stopped:
            raise WorkersDidNotStart("the resume worker pool was stopped")
        self.zygote.preload["flow_classes"] = names
        self.zygote.ensure_running()  # forked from this thread: it must outlive the zygote
        ready = self.zygote.ready_fd
        assert ready is not None
        self.zygote.reading = True
        try:
            said = await asyncio.to_thread(_read_ready, ready)
        finally:
            os.close(ready)
            self.zygote.ready_fd, self.zygote.reading = None, False
        if not said:
            raise WorkersDidNotStart(
                "the resume workers' zygote ended while importing crewAI and the flow modules"
            )
        await asyncio.to_thread(self._fork_workers)

    def _fork_workers(self) -> None:
        with self._shutdown_lock:
            if self._broken or self._shutdown_thread or self._stopped:
                return
            for _ in range(len(self._processes or {}), self._max_workers):  # type: ignore[attr-defined]
                self._spawn_process()  # type: ignore[attr-defined]

    def worker_pids(self) -> list[int]:
        return [p.pid for p in list((self._processes or {}).values()) if p.pid is not None]

    def stop(self) -> None:
        """End it now: running calls are lost (their callers see the pool broken)."""
        with self._shutdown_lock:  # no worker is forked after this
            self._stopped = True
            processes = list((self._processes or {}).values())
        self.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(JOIN_AFTER_KILL)
        self.zygote.stop()

    def stop_when_idle(self) -> None:
        """Let the calls already submitted finish, then stop (in a thread of its own)."""

        def wait_then_stop() -> None:
            self.shutdown(wait=True)
            self.zygote.stop()

        threading.Thread(target=wait_then_stop, name="retire-workers", daemon=True).start()


def _retrieve(started: asyncio.Future[None]) -> None:
    if not started.cancelled() and started.exception() is not None:
        log.debug("resume workers did not start: %s", started.exception())


def _read_ready(fd: int) -> bytes:
    with contextlib.suppress(OSError):
        return os.read(fd, 1)
    return b""


# -- in the zygote ------------------------------------------------------------------


def lower_priority(priority: str) -> None:
    """Flow code yields the CPU: mail is accepted and answered first, resumes use what is left.

    "idle" (Linux SCHED_IDLE) leaves the worker only CPU time nothing else
    wants: during a burst of replies the SMTP listener keeps its pace and the
    backlog is resumed once the burst is over (an idle machine is all theirs).
    "low" is a niceness `WORKER_NICENESS` below the daemon's own stages.
    """
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(WORKER_NICENESS if priority == "low" else 19)


def zygote_main(listener_fd: int, alive_r: int, ready_w: int, preload: dict[str, Any]) -> None:
    """The zygote's entry point: import, freeze, say ready, then fork workers on request."""
    global ZYGOTE_PID
    die_with_parent(preload["daemon"])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    ZYGOTE_PID = os.getpid()
    # The imports (seconds of CPU, once) yield to the listener and the daemon's stages;
    # at SCHED_IDLE they could wait for minutes on a busy machine, so that comes after.
    os.nice(WORKER_NICENESS)
    sys.path[:] = preload["sys_path"]
    from hitl_mail import resume

    resume.preload(preload["import_paths"], preload["flow_classes"])
    if preload["priority"] == "idle":
        lower_priority("idle")  # the workers' priority: they inherit it
    gc.collect()
    gc.freeze()  # what the workers inherit stays untouched by their collections
    # lancedb (imported above) warns at every fork that its background event loop is
    # reset in the child: the zygote is idle whenever it forks, nothing is mid-operation.
    warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
    os.write(ready_w, b"r")
    os.close(ready_w)
    forkserver.main(listener_fd, alive_r, [])


def preload_settings(
    priority: str, import_paths: Sequence[str], flow_classes: Sequence[str]
) -> dict[str, Any]:
    """What a zygote started from this process needs (plain values: they go on its command line)."""
    return {
        "daemon": os.getpid(),
        "sys_path": list(sys.path),
        "priority": priority,
        "import_paths": list(import_paths),
        "flow_classes": list(flow_classes),
    }
