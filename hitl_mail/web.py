"""Serve an ASGI app under uvicorn inside the daemon's own event loop.

uvicorn owns HTTP; this module only decides how it runs inside hitl-mail:

- in the caller's loop, as a task (`WebServer.start` / `stop`), never in a thread
  or a process of its own, so the app can share the daemon's store and stages;
- without touching signal handlers: the daemon owns SIGTERM, SIGINT and SIGHUP;
- on a socket bound here first, so a port already taken is an `OSError` in the
  caller (the daemon exits 2, as for its SMTP port) instead of uvicorn's
  `sys.exit`;
- with a bounded graceful shutdown: open connections get `SHUTDOWN_TIMEOUT`
  to finish, then are dropped;
- with the slow and oversized clients answered, not just dropped: a request
  head that takes longer than the read timeout gets 408, one larger than
  `MAX_HEAD` gets 431, a malformed one 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Generator
from typing import Any

import h11
import uvicorn
from pydantic import ValidationError
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["BodyTooLarge", "CloseConnections", "WebServer", "is_json", "read_body"]

log = logging.getLogger(__name__)

MAX_HEAD = 8 * 1024  # bytes of request line and headers
READ_TIMEOUT = 5.0  # seconds to send a request head
SHUTDOWN_TIMEOUT = 5  # seconds open connections get to finish at stop
START_TIMEOUT = 10.0

ASGIApp = Callable[..., Any]


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the first request head held to a size and a deadline.

    The head is collected here before h11 sees it: over `MAX_HEAD` bytes it is
    answered 431, not sent within the read timeout 408. With ``lenient_host``
    an HTTP/1.1 head without ``Host`` gets an empty one (h11 would answer 400):
    health probes written as a bare ``printf ... | nc`` keep working.
    """

    read_timeout: Callable[[], float] = staticmethod(lambda: READ_TIMEOUT)
    lenient_host = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head: bytes | None = b""  # None once the first head went to h11

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_timer = self.loop.call_later(self.read_timeout(), self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            super().data_received(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if (end if end >= 0 else len(self._head)) > MAX_HEAD:
            self._send_error(431, "request header fields too large")
            return
        if end < 0:
            return
        self._cancel_head_timer()  # the head is in: uvicorn's keep-alive timer takes over
        head, self._head = self._head, None
        if self.lenient_host:
            head = _with_host(head, end)
        super().data_received(head)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head is not None and not self.transport.is_closing():
            self._send_error(408, "request timeout")

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, "bad request")

    def _send_error(self, status: int, text: str) -> None:
        """An error answer before any request was read, then close.

        Written by a fresh h11 connection that has read a stand-in request:
        the connection's own state machine may be in ERROR, or has no request
        to answer yet, and h11 only writes a response to a request.
        """
        self._cancel_head_timer()
        self._head = None
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        body = (text + "\n").encode()
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.next_event()
        self.transport.write(
            (conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            + (conn.send(h11.Data(data=body)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        self.transport.close()


def _with_host(data: bytes, end: int) -> bytes:
    """``data`` with an empty ``Host`` header added to its head (ending at ``end``) if it has none."""
    request_line, _, headers = data[:end].partition(b"\r\n")
    if not request_line.endswith(b"HTTP/1.1"):
        return data
    if any(line.split(b":", 1)[0].strip().lower() == b"host" for line in headers.split(b"\r\n")):
        return data
    return request_line + b"\r\nHost: " + (b"\r\n" + headers if headers else b"") + data[end:]


class CloseConnections:
    """ASGI middleware: every response says ``Connection: close`` (the server then closes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class WebServer:
    """One ASGI app on one host and port, run by uvicorn as a task of the running loop."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_connections: int | None = None,
        read_timeout: Callable[[], float] | None = None,
        lenient_host: bool = False,
        name: str = "http",
    ) -> None:
        self.app = app
        self.name = name
        self._max_connections = max_connections
        self._read_timeout = read_timeout or (lambda: READ_TIMEOUT)
        self._lenient_host = lenient_host
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port) and serve; the bound port.

        Raises OSError when the address cannot be bound.
        """
        if self._task is not None:
            raise RuntimeError(f"{self.name} server already started")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        sock.setblocking(False)
        bound = int(sock.getsockname()[1])
        read_timeout = self._read_timeout
        protocol = type(
            "Protocol",
            (_Protocol,),
            {"read_timeout": staticmethod(read_timeout), "lenient_host": self._lenient_host},
        )
        config = uvicorn.Config(
            self.app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=self._max_connections,
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
            h11_max_incomplete_event_size=MAX_HEAD,
        )
        server = _Server(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"{self.name}-server")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not server.started:
                    if self._task.done():
                        self._task.result()  # raises what stopped it
                        raise RuntimeError(f"{self.name} server ended while starting")
                    await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            sock.close()
            raise
        log.info("%s endpoint listening on http://%s:%d", self.name, host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening, let open requests finish for a few seconds, then drop them."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT + 2):
                await asyncio.shield(task)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            log.exception("%s server failed while stopping", self.name)
        log.info("%s endpoint stopped", self.name)


class BodyTooLarge(Exception):
    """The request body is larger than the endpoint accepts (answer 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes.

    A declared Content-Length is checked before anything is read; a chunked
    body is counted as it arrives, so an endless one costs `limit` bytes at most.
    """
    declared = request.headers.get("content-length", "")
    if declared and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge()
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise BodyTooLarge()
    return bytes(data)


def body_errors(exc: Exception) -> list[dict[str, Any]] | str:
    """What was wrong with a request body, for a 422: pydantic's errors without the input."""
    if isinstance(exc, ValidationError):
        return [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
    return str(exc)


def is_json(request: Request) -> bool:
    """Whether the body is declared JSON (``application/json`` or a ``+json`` type)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")
