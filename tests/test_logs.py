"""Daemon logs: one event per line, text by default, JSON when configured."""

from __future__ import annotations

import json
import logging
from typing import Literal

import pytest

from hitl_mail import logs, tokens
from hitl_mail.config import LoggingSettings


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_json_logging_writes_one_parseable_object_per_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup(LoggingSettings(level="INFO", format="json"))
    logging.getLogger("hitl_mail.answering").info(
        "reply %s for request %s: %s", 7, "abc", "answered"
    )
    logging.getLogger("hitl_mail.answering").debug("not at INFO")
    [line] = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "reply 7 for request abc: answered"
    assert (entry["level"], entry["logger"]) == ("INFO", "hitl_mail.answering")
    assert entry["at"].endswith("+00:00")


def test_text_logging_is_one_readable_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(LoggingSettings(level="WARNING", format="text"))
    logging.getLogger("hitl_mail.outbound").warning("request %s: notification failed", "abc")
    logging.getLogger("hitl_mail.outbound").info("quiet")
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("WARNING hitl_mail.outbound: request abc: notification failed")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("form", ["text", "json"])
def test_no_token_reaches_the_log_even_from_another_library_or_a_traceback(
    capsys: pytest.CaptureFixture[str], form: Literal["text", "json"]
) -> None:
    token = tokens.mint(tokens.new_request_id(), "ann@example.com", ["k" * 32])
    logs.setup(LoggingSettings(level="DEBUG", format=form))
    logging.getLogger("aiosmtpd.anything").warning("RCPT TO:<reply+%s@r.example.com>", token)
    try:
        raise ValueError(f"bad address reply+{token.upper()}@r.example.com")
    except ValueError:
        logging.getLogger("hitl_mail.inbound").exception("could not check %s", token)
    written = capsys.readouterr().err
    assert token[:6] + "…" in written
    assert token not in written.lower()
