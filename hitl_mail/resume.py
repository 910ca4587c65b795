"""Resume answered requests: restore the flow class from the stored state, apply the decided outcome.

Flow code runs in worker processes (forked from a process that has imported
crewAI and the flow modules once, `workers.py`), so a slow or CPU-bound flow
method never delays the SMTP edge or other resumes, and a crashing flow
cannot take the daemon down. Only `Flow` subclasses from modules under
`[flows].import_paths` or installed packages are resumed (`import_flow_class`).
While a resume runs, its request's lease is renewed; a daemon killed
mid-resume leaves the lease to expire and the next daemon resumes the request
again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import keyword
import logging
import os
import signal
import site
import sys
import sysconfig
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from hitl_mail import transitions
from hitl_mail.config import Config
from hitl_mail.models import FeedbackRequest, utcnow
from hitl_mail.store import Resumable, Store
from hitl_mail.waiting import Arrivals, idle, let_flood_pass
from hitl_mail.workers import (
    WorkerPool,
    WorkersDidNotStart,
    lower_priority,
    preload_settings,
)

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
RENEW_EVERY = 20.0
MAX_AUTOMATIC_RETRIES = 5
RETRY_BASE = timedelta(seconds=10)
# crewAI keeps ~145 objects of every resumed flow for good (its run-time event
# record): after a few hundred resumes a worker's full garbage collections
# scanned 440k objects and stopped it for 400 ms. Live objects are moved out
# of the collector's way (`gc.freeze`) after the first resume (which finishes
# crewAI's lazy imports) and then every FREEZE_EVERY resumes.
FREEZE_EVERY = 500


@dataclass(frozen=True)
class ResumeResult:
    ok: bool
    paused_again: str | None = None  # the new request id when the flow paused again
    summary: str = ""
    error: str | None = None  # traceback text on failure
    recorded: bool = False  # the worker already wrote the result (status, audit event)
    outcome: str | None = None  # the answer's outcome the flow resumed with


# -- inside the worker process ------------------------------------------------

_worker: tuple[Config, Store] | None = None
_resumed = 0  # resumes this worker ran


def init_worker(config: Config) -> None:
    """Worker start: end with the parent, import paths, the daemon's config for `MailProvider`.

    A worker forked from the zygote (`workers.py`) has crewAI, the flow modules
    and its priority already; one started as a fresh interpreter gets them here.
    """
    global _worker
    from hitl_mail import workers
    from hitl_mail.children import die_with_parent

    die_with_parent(workers.ZYGOTE_PID)
    # The pool ends its workers with SIGTERM when one of them died; a signal sent to
    # every process of the daemon (a terminal's Ctrl-C, a reload) is the daemon's to handle.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if workers.ZYGOTE_PID is None:
        lower_priority(config.daemon.resume_priority)
        preload(config.flows.import_paths, ())
    else:
        add_import_paths(config.flows.import_paths)  # the parent's sys.path was set back
    quiet_console(config)
    from hitl_mail.provider import bind_daemon

    store = Store(config.daemon.database_url)
    bind_daemon(config, store)
    _worker = (config, store)


def quiet_console(config: Config) -> None:
    """No crewAI console panel in the daemon's log; crewAI's warnings logged as the daemon's are.

    crewAI renders flow events (flow started, each method, flow finished) as
    Rich panels meant for a terminal: in the daemon's log they were most of
    it. Its own switch turns them off (set here, it holds in every context the
    event bus copies from this thread), and whatever is still printed (by
    crewAI or a flow method) goes to /dev/null. What crewAI and the flows
    log, warnings included, goes through the daemon's log setup: one line per
    event, to stderr, tokens redacted.
    """
    from crewai.events.utils.console_formatter import set_suppress_console_output

    from hitl_mail import logs

    set_suppress_console_output(True)
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    logs.setup(config.logging)
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(FirstOfEach("crewai"))


class FirstOfEach(logging.Filter):
    """Each distinct warning of `prefix`'s loggers once per process; errors always.

    crewAI repeats some warnings for every flow it restores (a `Flow[dict]`
    "declares state of unknown type", every resume): once is news, the
    thousandth repeat buries the one line per resume.
    """

    LIMIT = 1000  # distinct warnings remembered; past that, repeats pass again

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.name.startswith(self.prefix):
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        if len(self.seen) < self.LIMIT:
            self.seen.add(key)
        return True


def add_import_paths(import_paths: Sequence[str]) -> None:
    """After the standard library and installed packages: a flow module never shadows them."""
    for path in import_paths:
        if path not in sys.path:
            sys.path.append(path)


def preload(import_paths: Sequence[str], flow_classes: Sequence[str]) -> None:
    """Import what every resume needs: crewAI, hitl-mail's resume code, the named flows' modules.

    A flow class that cannot be imported is skipped here: its resume reports why.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    add_import_paths(import_paths)
    import crewai.flow.flow  # noqa: F401  (pay the import once, not per resume)

    from hitl_mail import persistence, provider  # noqa: F401

    # Every Flow() builds a Memory, whose storage imports lancedb: seconds (tens under
    # load) that the first resume of each worker would otherwise wait for.
    with contextlib.suppress(ImportError):
        importlib.import_module("crewai.memory.storage.lancedb_storage")
    for name in flow_classes:
        try:
            import_flow_class(name, import_paths)
        except Exception as exc:  # a flow module may raise anything at import
            log.debug("flow class %r not preloaded: %s", name, exc)


def resume_request(request_id: str, attempts: int) -> ResumeResult:
    """Restore and resume one request's flow, and record how it went; never raises.

    The result is written here, in the worker, so the daemon's own process
    spends nothing on it; if writing fails, the daemon writes it (`recorded`).
    """
    global _resumed
    assert _worker is not None, "init_worker was not run"
    config, store = _worker
    try:
        request = store.get(request_id)
        flow = restore(request, store)
        result = replace(_outcome_of(flow.resume(request.feedback or "")), outcome=request.outcome)
    except BaseException as exc:  # a flow may raise anything; record it, keep the worker
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        result = ResumeResult(ok=False, error=traceback.format_exc(limit=30))
    try:
        record_result(store, request_id, attempts, result, transitions.events_of(config))
    except Exception:
        return result
    finally:
        _resumed += 1
        if _resumed % FREEZE_EVERY == 1:
            _freeze_live_objects()
    return replace(result, recorded=True)


def _freeze_live_objects() -> None:
    """Collect garbage now, then exempt what survives from later collections (it stays alive).

    Later collections scan only objects made since, so their pauses stay short
    however long the worker runs; garbage is still freed by reference counting
    and by those collections. Measured in crewAI's own loop over 3,000
    resumes: the same live objects and memory with and without, and 9.2 ->
    8.6 ms of CPU per resume.
    """
    gc.collect()
    gc.freeze()


def restore(request: FeedbackRequest, store: Store) -> Any:
    """The flow instance, restored from the stored snapshot, with hitl-mail's decision applied."""
    from hitl_mail.persistence import HitlFlowPersistence

    flow_class = import_flow_class(request.flow_class)
    persistence = HitlFlowPersistence.for_store(store, request)
    flow = flow_class.from_pending(request.flow_id, persistence=persistence)
    take_control(flow, request.outcome)
    return flow


class FlowClassRefused(ImportError):
    """The named class is not one hitl-mail resumes (see `import_flow_class`)."""


def import_flow_class(dotted: str, import_paths: Sequence[str] | None = None) -> Any:
    """The `crewai.flow.flow.Flow` subclass named `module.Class`, or FlowClassRefused/ImportError.

    The name comes from a database row, so it is checked before anything is
    imported: identifiers only, not a standard-library module, and a
    top-level module found under `import_paths` (appended to sys.path, never
    ahead of the standard library) or belonging to an installed package.
    Only then is the module imported, and the attribute must be a Flow class.
    """
    if import_paths is None:
        import_paths = _worker[0].flows.import_paths if _worker is not None else ()
    module_name, class_name = _checked_name(dotted)
    top = module_name.partition(".")[0]
    add_import_paths(import_paths)
    importlib.invalidate_caches()  # a module fixed on disk since the last try is seen
    try:
        spec = importlib.util.find_spec(top)
    except ValueError:  # imported already, without a spec (__main__ of a script)
        spec = None
    if spec is None:
        raise ModuleNotFoundError(
            f"No module named {top!r} under [flows].import_paths {list(import_paths)} "
            "or in the installed packages",
            name=top,
        )
    if not _allowed_origin(top, spec, import_paths):
        raise FlowClassRefused(
            f"flow class {dotted!r} refused: module {top!r} ({spec.origin}) is neither under "
            f"[flows].import_paths {list(import_paths)} nor an installed package"
        )
    module = importlib.import_module(module_name)
    found = getattr(module, class_name, None)
    if found is None:
        raise ImportError(f"module {module_name!r} has no class {class_name!r}")
    from crewai.flow.flow import Flow

    if not (isinstance(found, type) and issubclass(found, Flow)):
        raise FlowClassRefused(
            f"flow class {dotted!r} refused: {found!r} is not a crewai.flow.flow.Flow subclass"
        )
    return found


def refused_by_name(dotted: str) -> ResumeResult | None:
    """The failed result for a flow class name refused before any import, else None."""
    try:
        _checked_name(dotted)
    except FlowClassRefused:
        return ResumeResult(ok=False, error=traceback.format_exc(limit=1))
    return None


def _checked_name(dotted: str) -> tuple[str, str]:
    module_name, _, class_name = dotted.rpartition(".")
    parts = dotted.split(".")
    if (
        not module_name
        or len(dotted) > 400
        or not dotted.isascii()
        or not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)
    ):
        raise FlowClassRefused(
            f"flow class {dotted[:200]!r} refused: not of the form module.Class (Python identifiers)"
        )
    top = parts[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        raise FlowClassRefused(
            f"flow class {dotted!r} refused: {top!r} is a standard-library module, not a flow module"
        )
    return module_name, class_name


def _allowed_origin(top: str, spec: Any, import_paths: Sequence[str]) -> bool:
    if spec.origin in (None, "built-in", "frozen") and not spec.submodule_search_locations:
        return False
    places = [spec.origin] if spec.origin not in (None, "namespace") else []
    places += list(spec.submodule_search_locations or ())
    roots = [*import_paths, *_site_packages()]
    if places and all(_under(place, roots) for place in places):
        return True
    return top in _installed_top_level_names()  # an editable install, say


@functools.cache
def _installed_top_level_names() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


def _site_packages() -> list[str]:
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    with contextlib.suppress(AttributeError):  # site may be stubbed (virtualenv, embedded)
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    return [p for p in paths if p]


def _under(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def take_control(flow: Any, outcome: str | None) -> None:
    """Make the resumed step use hitl-mail's outcome instead of asking the LLM again.

    crewAI's `resume()` collapses every non-empty feedback through the stored
    `llm` (runtime `_finalize_human_feedback`). hitl-mail has already decided
    (exact match, default, or its own single LLM call), so the first call is
    answered here; later feedback steps in the same run use crewAI's own.
    """
    from crewai.flow.human_feedback import HumanFeedbackResult

    async def decided(
        *,
        method_name: str,
        method_output: Any,
        raw_feedback: str,
        emit: Any,
        default_outcome: Any,
        llm: Any,
        metadata: dict[str, Any],
    ) -> Any:
        object.__delattr__(flow, "_finalize_human_feedback")
        result = HumanFeedbackResult(
            output=method_output,
            feedback=raw_feedback,
            outcome=outcome if emit else None,
            method_name=method_name,
            metadata=metadata,
        )
        flow.human_feedback_history.append(result)
        flow.last_human_feedback = result
        return result

    object.__setattr__(flow, "_finalize_human_feedback", decided)


def _outcome_of(result: Any) -> ResumeResult:
    from crewai.flow.async_feedback.types import HumanFeedbackPending

    if isinstance(result, HumanFeedbackPending):
        return ResumeResult(
            ok=True,
            paused_again=str(result.callback_info.get("request_id")),
            summary="paused again",
        )
    return ResumeResult(ok=True, summary=repr(result)[:500])


# -- in the daemon --------------------------------------------------------------


def _stop_pool(pool: Executor) -> None:
    """Stop a worker pool now: what still runs after the shutdown budget is ended.

    Without this, interpreter exit joins the workers, and one running a slow
    flow method holds `serve` past its shutdown timeout. An ended resume keeps
    its request `answered`; its released lease lets the next start resume it.
    """
    if isinstance(pool, WorkerPool):
        pool.stop()
        return
    processes = list(
        (getattr(pool, "_processes", None) or {}).values()
    )  # CPython's ProcessPoolExecutor
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()


def worker_pool(config: Config) -> WorkerPool:
    """Workers forked from a zygote that imports crewAI and the flow modules once (`workers.py`)."""
    return WorkerPool(
        config.daemon.resume_workers,
        preload_settings(config.daemon.resume_priority, config.flows.import_paths, ()),
        initializer=init_worker,
        initargs=(config,),
    )


def flows_in_use(store: Store, limit: int = 100) -> list[str]:
    """The flow classes of requests that may still be resumed: the zygote imports their modules."""
    import sqlalchemy as sa

    from hitl_mail.models import RequestStatus

    waiting = (RequestStatus.PENDING, RequestStatus.ANSWERED, RequestStatus.RESUME_FAILED)
    query = (
        sa.select(FeedbackRequest.flow_class)  # type: ignore[call-overload]
        .where(FeedbackRequest.status.in_(waiting))  # type: ignore[attr-defined]
        .distinct()
        .limit(limit)
    )
    try:
        with store.reading() as session:
            return [str(name) for name in session.execute(query).scalars()]
    except Exception as exc:  # preloading is an optimisation: a resume imports what it needs
        log.debug("flow classes to preload not read: %s", exc)
        return []


class Resumer:
    """The resume stage: claims answered requests and runs each in the worker pool."""

    def __init__(
        self,
        config: Config,
        store: Store,
        on_paused_again: Any = None,
        observe: Any = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.wakeup = asyncio.Event()
        self.arrivals = arrivals or Arrivals()  # replies the SMTP listener stored lately
        self.pool: Executor = worker_pool(config)
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False  # drained: no pool starts again
        self.on_paused_again = on_paused_again or (lambda: None)
        self.observe = observe or (lambda ok: None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: list[Executor] = []  # pools replaced by a reload, still finishing

    def warm_up(self) -> None:
        """Start the workers now, in the background: the first resume does not wait for them."""
        task = asyncio.ensure_future(self._warm_up(self.pool))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _warm_up(self, pool: Executor) -> None:
        try:
            await self._started(pool)
        except BrokenProcessPool as exc:  # each resume meanwhile records it too
            log.error("resume workers did not start: %s", exc)

    async def _started(self, pool: Executor) -> None:
        """The pool's workers forked and ready for their first call."""
        if self._closed:
            raise BrokenProcessPool("the resume stage is stopping")
        if isinstance(pool, WorkerPool):
            await pool.start(lambda: flows_in_use(self.store))

    def reload(self, config: Config) -> None:
        """New import paths, flow code and settings take effect in fresh workers; running resumes finish."""
        old, self.pool, self.config = self.pool, worker_pool(config), config
        if isinstance(old, WorkerPool):
            old.stop_when_idle()
        else:
            old.shutdown(wait=False)
        self._retired.append(old)
        self.warm_up()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wakeup.clear()
            await let_flood_pass(self.arrivals, stopping, "resuming")
            free = self._free_slots()
            rows = await asyncio.to_thread(self.store.claim_resumable, free, LEASE) if free else []
            for row in rows:
                task = asyncio.create_task(self._resume(row))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            if not rows:
                await idle(self.wakeup, stopping, self.config.daemon.poll_interval.total_seconds())

    async def drain(self, timeout: float) -> None:
        """On shutdown: let running resumes finish within `timeout`, then release the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        self._closed = True
        for task in self._starting:
            task.cancel()
        for pool in (*self._retired, self.pool):
            await asyncio.to_thread(_stop_pool, pool)

    def _finished(self, task: asyncio.Task[None]) -> None:
        # A worker is free: look for the next answered request now, not at the next poll.
        self._tasks.discard(task)
        self.wakeup.set()

    def _free_slots(self) -> int:
        # One more request queued per worker: a worker that finishes starts the next
        # resume at once, instead of idling while this process claims it.
        return max(self.config.daemon.resume_workers * 2 - len(self._tasks), 0)

    async def _resume(self, request: Resumable) -> None:
        started = time.monotonic()
        renew = asyncio.create_task(self._keep_lease(request.id))
        pool = self.pool
        try:
            # A name that cannot be a flow class never reaches a worker.
            result = refused_by_name(request.flow_class) or await self._run_in(pool, request)
        except BrokenProcessPool as exc:
            result = ResumeResult(
                ok=False,
                error=str(exc)
                if isinstance(exc, WorkersDidNotStart)
                else "the resume worker process died (killed or crashed)",
            )
            if pool is self.pool and not self._closed:  # every resume in it lands here: once
                self.pool = worker_pool(self.config)
                await asyncio.to_thread(_stop_pool, pool)
        except asyncio.CancelledError:
            await asyncio.to_thread(self.store.release_lease, request.id)
            raise
        finally:
            renew.cancel()
        if not result.recorded:
            events = transitions.events_of(self.config)
            await asyncio.to_thread(
                record_result, self.store, request.id, request.resume_attempts, result, events
            )
        self._report(request, result, time.monotonic() - started)
        self.observe(result.ok)
        if result.paused_again:
            self.on_paused_again()

    async def _run_in(self, pool: Executor, request: Resumable) -> ResumeResult:
        await self._started(pool)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, resume_request, request.id, request.resume_attempts)

    def _report(self, request: Resumable, result: ResumeResult, seconds: float) -> None:
        """The one log line of a resume: INFO when it ran, ERROR when it failed."""
        said = (request.id, request.flow_class, result.outcome, seconds)
        if result.ok:
            log.info("request %s: resume of %s with outcome %s took %.2fs: ok", *said)
            return
        attempts = request.resume_attempts + 1
        log.error(
            "request %s: resume of %s with outcome %s took %.2fs: failed (attempt %d)%s",
            *said,
            attempts,
            "" if retried_automatically(attempts) else "; waiting for `hitl-mail requests retry`",
        )

    async def _keep_lease(self, request_id: str) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            await asyncio.to_thread(self.store.renew_lease, request_id, LEASE)


def record_result(
    store: Store,
    request_id: str,
    attempts: int,
    result: ResumeResult,
    events: transitions.Events | None = None,
) -> None:
    """Mark the request resumed, or failed with its retry time (transitions.py writes both)."""
    if result.ok:
        detail = {"paused_again": result.paused_again, "result": result.summary}
        transitions.resumed(store, request_id, detail, events)
        return
    attempts += 1
    retry_at = (
        utcnow() + RETRY_BASE * 2 ** (attempts - 1) if retried_automatically(attempts) else None
    )
    transitions.resume_failed(
        store, request_id, attempt=attempts, retry_at=retry_at, error=result.error, events=events
    )


def retried_automatically(attempts: int) -> bool:
    return attempts < MAX_AUTOMATIC_RETRIES
