"""Daemon logs: one event per line, text by default, JSON when configured."""

from __future__ import annotations

import json
import logging

import pytest

from hitl_mail import logs
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
