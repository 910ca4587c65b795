"""`hitl-mail demo`, run as a newcomer runs it: no configuration, no API key, one command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def section(output: str, step: int) -> str:
    """The text the demo printed under its `[step/6]` heading."""
    start = output.index(f"[{step}/6]")
    end = output.find(f"[{step + 1}/6]", start)
    return output[start : end if end != -1 else len(output)]


@pytest.mark.timeout(200)
def test_the_demo_pauses_a_flow_emails_it_takes_a_reply_and_prints_the_resumed_result(
    tmp_path: Path,
) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"HITL_MAIL_CONFIG", "OPENAI_API_KEY"}
    }
    env["TMPDIR"] = str(tmp_path)  # the demo's working directory lands here, and goes with it
    run = subprocess.run(
        [sys.executable, "-m", "hitl_mail.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout

    notification = section(out, 3)
    assert "To: you@example.com" in notification
    assert "Reply-To: Reply to answer <reply+" in notification
    assert "@reply.localhost" in notification
    assert "Reply with one of: approved, rejected" in notification

    reply = section(out, 4)
    assert "From: you@example.com" in reply
    assert "| approved" in reply

    confirmation = section(out, 5)
    assert "X-HITL-Outcome: approved" in confirmation
    assert "Recorded: approved" in confirmation

    assert 'flow resumed: {"action": "published", "outcome": "approved"' in out
    assert "status: resumed" in out
    assert "╭" not in out  # crewAI's console panels are kept out of the story
