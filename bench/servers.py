"""The SMTP servers under test, each in a process of its own: `python -m bench.servers KIND ...`.

- `bare PORT`: aiosmtpd with a handler that only answers 250: the ceiling for
  the SMTP edge. Same `SMTP(...)` settings and the same `loop.create_server`
  as hitl-mail's listener, so the two differ only by the handler.
- `edge CONFIG`: hitl-mail's SMTP edge exactly as `App` starts it
  (`ReplyHandler` + `start_listener`, the daemon's logging), with no other
  stage running: RCPT checks the token against the database, DATA stores
  and commits before the 250.
- `sink PORT RECORD`: the relay stand-in that receives what is sent; it
  appends `event request-id` per message to RECORD (empty: record nothing).

Each prints `PORT n` once listening and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_EVENT = re.compile(rb"^X-HITL-Event: *(\S+)", re.M | re.I)
_REQUEST = re.compile(rb"^X-HITL-Request-Id: *(\S+)", re.M | re.I)


class AcceptAll:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


class Sink:
    def __init__(self, record: str) -> None:
        self.file = open(record, "ab", buffering=0) if record else None  # noqa: SIM115

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.file is not None:
            head = (envelope.original_content or b"")[:8192]
            event, request = _EVENT.search(head), _REQUEST.search(head)
            self.file.write(
                (event.group(1) if event else b"-")
                + b" "
                + (request.group(1) if request else b"-")
                + b"\n"
            )
        return "250 2.0.0 OK"


async def serve_plain(handler: Any, port: int) -> None:
    def factory() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=10 * 1000**2,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="example.com",
            ident="bench",
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host="127.0.0.1", port=port)
    await _serve(server)


async def serve_edge(config_path: str) -> None:
    from hitl_mail import logs
    from hitl_mail.config import load_config
    from hitl_mail.inbound import ReplyHandler, start_listener
    from hitl_mail.intake import addressing
    from hitl_mail.store import Store

    config = load_config(config_path)
    logs.setup(config.logging)
    store = Store(config.daemon.database_url)
    await asyncio.to_thread(store.migrate)
    limits: dict[str, Any] = {}
    if hasattr(config.inbound, "max_pending_replies_per_request"):  # absent from older code
        # The edge alone answers nothing, so its stored replies never stop waiting: a
        # run of a few seconds over TOKENS requests would reach the daemon's cap per
        # request and measure 452s, not stores.
        inbound = config.inbound.model_copy(update={"max_pending_replies_per_request": 1000})
        limits = {"settings": inbound, "token_max_age": config.tokens.max_age}
    handler = ReplyHandler(
        store, addressing(config), config.secret_keys, on_stored=lambda: None, **limits
    )
    server = await start_listener(config.inbound, handler, hostname=config.outbound.domain)
    await _serve(server)
    close = getattr(handler, "close", None)  # absent from a --baseline before edgestore.py
    if close is not None:
        await close()
    store.close()


async def _serve(server: asyncio.Server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    kind = sys.argv[1]
    if kind == "bare":
        asyncio.run(serve_plain(AcceptAll(), int(sys.argv[2])))
    elif kind == "sink":
        asyncio.run(serve_plain(Sink(sys.argv[3] if len(sys.argv) > 3 else ""), int(sys.argv[2])))
    elif kind == "edge":
        asyncio.run(serve_edge(sys.argv[2]))
    else:
        raise SystemExit(f"unknown server kind {kind!r}")


if __name__ == "__main__":
    main()
