"""The whole loop with real processes: a flow pauses, the daemon emails, a reply resumes it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import FLOWS, SECRET, Setup, reply_to, send, wait_until

from hitl_mail.config import load_config

pytestmark = pytest.mark.slow


def test_a_paused_flow_is_emailed_and_an_exact_reply_resumes_it_without_an_llm_call(
    setup: Setup,
) -> None:
    daemon = setup.start_daemon()
    paused = setup.kickoff()
    assert paused["paused"] is True
    info = paused["callback_info"]
    assert set(info) >= {"request_id", "assigned_to", "reply_to"}
    assert info["assigned_to"] == "owner@example.com"
    assert info["reply_to"].endswith("@reply.example.com")

    [notification] = setup.sink.wait_for("notification", info["request_id"])
    assert notification["Reply-To"].addresses[0].addr_spec == info["reply_to"]
    assert notification["Auto-Submitted"] == "auto-generated"
    assert notification["Message-ID"].endswith("@example.com>")
    assert notification.get_content_type() == "multipart/alternative"
    html = notification.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "<table" in html
    assert "<strong>" in html
    assert "<script" not in html.lower()
    assert "servers" in notification.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    send(setup.smtp_port, reply_to(notification, "Approved!"))

    [confirmation] = setup.sink.wait_for("confirmation", info["request_id"])
    assert confirmation["X-HITL-Outcome"] == "approved"
    assert confirmation["In-Reply-To"] == notification["Message-ID"]
    assert confirmation["To"] == "owner@example.com"
    [approved] = setup.wait_event("approved")
    assert approved["pid"] != daemon.pid  # ran in a resume worker, observed from outside
    assert approved["feedback"] == "Approved!"
    assert setup.llm.requests == []

    shown = setup.show(info["request_id"])
    assert shown["status"] == "resumed"
    assert (shown["outcome"], shown["source"], shown["feedback"]) == (
        "approved",
        "email",
        "Approved!",
    )
    events = [e["event"] for e in shown["audit"]]
    assert events[:2] == ["created", "assigned"]
    assert {"email_sent", "answered", "resumed"} <= set(events)
    assert setup.stop_daemon(daemon) == 0


def test_free_text_goes_to_the_llm_once_loops_the_flow_and_a_second_reply_completes_it(
    setup: Setup,
) -> None:
    setup.llm.rules = {"detail": "needs_revision"}
    setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    [first] = setup.sink.wait_for("notification", info["request_id"])

    send(setup.smtp_port, reply_to(first, "Needs more detail on the costs"))

    [confirmation] = setup.sink.wait_for("confirmation", info["request_id"])
    assert confirmation["X-HITL-Outcome"] == "needs_revision"
    [llm_request] = setup.llm.requests
    assert "needs_revision" in str(llm_request["tools"])
    assert "approved" in str(llm_request["tools"])
    assert "Needs more detail on the costs" in str(llm_request["messages"])

    # The flow looped back to review and paused again: a new request, a new notification.
    second = setup.sink.wait_for("notification", count=2)[1]
    second_id = second["X-HITL-Request-Id"]
    assert second_id != info["request_id"]
    assert setup.show(info["request_id"])["status"] == "resumed"

    send(setup.smtp_port, reply_to(second, "approved"))
    [approved] = setup.wait_event("approved")
    assert approved["rounds"] == 2
    assert len(setup.llm.requests) == 1  # the exact option cost no LLM call
    assert setup.show(second_id)["outcome"] == "approved"


def test_a_daemon_killed_with_unsent_mail_and_right_after_a_250_loses_nothing_and_repeats_nothing(
    setup: Setup,
) -> None:
    setup.sink.stop()  # the relay is down
    daemon = setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    rid = info["request_id"]
    wait_until(
        lambda: any(e["event"] == "email_retry" for e in setup.show(rid)["audit"]),
        30,
        what="a failed attempt",
    )
    setup.stop_daemon(daemon, signal.SIGKILL)

    setup.sink.start()  # relay back; a fresh daemon sends what the dead one could not
    daemon = setup.start_daemon()
    [notification] = setup.sink.wait_for("notification", rid)

    send(setup.smtp_port, reply_to(notification, "approved"))
    setup.stop_daemon(daemon, signal.SIGKILL)  # at once after the 250

    setup.start_daemon()
    setup.wait_event("approved")
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="resumed")
    time.sleep(1.5)  # would a second notification, confirmation or resume show up?
    assert len(setup.sink.of("notification", rid)) == 1
    assert len(setup.sink.of("confirmation", rid)) == 1
    assert len([e for e in setup.events() if e["event"] == "approved"]) == 1
    audit = [e["event"] for e in setup.show(rid)["audit"]]
    assert audit.count("answered") == 1
    assert audit.count("resumed") == 1


def test_a_slow_flow_method_does_not_delay_the_250_of_other_replies(setup: Setup) -> None:
    setup.start_daemon()
    slow, other = setup.kickoff_many(2, {"slow": 5})
    first = setup.sink.wait_for("notification", slow["callback_info"]["request_id"])[0]
    second = setup.sink.wait_for("notification", other["callback_info"]["request_id"])[0]

    send(setup.smtp_port, reply_to(first, "approved"))
    setup.wait_event("approved")  # the slow listener is now sleeping in a worker
    started = time.monotonic()
    send(setup.smtp_port, reply_to(second, "rejected"))
    elapsed = time.monotonic() - started
    assert not [e for e in setup.events() if e["event"] == "slow_done"], (
        "the slow method had already finished"
    )
    assert elapsed < 2.0, f"the 250 took {elapsed:.2f}s while a flow method slept"
    setup.wait_event("rejected")
    setup.wait_event("slow_done")


def test_a_flow_that_cannot_be_imported_is_resume_failed_and_resumes_after_a_fix_and_retry(
    setup: Setup,
) -> None:
    broken = setup.config.read_text().replace(
        f'import_paths = ["{FLOWS}"]', 'import_paths = ["/nonexistent"]'
    )
    good = setup.config.read_text()
    setup.config.write_text(broken)
    env = {k: v for k, v in setup.env.items() if k != "PYTHONPATH"}
    daemon = setup.start_daemon(env)
    info = setup.kickoff()["callback_info"]
    rid = info["request_id"]
    [notification] = setup.sink.wait_for("notification", rid)
    send(setup.smtp_port, reply_to(notification, "approved"))

    wait_until(lambda: setup.show(rid)["status"] == "resume_failed", 60, what="resume_failed")
    shown = setup.show(rid)
    assert "review_flows" in shown["error"]
    assert "ModuleNotFoundError" in shown["error"]
    assert setup.cli("requests", "list", "--status", "resume_failed").stdout.count(rid) == 1

    setup.config.write_text(good)
    daemon.send_signal(signal.SIGHUP)  # reload: new import paths for fresh resume workers
    time.sleep(1.0)
    retried = setup.cli("requests", "retry", rid)
    assert retried.returncode == 0, retried.stderr
    setup.wait_event("approved")
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="resumed")


def test_a_flow_that_kills_its_worker_is_recorded_and_retried_by_a_fresh_worker(
    setup: Setup,
) -> None:
    marker = setup.tmp / "died-once"
    setup.start_daemon()
    rid = setup.kickoff({"die_once": str(marker)})["callback_info"]["request_id"]
    [notification] = setup.sink.wait_for("notification", rid)
    send(setup.smtp_port, reply_to(notification, "approved"))

    def failures() -> list[dict[str, Any]]:
        return [e for e in setup.show(rid)["audit"] if e["event"] == "resume_failed"]

    [failed] = wait_until(failures, 60, what="resume_failed recorded")
    assert marker.exists()
    assert "worker process died" in failed["detail"]["error"]
    assert failed["detail"]["attempt"] == 1
    assert failed["detail"]["retry_at"]
    setup.wait_event("approved")  # retried after its backoff, in a fresh worker
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 60, what="resumed")
    assert len(failures()) == 1


@pytest.mark.parametrize("flow", ["AsyncReviewFlow", "PersistedReviewFlow"])
def test_async_flows_and_flows_with_their_own_persistence_pause_and_resume_too(
    setup: Setup, flow: str
) -> None:
    setup.start_daemon()
    info = setup.kickoff(flow=flow)["callback_info"]
    [notification] = setup.sink.wait_for("notification", info["request_id"])
    send(setup.smtp_port, reply_to(notification, "approved"))
    setup.wait_event("async_approved" if flow.startswith("Async") else "approved")
    wait_until(lambda: setup.show(info["request_id"])["status"] == "resumed", 30, what="resumed")


def test_a_flow_defined_in_a_script_run_as_main_is_refused_at_pause_time(setup: Setup) -> None:
    script = setup.tmp / "script_flow.py"
    script.write_text(
        "from crewai.flow.flow import Flow, start\n"
        "from crewai.flow.human_feedback import human_feedback\n"
        "from hitl_mail import MailProvider\n"
        "class ScriptFlow(Flow):\n"
        "    @start()\n"
        "    @human_feedback(message='ok?', emit=['approved', 'rejected'], llm='gpt-4o-mini', provider=MailProvider())\n"
        "    def draft(self):\n"
        "        return 'draft'\n"
        "ScriptFlow().kickoff()\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], env=setup.env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "__main__.ScriptFlow is defined in a script run as __main__" in out.stderr
    assert "importable module" in out.stderr
    listing = setup.cli("requests", "list", "--json")
    assert json.loads(listing.stdout) == []


def test_after_a_full_run_no_token_or_secret_is_in_the_logs_the_audit_table_or_requests_show(
    setup: Setup,
) -> None:
    """SPEC 9: a token may show as its first 6 characters, never whole, at any log level.

    Nor does a message body reach the log; of the genuine reply, the audit trail
    keeps its new text, never the quoted history below it.
    """
    setup.config.write_text(setup.config.read_text() + '\n[logging]\nlevel = "DEBUG"\n')
    daemon = setup.start_daemon()
    info = setup.kickoff()["callback_info"]
    rid = info["request_id"]
    token = info["reply_to"].partition("+")[2].partition("@")[0]
    assert len(token) == 48
    [notification] = setup.sink.wait_for("notification", rid)

    forger = "mallory@attacker.example.net"  # refused, and the assignee is told by mail
    forged = reply_to(notification, "Approved\n\nforged-body-7031", sender=forger)
    send(setup.smtp_port, forged, envelope_from=forger)
    [warning] = setup.sink.wait_for("error", rid)
    send(setup.smtp_port, reply_to(notification, "Approved\n\ngenuine-body-5119"))
    setup.sink.wait_for("confirmation", rid)
    setup.wait_event("approved")
    wait_until(lambda: setup.show(rid)["status"] == "resumed", 30, what="resumed")
    wait_until(
        lambda: [e["event"] for e in setup.show(rid)["audit"]].count("email_sent") == 3,
        30,
        what="the notification, the warning and the confirmation sent",
    )
    assert setup.stop_daemon(daemon) == 0

    shown = setup.cli("requests", "show", rid)
    shown_json = setup.cli("requests", "show", rid, "--json")
    listed = setup.cli("requests", "list", "--json")
    engine = sa.create_engine(load_config(setup.config).daemon.database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM audit")).all()
    engine.dispose()
    audit_table = "\n".join(str(tuple(row)) for row in rows)
    log = setup.daemon_log()
    places = {
        "the daemon's log": log,
        "requests show": shown.stdout + shown.stderr,
        "requests show --json": shown_json.stdout + shown_json.stderr,
        "requests list --json": listed.stdout,
        "the audit table": audit_table,
    }
    assert "reply_wrong_sender" in audit_table
    assert "answered" in audit_table
    assert f"{token[:6]}…" in log  # the recipients were logged, and cut
    assert "DEBUG" in log
    for place, text in places.items():
        assert token not in text.lower(), f"the token is in {place}"
        assert SECRET not in text, f"the secret key is in {place}"
    assert warning["X-HITL-Error"] == "wrong_sender"
    assert "genuine-body-5119" in audit_table  # the reply's own text, kept
    assert "> Reply with one of" not in audit_table  # its quoted history, not
    for body in ("forged-body-7031", "genuine-body-5119", "Reply with one of"):
        assert body not in log, f"a message body is in the daemon's log: {body}"
