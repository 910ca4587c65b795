"""The daemon's log while it resumes flows: one line per resume, never crewAI's console panels.

crewAI renders flow events as Rich panels meant for a terminal ("Flow
Started", each "Method" run, "Flow Completed"); resume workers run flows, so
without care those panels filled the daemon's log. A real daemon, real
flows, real SMTP; the daemon's stdout and stderr are captured together.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import Setup, reply_to, send, send_async_many, wait_until

from hitl_mail import tokens

REPLIES = 200
RESUME_WORKERS = 2  # conftest's daemon
BATCH = 40
# Rich's panel borders (rounded and square boxes) and crewAI's flow-event texts.
PANEL = re.compile(r"[╭╮╰╯│─┌┐└┘]")
CREWAI_EVENTS = ("Flow Started", "Flow Execution", "Method", "Flow Completed", "🌊")
RESUMED = re.compile(
    r" INFO hitl_mail\.resume: request (\w+): resume of review_flows\.ReviewFlow "
    r"with outcome approved took \d+\.\d\ds: ok$"
)


@pytest.mark.slow
def test_a_200_reply_run_logs_one_line_per_resume_and_no_crewai_panel(setup: Setup) -> None:
    setup.start_daemon()
    paused = setup.kickoff_many(REPLIES)
    ids = {p["callback_info"]["request_id"] for p in paused}
    notifications = setup.sink.wait_for("notification", count=REPLIES, timeout=120)

    replies = [reply_to(n, "approved") for n in notifications]
    for start in range(0, REPLIES, BATCH):  # within the listener's connection limit
        batch = replies[start : start + BATCH]
        assert send_async_many(setup.smtp_port, batch) == [None] * len(batch)

    setup.wait_event("approved", count=REPLIES, timeout=300)
    setup.sink.wait_for("confirmation", count=REPLIES, timeout=60)

    def resumed_lines() -> list[str]:
        return [m[1] for line in setup.daemon_log().splitlines() if (m := RESUMED.search(line))]

    # The flow writes its event before the worker returns; the daemon logs the
    # resume after that, so the last lines may trail the last event briefly.
    wait_until(lambda: len(resumed_lines()) >= REPLIES, 30, what="a log line for every resume")
    lines = setup.daemon_log().splitlines()
    assert [line for line in lines if PANEL.search(line)] == []
    assert [line for line in lines if any(text in line for text in CREWAI_EVENTS)] == []
    assert sorted(resumed_lines()) == sorted(ids)  # exactly one line for each resume
    assert len([line for line in lines if "hitl_mail.resume" in line]) >= REPLIES
    # crewAI warns again for every flow it restores; each worker says it once.
    warned = Counter(
        line.partition(" WARNING ")[2] for line in lines if re.search(r" WARNING crewai\b", line)
    )
    assert all(count <= RESUME_WORKERS for count in warned.values()), warned.most_common(3)


@pytest.mark.slow
def test_a_warning_logged_while_resuming_reaches_the_daemons_log_as_one_redacted_line(
    setup: Setup,
) -> None:
    token = tokens.mint(tokens.new_request_id(), "owner@example.com", ["k" * 32])
    setup.start_daemon()
    info = setup.kickoff({"warn": f"cannot reach reply+{token}@reply.example.com"})
    [notification] = setup.sink.wait_for("notification", info["callback_info"]["request_id"])

    send(setup.smtp_port, reply_to(notification, "approved"))

    setup.wait_event("approved")
    line = wait_until(
        lambda: next((ln for ln in setup.daemon_log().splitlines() if "cannot reach" in ln), None),
        30,
        what="the flow's warning in the daemon's log",
    )
    assert re.search(r"\d \bWARNING crewai\.flow\.review: cannot reach reply\+\w{6}…@", line)
    assert token not in setup.daemon_log().lower()
