"""Log setup for the daemon: one event per line, human-readable text or JSON, to stderr.

Every line passes through `tokens.redact` last, whoever logged it (a library,
a traceback): a token in a log is a credential in a file (SPEC 9).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from hitl_mail import tokens
from hitl_mail.config import LoggingSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class Redacting(logging.Formatter):
    """Another formatter's line, with every token cut to its first characters."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return tokens.redact(self.inner.format(record))


def setup(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    inner = JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(Redacting(inner))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    for noisy in (
        "LiteLLM",
        "litellm",
        "httpx",
        "aiosmtpd",
        "mail.log",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
