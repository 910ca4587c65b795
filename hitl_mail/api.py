"""The daemon's HTTP face (SPEC 8): callback URLs, the operator API, the bridge, health.

One FastAPI app, served by web.py inside the daemon's event loop:

- ``POST /api/requests/{id}/callback?token=…``: answer a request (http_answers.py);
  the signed token in the URL is the credential.
- ``GET /api/requests?status=&flow=&assignee=``, ``GET /api/requests/{id}``,
  ``POST /api/requests/{id}/cancel`` and ``/retry``: for operators, with
  ``Authorization: Bearer KEY`` (``[http].api_keys``, held hashed); the
  objects are those of ``requests list/show --json`` (views.py).
- ``POST {[bridge].path}``: crewAI's hosted HITL webhooks (bridge.py).
- ``/healthz``, ``/readyz``, ``/metrics`` (metrics.py), unauthenticated.
- ``/openapi.json``: the schema of all of the above.

Bodies are read here, bounded by ``max_body`` before anything parses them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import defer
from sqlmodel import col, select

from hitl_mail import __version__, actions, views
from hitl_mail.bridge import Bridge
from hitl_mail.config import Config, hash_api_key
from hitl_mail.http_answers import CallbackAnswer, CallbackAnswering, CallbackBody
from hitl_mail.metrics import Metrics, health_routes
from hitl_mail.models import FeedbackRequest
from hitl_mail.store import Store
from hitl_mail.web import BodyTooLarge, WebServer, is_json, read_body

log = logging.getLogger(__name__)

MAX_LIST = 1000
# Connections and requests at once; more are answered 503 at once (uvicorn's
# limit_concurrency), so a flood cannot hold the daemon's loop or memory.
MAX_CONNECTIONS = 200
_bearer = HTTPBearer(auto_error=False, description="One of [http].api_keys")


class HttpApi:
    """The app and what it works with; `reload` swaps the configuration (SIGHUP)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        *,
        on_answered: Callable[[], None] = lambda: None,
        on_created: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store
        self.answering = CallbackAnswering(config, store, metrics, on_answered)
        self.bridge = Bridge(config, store, on_created)
        self.app = self._build(metrics)

    def reload(self, config: Config) -> None:
        self.config = config
        self.answering.config = config
        self.bridge.config = config

    def operator(
        self,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> str:
        """The caller's key, as an audit actor (``api:`` and the start of its hash); else 401."""
        presented = hash_api_key(credentials.credentials) if credentials is not None else ""
        # Every configured key is compared, matching or not: the time taken tells nothing.
        matches = [hmac.compare_digest(presented, key) for key in self.config.http.api_keys]
        if not presented or not any(matches):
            raise HTTPException(
                401, "a valid API key is needed", headers={"WWW-Authenticate": "Bearer"}
            )
        return "api:" + presented.removeprefix("sha256:")[:8]

    def _build(self, metrics: Metrics) -> FastAPI:
        app = FastAPI(
            title="hitl-mail",
            version=__version__,
            description="Answer paused crewAI flows by email, or over HTTP.",
            docs_url=None,
            redoc_url=None,
            openapi_url="/openapi.json",
        )
        self._callback_route(app)
        self._operator_routes(app)
        if self.config.bridge.enabled:
            self.bridge.route(app)
        app.router.routes.extend(health_routes(metrics))
        return app

    def _callback_route(self, app: FastAPI) -> None:
        body_schema = {
            "content": {"application/json": {"schema": CallbackBody.model_json_schema()}}
        }

        @app.post(
            "/api/requests/{request_id}/callback",
            response_model=CallbackAnswer,
            tags=["callback"],
            summary="Answer a request (its callback_url)",
            openapi_extra={"requestBody": body_schema},
            responses={
                401: {"description": "Not a callback token"},
                403: {"description": "A token for another request"},
                409: {"description": "Already answered"},
                410: {"description": "Expired or cancelled"},
                413: {"description": "Body too large"},
                422: {"description": "Bad body, or an empty answer without a default"},
                503: {"description": "The LLM could not decide; still pending"},
            },
        )
        async def callback(
            request: Request,
            request_id: Annotated[str, Path(max_length=64)],
            token: Annotated[str, Query(max_length=512)] = "",
        ) -> JSONResponse:
            try:
                body = await read_body(request, self.config.http.max_body)
            except BodyTooLarge:
                return JSONResponse({"detail": "body too large"}, 413)
            # Not JSON is a 422, but only after the token: a stranger learns nothing.
            reply = await self.answering.answer(
                request_id, token, body if is_json(request) else None
            )
            return JSONResponse(reply.body, reply.status, headers=reply.headers)

    def _operator_routes(self, app: FastAPI) -> None:
        # A default, not an Annotated alias: annotations are strings here (PEP 563),
        # and FastAPI resolves them in the module, where a local alias is unknown.
        operator = Depends(self.operator)
        store = self.store

        @app.get("/api/requests", tags=["operator"], summary="List requests, newest first")
        async def list_requests(
            _: str = operator,
            status: str | None = None,
            flow: Annotated[str | None, Query(description="flow class or flow id")] = None,
            assignee: str | None = None,
            limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
        ) -> list[dict[str, Any]]:
            rows = await asyncio.to_thread(_requests, store, status, flow, assignee, limit)
            return [views.as_json(row) for row in rows]

        @app.get(
            "/api/requests/{request_id}",
            tags=["operator"],
            summary="One request and its audit trail",
        )
        async def show_request(request_id: str, _: str = operator) -> dict[str, Any]:
            return await asyncio.to_thread(_show, store, request_id)

        @app.post(
            "/api/requests/{request_id}/cancel",
            tags=["operator"],
            summary="Cancel a pending request",
        )
        async def cancel(request_id: str, actor: str = operator) -> dict[str, Any]:
            await asyncio.to_thread(_must_exist, store, request_id)
            done = await asyncio.to_thread(
                actions.cancel_request, self.config, store, request_id, actor
            )
            return await self._after(request_id, done, "only a pending request can be cancelled")

        @app.post(
            "/api/requests/{request_id}/retry",
            tags=["operator"],
            summary="Resume a failed request again",
        )
        async def retry(request_id: str, actor: str = operator) -> dict[str, Any]:
            await asyncio.to_thread(_must_exist, store, request_id)
            done = await asyncio.to_thread(actions.retry_resume, store, request_id, actor)
            return await self._after(
                request_id, done, "only a resume_failed request can be retried"
            )

    async def _after(self, request_id: str, done: bool, refusal: str) -> dict[str, Any]:
        request = await asyncio.to_thread(self.store.get, request_id)
        if not done:
            raise HTTPException(409, f"{refusal}; it is {request.status}")
        return views.as_json(request)


def _must_exist(store: Store, request_id: str) -> None:
    if store.find(request_id, with_state=False) is None:
        raise HTTPException(404, "no such request")


def _show(store: Store, request_id: str) -> dict[str, Any]:
    request = store.find(request_id, with_state=False)
    if request is None:
        raise HTTPException(404, "no such request")
    return views.as_json(request, store.trail(request_id))


def _requests(
    store: Store, status: str | None, flow: str | None, assignee: str | None, limit: int
) -> list[FeedbackRequest]:
    query = (
        select(FeedbackRequest)
        .options(*(defer(getattr(FeedbackRequest, name)) for name in ("state", "context")))
        .order_by(col(FeedbackRequest.created_at).desc())
        .limit(limit)
    )
    if status:
        query = query.where(col(FeedbackRequest.status) == status)
    if flow:
        query = query.where(
            sa.or_(col(FeedbackRequest.flow_class) == flow, col(FeedbackRequest.flow_id) == flow)
        )
    if assignee:
        query = query.where(col(FeedbackRequest.assigned_to) == assignee.strip().lower())
    with store.reading() as session:
        return list(session.exec(query))


class HttpServer:
    """The `[http]` server: `HttpApi`'s app under uvicorn (web.py)."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self._web = WebServer(api.app, max_connections=MAX_CONNECTIONS, name="http")

    async def start(self, host: str, port: int) -> int:
        return await self._web.start(host, port)

    async def stop(self) -> None:
        await self._web.stop()
