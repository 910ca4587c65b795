"""Resume answered requests: restore the flow class from the stored state, apply the decided outcome.

Flow code runs in worker processes (spawned, each importing crewAI once), so
a slow or CPU-bound flow method never delays the SMTP edge or other resumes,
and a crashing flow cannot take the daemon down. While a resume runs, its
request's lease is renewed; a daemon killed mid-resume leaves the lease to
expire and the next daemon resumes the request again (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from hitl_mail import transitions
from hitl_mail.config import Config
from hitl_mail.models import FeedbackRequest, utcnow
from hitl_mail.store import Resumable, Store
from hitl_mail.waiting import Arrivals, idle, let_flood_pass

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
RENEW_EVERY = 20.0
MAX_AUTOMATIC_RETRIES = 5
RETRY_BASE = timedelta(seconds=10)
WORKER_NICENESS = 5
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


# -- inside the worker process ------------------------------------------------

_worker: tuple[Config, Store] | None = None
_resumed = 0  # resumes this worker ran


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


def init_worker(config: Config) -> None:
    """Worker start: import paths, the daemon's config for `MailProvider`, crewAI imported once."""
    global _worker
    lower_priority(config.daemon.resume_priority)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    for path in reversed(config.flows.import_paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    from hitl_mail.provider import bind_daemon

    store = Store(config.daemon.database_url)
    bind_daemon(config, store)
    _worker = (config, store)
    import crewai.flow.flow  # noqa: F401  (pay the import once, not per resume)

    # Every Flow() builds a Memory, whose storage imports lancedb: seconds (tens under
    # load) that the first resume of each worker would otherwise wait for.
    with contextlib.suppress(ImportError):
        importlib.import_module("crewai.memory.storage.lancedb_storage")


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
        result = _outcome_of(flow.resume(request.feedback or ""))
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


def import_flow_class(dotted: str) -> Any:
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name:
        raise ImportError(f"flow class {dotted!r} is not of the form module.Class")
    importlib.invalidate_caches()  # a module fixed on disk since the last try is seen
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no class {class_name!r}") from None


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

    Without this, interpreter exit joins the workers, and one still importing
    crewAI (seconds, more on a loaded machine) or running a slow flow method
    holds `serve` past its shutdown timeout. An ended resume keeps its request
    `answered`; its released lease lets the next start resume it.
    """
    processes = list(
        (getattr(pool, "_processes", None) or {}).values()
    )  # CPython's ProcessPoolExecutor
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()


def worker_pool(config: Config) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=config.daemon.resume_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(config,),
    )


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
        self.on_paused_again = on_paused_again or (lambda: None)
        self.observe = observe or (lambda ok: None)
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: list[Executor] = []  # pools replaced by a reload, still finishing

    def warm_up(self) -> None:
        """Start the workers now, so the first resume does not wait for crewAI's import."""
        for _ in range(self.config.daemon.resume_workers):
            self.pool.submit(os.getpid)

    def reload(self, config: Config) -> None:
        """New import paths and settings take effect in fresh workers; running resumes finish."""
        old, self.pool, self.config = self.pool, worker_pool(config), config
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
        for pool in (*self._retired, self.pool):
            _stop_pool(pool)

    def _finished(self, task: asyncio.Task[None]) -> None:
        # A worker is free: look for the next answered request now, not at the next poll.
        self._tasks.discard(task)
        self.wakeup.set()

    def _free_slots(self) -> int:
        # One more request queued per worker: a worker that finishes starts the next
        # resume at once, instead of idling while this process claims it.
        return max(self.config.daemon.resume_workers * 2 - len(self._tasks), 0)

    async def _resume(self, request: Resumable) -> None:
        renew = asyncio.create_task(self._keep_lease(request.id))
        pool = self.pool
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                pool, resume_request, request.id, request.resume_attempts
            )
        except BrokenProcessPool:
            result = ResumeResult(
                ok=False, error="the resume worker process died (killed or crashed)"
            )
            if pool is self.pool:  # every resume in the broken pool lands here; replace it once
                self.pool = worker_pool(self.config)
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
        self._report(request, result)
        self.observe(result.ok)
        if result.paused_again:
            self.on_paused_again()

    def _report(self, request: Resumable, result: ResumeResult) -> None:
        if result.ok:
            log.info(
                "request %s: flow %s resumed (%s)",
                request.id,
                request.flow_class,
                result.summary[:80],
            )
            return
        attempts = request.resume_attempts + 1
        log.error(
            "request %s: resume of %s failed (attempt %d)%s",
            request.id,
            request.flow_class,
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
