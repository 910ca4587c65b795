"""`hitl-mail demo`: the whole loop on one machine, with no configuration, in under a minute.

A temporary directory holds a SQLite database; an embedded mail catcher
(aiosmtpd, in this process's event loop) stands in for the outbound relay.
The sample flow `hitl_mail.demo_flow.DemoReviewFlow` pauses, its notification
is shown, a reply is sent through the daemon's real SMTP listener, the
confirmation is shown, and the daemon's resume worker runs the flow's
`approved` branch, whose result is printed. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import tempfile
import textwrap
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from hitl_mail.config import LoggingSettings, config_from_dict
from hitl_mail.models import FeedbackRequest, RequestStatus
from hitl_mail.store import Store

ASSIGNEE = "you@example.com"
REPLY = "approved"
WAIT = 60.0  # seconds, for each step
STEPS = 6
CONFIG_NAME = "hitl-mail.toml"

# crewAI and litellm reach for the network at import (telemetry, tracing, the
# model cost map); the demo runs offline, and the resume workers inherit these.
QUIET_ENV = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


class DemoError(Exception):
    """A step of the demo did not happen; the message says which."""


def run_demo() -> int:
    """Run the demo; 0 when the flow was paused, answered by email and resumed, else 1."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    from hitl_mail import logs

    # Daemon warnings and errors still reach stderr; the story goes to stdout.
    logs.setup(LoggingSettings(level="WARNING"))
    # While crewAI imports, the busy loop makes the scheduler skip timer ticks, and
    # APScheduler warns about each skip; harmless, and noise in a first run.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="hitl-mail-demo-"))
    _say(f"hitl-mail demo: the whole loop on this machine, files in {workdir}")
    started = time.monotonic()
    try:
        asyncio.run(_demo(workdir))
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"\ndemo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _say(f"\ndemo finished in {time.monotonic() - started:.1f}s. Look around:")
    _say(f"    hitl-mail requests list --config {workdir / CONFIG_NAME}")
    return 0


class MailCatcher:
    """An SMTP server that keeps what it receives in memory: the demo's outbound relay."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.port = 0
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="catcher.localhost", decode_data=False),
            host="127.0.0.1",
            port=0,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        async with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()
        return "250 OK"

    async def wait_for(self, event: str, request_id: str) -> EmailMessage:
        """The first `X-HITL-Event: event` email for the request, waiting up to WAIT seconds."""

        def found() -> EmailMessage | None:
            return next(
                (
                    m
                    for m in self.messages
                    if m["X-HITL-Event"] == event and m["X-HITL-Request-Id"] == request_id
                ),
                None,
            )

        try:
            async with asyncio.timeout(WAIT), self._arrived:
                message = await self._arrived.wait_for(found)
        except TimeoutError:
            raise DemoError(f"no {event} email arrived within {WAIT:.0f}s") from None
        assert message is not None  # wait_for returns only once found() is truthy
        return message


def demo_settings(workdir: Path, relay_port: int) -> dict[str, dict[str, str | int]]:
    """The embedded configuration: the mapping a hitl-mail.toml would hold."""
    return {
        "daemon": {
            "database_url": f"sqlite:///{workdir / 'hitl-mail.db'}",
            "secret_key": secrets.token_urlsafe(32),
            "poll_interval": "100ms",
            "resume_workers": 1,
            "shutdown_timeout": "10s",
        },
        "inbound": {"host": "127.0.0.1", "port": 0, "reply_domain": "reply.localhost"},
        "outbound": {
            "host": "127.0.0.1",
            "port": relay_port,
            "from_address": "hitl-mail demo <demo@hitl-mail.localhost>",
            "timeout": "10s",
        },
        # The demo's reply is an exact option, so no LLM call is ever made.
        "llm": {"model": "gpt-4o-mini"},
        "routing": {"default_assignee": ASSIGNEE},
    }


def write_toml(path: Path, settings: dict[str, dict[str, str | int]]) -> None:
    """Save the settings so `hitl-mail requests ... --config` can look at the demo's database."""
    lines = ["# Written by `hitl-mail demo`, for inspecting its database afterwards."]
    for section, values in settings.items():
        lines += ["", f"[{section}]"]
        # A JSON string is a valid TOML basic string; the values here are plain.
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def _demo(workdir: Path) -> None:
    from hitl_mail.app import App

    catcher = MailCatcher()
    await catcher.start()
    try:
        settings = demo_settings(workdir, catcher.port)
        config = config_from_dict(settings)
        write_toml(workdir / CONFIG_NAME, settings)
        _say("starting the daemon and loading crewAI (a few seconds) ...")
        async with App(config) as app:
            # The resume workers' zygote imports crewAI in the background (App.startup),
            # while this process imports it for kickoff.
            await asyncio.to_thread(_import_flow_module)
            from hitl_mail.provider import bind_daemon

            bind_daemon(config, app.store)
            _step(1, f"daemon ready: replies on SMTP 127.0.0.1:{app.smtp_port}")
            _say(
                f"    outbound mail is caught by an embedded SMTP server on 127.0.0.1:{catcher.port}"
            )
            await _round_trip(app.smtp_port, app.store, catcher, workdir)
    finally:
        await catcher.stop()


async def _round_trip(smtp_port: int, store: Store, catcher: MailCatcher, workdir: Path) -> None:
    result_path = workdir / "result.json"
    request_id = await _pause_flow(result_path)

    notification = await catcher.wait_for("notification", request_id)
    _step(3, "notification emailed (as caught by the mail catcher):")
    _show(notification, ("From", "To", "Reply-To", "Subject", "Message-ID"))

    reply = reply_to(notification, REPLY)
    await aiosmtplib.send(reply, hostname="127.0.0.1", port=smtp_port, timeout=WAIT)
    _step(4, f"reply sent through the daemon's SMTP listener on 127.0.0.1:{smtp_port}:")
    _show(reply, ("From", "To", "Subject", "In-Reply-To", "References"))

    confirmation = await catcher.wait_for("confirmation", request_id)
    _step(5, "confirmation emailed:")
    _show(confirmation, ("From", "To", "Subject", "In-Reply-To", "X-HITL-Outcome"))

    request = await _wait_resumed(store, request_id)
    result = _read_result(result_path)
    _step(6, f"flow resumed: {json.dumps(result)}")

    from hitl_mail.views import describe

    trail = await asyncio.to_thread(store.trail, request.id)
    _say(f"\n`hitl-mail requests show {request.id}`:\n")
    _say(describe(request, trail))


async def _pause_flow(result_path: Path) -> str:
    from crewai.events.utils.console_formatter import set_suppress_console_output

    from hitl_mail.demo_flow import DemoReviewFlow

    # crewAI's Rich panels ("Flow Paused") would interleave with the demo's own
    # story; the switch is a context variable, so it covers only this kickoff.
    set_suppress_console_output(True)
    result = await DemoReviewFlow().kickoff_async(inputs={"result_path": str(result_path)})
    info = getattr(result, "callback_info", None)
    if not isinstance(info, dict) or "request_id" not in info:
        raise DemoError(f"the sample flow finished without pausing: {result!r}")
    _step(
        2,
        f"flow DemoReviewFlow paused at `review`: request {info['request_id']}, "
        f"assigned to {info['assigned_to']}",
    )
    return str(info["request_id"])


def reply_to(notification: EmailMessage, text: str) -> EmailMessage:
    """A reply as a mail client writes it: threaded under the notification, from its recipient."""
    reply = EmailMessage()
    reply["From"] = str(notification["To"])
    reply["To"] = str(notification["Reply-To"])
    reply["Subject"] = "Re: " + str(notification["Subject"])
    reply["Message-ID"] = make_msgid(domain="example.com")
    reply["In-Reply-To"] = str(notification["Message-ID"])
    reply["References"] = str(notification["Message-ID"])
    reply.set_content(text + "\n")
    return reply


async def _wait_resumed(store: Store, request_id: str) -> FeedbackRequest:
    """Poll the request until the daemon's resume worker has run the flow on."""
    deadline = time.monotonic() + WAIT
    while True:
        request = await asyncio.to_thread(store.get, request_id)
        if request.status == RequestStatus.RESUMED:
            return request
        if request.status == RequestStatus.RESUME_FAILED:
            raise DemoError(f"the flow could not be resumed:\n{request.last_error}")
        if time.monotonic() > deadline:
            raise DemoError(f"the flow was not resumed within {WAIT:.0f}s (it is {request.status})")
        await asyncio.sleep(0.1)


def _read_result(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DemoError(f"the resumed flow wrote no result to {path}: {exc}") from None


def _import_flow_module() -> None:
    # crewAI logs its own chatter at import and kickoff; the demo tells the story itself.
    logging.getLogger("crewai").setLevel(logging.ERROR)
    import hitl_mail.demo_flow  # noqa: F401


def _show(message: EmailMessage, headers: tuple[str, ...]) -> None:
    for name in headers:
        if message[name] is not None:
            _say(f"    {name}: {message[name]}")
    body = message.get_body(("plain",))
    text = body.get_content() if isinstance(body, EmailMessage) else ""
    if message.get_body(("html",)) is not None:
        _say("    (text part below; an HTML part rendered from Markdown goes along)")
    _say(textwrap.indent(text.rstrip(), "    | ", lambda line: True))


def _step(number: int, text: str) -> None:
    _say(f"\n[{number}/{STEPS}] {text}")


def _say(text: str) -> None:
    print(text, flush=True)
