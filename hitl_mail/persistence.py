"""A crewAI `FlowPersistence` kept in the hitl-mail database.

Flows may use it as their own persistence (`@persist` snapshots land in
`flow_states`); the daemon uses it bound to one request to restore a paused
flow with `Flow.from_pending`, from the snapshot `MailProvider` stored.
"""

from __future__ import annotations

from typing import Any

from crewai.flow.async_feedback.types import PendingFeedbackContext
from crewai.flow.persistence.base import FlowPersistence
from pydantic import BaseModel, PrivateAttr
from sqlmodel import col, select

from hitl_mail.models import FeedbackRequest, FlowStateRow, utcnow
from hitl_mail.store import Store


class HitlFlowPersistence(FlowPersistence):
    persistence_type: str = "hitl-mail"
    database_url: str
    request_id: str | None = None
    """When set, `load_pending_feedback` restores exactly this request."""

    _store: Store | None = PrivateAttr(default=None)
    _loaded: FeedbackRequest | None = PrivateAttr(default=None)

    @classmethod
    def for_store(cls, store: Store, request: FeedbackRequest | None = None) -> HitlFlowPersistence:
        """Bound to `store`; with `request` (already read), it restores exactly that one."""
        persistence = cls(database_url=store.url, request_id=request.id if request else None)
        persistence._store = store
        persistence._loaded = request
        return persistence

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.database_url)
        return self._store

    def init_db(self) -> None:
        self.store.migrate()

    def save_state(
        self, flow_uuid: str, method_name: str, state_data: dict[str, Any] | BaseModel
    ) -> None:
        self.store.add(
            FlowStateRow(
                flow_uuid=flow_uuid,
                method_name=method_name,
                state=json_state(state_data),
                saved_at=utcnow(),
            )
        )

    def load_state(self, flow_uuid: str) -> dict[str, Any] | None:
        query = (
            select(FlowStateRow)
            .where(FlowStateRow.flow_uuid == flow_uuid)
            .order_by(col(FlowStateRow.id).desc())
        )
        with self.store.reading() as session:
            row = session.exec(query.limit(1)).first()
        return dict(row.state) if row is not None and isinstance(row.state, dict) else None

    def load_pending_feedback(
        self, flow_uuid: str
    ) -> tuple[dict[str, Any], PendingFeedbackContext] | None:
        request = self._request(flow_uuid)
        if request is None or request.context is None:
            return None
        state = request.state if isinstance(request.state, dict) else {}
        return dict(state), PendingFeedbackContext.from_dict(request.context)

    def clear_pending_feedback(self, flow_uuid: str) -> None:
        """Nothing to clear: the request's status in `requests` is the record."""

    def _request(self, flow_uuid: str) -> FeedbackRequest | None:
        if self._loaded is not None:
            return self._loaded
        if self.request_id is not None:
            return self.store.find(self.request_id)
        query = (
            select(FeedbackRequest)
            .where(FeedbackRequest.flow_id == flow_uuid)
            .order_by(col(FeedbackRequest.created_at).desc())
        )
        with self.store.reading() as session:
            return session.exec(query.limit(1)).first()


def json_state(state: Any) -> Any:
    """The flow state as JSON-safe data (pydantic models dumped, odd objects as str)."""
    if isinstance(state, BaseModel):
        return state.model_dump(mode="json")
    return PendingFeedbackContext._make_json_safe(state)
