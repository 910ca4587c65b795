"""`MailProvider`: the crewAI `HumanFeedbackProvider` that pauses a flow and asks by email.

`request_feedback` runs in the flow's process (crewAI calls it in a worker
thread, for sync and async flows alike). It stores everything the daemon will
need — crewAI persists its own pending record only after the provider raises —
and then raises `HumanFeedbackPending`, so `kickoff()` returns that object.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crewai.flow.async_feedback.types import HumanFeedbackPending, PendingFeedbackContext

from hitl_mail.callbacks import callback_url
from hitl_mail.config import Config, config_path, load_config
from hitl_mail.intake import create_request, reply_to_of
from hitl_mail.persistence import HitlFlowPersistence, json_state
from hitl_mail.store import Store

if TYPE_CHECKING:
    from crewai.flow.flow import Flow

_daemon_binding: tuple[Config, Store] | None = None


def bind_daemon(config: Config, store: Store) -> None:
    """Inside a daemon resume worker, every `MailProvider` uses the daemon's config and store.

    A flow module builds `MailProvider("hitl-mail.toml")` relative to its own
    working directory; when the daemon imports that module the path may not
    resolve, and the daemon's (possibly reloaded) configuration is the one
    that must apply to the next pause anyway.
    """
    global _daemon_binding
    _daemon_binding = (config, store)


class MailProvider:
    """Ask for feedback by email through the hitl-mail daemon."""

    def __init__(self, config_path: str | os.PathLike[str] | None = None) -> None:
        self._config_arg = config_path
        self._lock = threading.Lock()
        self._loaded: tuple[float, Config, Store] | None = None

    def request_feedback(self, context: PendingFeedbackContext, flow: Flow[Any]) -> str:
        config, store = self._resources()
        if getattr(flow, "persistence", None) is None:
            # Keep crewAI's own pending record in our database rather than a stray default file.
            flow.persistence = HitlFlowPersistence.for_store(store)
        request = create_request(config, store, context.to_dict(), json_state(flow.state))
        raise HumanFeedbackPending(
            context=context,
            callback_info={
                "request_id": request.id,
                "assigned_to": request.assigned_to,
                "reply_to": reply_to_of(config, request),
                "deadline": request.deadline.isoformat() if request.deadline else None,
                # Where to answer over HTTP instead ([http].public_url); None without it.
                "callback_url": callback_url(config, request.id),
            },
        )

    def _resources(self) -> tuple[Config, Store]:
        if _daemon_binding is not None:
            return _daemon_binding
        path = config_path(self._config_arg)
        mtime = _mtime(path)
        with self._lock:
            if self._loaded is None or self._loaded[0] != mtime:
                config = load_config(path)
                store = (
                    self._loaded[2]
                    if self._loaded and self._loaded[2].url == config.daemon.database_url
                    else Store(config.daemon.database_url)
                )
                store.migrate()
                self._loaded = (mtime, config, store)
            return self._loaded[1], self._loaded[2]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0
