"""Parse functions for the parse workers in tests: `parse_reply`, unless the message asks otherwise.

A worker process imports this module by name (it is on the tests' sys.path),
so a test can make one message's parse spin or crash the worker without a
real costly message, whatever the parser of the day finds costly.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hitl_mail.replies import ParsedReply, parse_reply

SPIN_FOR = 60.0  # seconds of busy CPU: far longer than any parse_timeout a test sets


def parse_or_misbehave(raw: bytes, **options: Any) -> ParsedReply:
    """`X-Test-Parse: spin` burns CPU for a minute; `X-Test-Parse: crash` ends the worker."""
    if b"X-Test-Parse: spin" in raw:
        until = time.monotonic() + SPIN_FOR
        while time.monotonic() < until:
            pass
    if b"X-Test-Parse: crash" in raw:
        os._exit(70)
    return parse_reply(raw, **options)
