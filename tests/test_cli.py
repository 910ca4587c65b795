"""The command line as an operator meets it (SPEC 2 and 7): exit codes, messages, JSON shapes.

The CLI runs as a real subprocess; the requests it inspects are created in
this process with `intake.create_request`, in the database its config names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, free_port, request_context, write_config

from hitl_mail import intake
from hitl_mail.config import load_config
from hitl_mail.models import AuditEvent, FeedbackRequest, utcnow
from hitl_mail.routing import RoutingError
from hitl_mail.store import Store

REPO = Path(__file__).resolve().parent.parent
SPEC_FIELDS = {
    "id",
    "status",
    "outcome",
    "feedback",
    "source",
    "assigned_to",
    "flow_class",
    "method_name",
    "created_at",
    "answered_at",
    "deadline",
}
AUDIT_FIELDS = {"at", "event", "actor", "source", "detail"}
CONTEXT: dict[str, Any] = request_context()


def hitl_mail(
    *args: str, cwd: Path, env: dict[str, str] | None = None, unset: str | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    environment.pop(unset or "", None)
    return subprocess.run(
        [sys.executable, "-m", "hitl_mail.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Installation:
    """A configuration file, its database, and requests put there by a flow process (this one)."""

    tmp: Path
    config: Path
    store: Store

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return hitl_mail(*args, "--config", str(self.config), cwd=self.tmp)

    def create(self, state: Any = None, **context: Any) -> FeedbackRequest:
        return intake.create_request(
            load_config(self.config), self.store, {**CONTEXT, **context}, state=state or {}
        )

    def json(self, *args: str) -> Any:
        out = self.cli(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def installation(tmp_path: Path, database_url: str) -> Iterator[Installation]:
    rule = """
[[routing.rules]]
name = "Budgets go to the manager"
match = { method_name = "budget" }
assign_from_input = "manager"
"""
    config = write_config(
        tmp_path / "hitl-mail.toml",
        database_url=database_url,
        smtp_port=free_port(),
        relay_port=free_port(),
        llm_url="http://127.0.0.1:9/v1",
        extra=rule,
    )
    store = Store(load_config(config).daemon.database_url)
    store.migrate()
    yield Installation(tmp_path, config, store)
    store.close()


# -- check-config ---------------------------------------------------------------------


def test_check_config_accepts_the_example_configuration(tmp_path: Path) -> None:
    out = hitl_mail(
        "check-config",
        "--config",
        str(REPO / "config.example.toml"),
        cwd=tmp_path,
        env={"HITL_MAIL_SECRET": SECRET},
    )
    assert out.returncode == 0, out.stderr


def test_check_config_names_every_bad_key_by_its_path_and_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        """
[daemon]
secret_key = "tooshortsecret"
poll_intervall = "1s"

[inbound]
reply_domain = "reply.example.com"
port = "not a port"

[outbound]
from_address = "not an address"

[tokens]
max_age = "soon"
""",
        encoding="utf-8",
    )

    out = hitl_mail("check-config", "--config", str(broken), cwd=tmp_path)

    assert out.returncode == 2
    for key in (
        "daemon.secret_key",
        "daemon.poll_intervall",
        "inbound.port",
        "outbound.from_address",
        "tokens.max_age",
    ):
        assert key in out.stderr, f"{key} not named in:\n{out.stderr}"
    assert "tooshortsecret" not in out.stderr  # a secret is named by its key, never echoed


def test_check_config_reports_an_unset_environment_variable_with_its_key(tmp_path: Path) -> None:
    out = hitl_mail(
        "check-config",
        "--config",
        str(REPO / "config.example.toml"),
        cwd=tmp_path,
        unset="HITL_MAIL_SECRET",
    )
    assert out.returncode == 2
    assert "daemon.secret_key" in out.stderr
    assert "HITL_MAIL_SECRET" in out.stderr


def test_check_config_refuses_required_authentication_with_nothing_to_check_it_by(
    tmp_path: Path,
) -> None:
    example = (REPO / "config.example.toml").read_text(encoding="utf-8")
    config = tmp_path / "hitl-mail.toml"
    assert example.count('\nrequire = "none"') == 1  # in [inbound.authentication]
    config.write_text(example.replace('\nrequire = "none"', '\nrequire = "dmarc"'), "utf-8")

    out = hitl_mail(
        "check-config", "--config", str(config), cwd=tmp_path, env={"HITL_MAIL_SECRET": SECRET}
    )

    assert out.returncode == 2
    assert "inbound.authentication: trusted_authserv_ids is empty" in out.stderr
    assert "verify_dkim" in out.stderr


# -- requests show / list -------------------------------------------------------------------


def test_requests_show_of_an_unknown_id_exits_1_with_a_message_on_stderr(
    installation: Installation,
) -> None:
    out = installation.cli("requests", "show", "nosuchrequest", "--json")
    assert out.returncode == 1
    assert "nosuchrequest" in out.stderr
    assert out.stdout == ""


def test_requests_list_json_is_an_array_of_the_spec_fields_without_the_audit_trail(
    installation: Installation,
) -> None:
    first = installation.create()
    second = installation.create(method_name="approve_budget")

    listed = installation.json("requests", "list")

    assert isinstance(listed, list)
    assert {item["id"] for item in listed} == {first.id, second.id}
    for item in listed:
        assert set(item) >= SPEC_FIELDS
        assert "audit" not in item
    shown = {item["id"]: item for item in listed}[first.id]
    assert shown["status"] == "pending"
    assert (shown["outcome"], shown["feedback"], shown["source"]) == (None, None, None)
    assert (shown["answered_at"], shown["deadline"]) == (None, None)
    assert shown["assigned_to"] == "owner@example.com"
    assert (shown["flow_class"], shown["method_name"]) == ("review_flows.ReviewFlow", "review")
    assert datetime.fromisoformat(shown["created_at"]).utcoffset() == timedelta(0)


def test_requests_show_json_has_the_audit_trail_oldest_first_with_utc_offsets(
    installation: Installation,
) -> None:
    request = installation.create()

    shown = installation.json("requests", "show", request.id)

    assert set(shown) >= SPEC_FIELDS | {"audit"}
    assert shown["id"] == request.id
    audit = shown["audit"]
    assert [entry["event"] for entry in audit][:3] == ["created", "assigned", "notification_queued"]
    for entry in audit:
        assert set(entry) >= AUDIT_FIELDS
        assert datetime.fromisoformat(entry["at"]).utcoffset() is not None
    moments = [datetime.fromisoformat(entry["at"]) for entry in audit]
    assert moments == sorted(moments)
    assert audit[1]["detail"]["to"] == "owner@example.com"


def test_requests_show_prints_no_token_even_from_an_audit_row_written_unredacted(
    installation: Installation,
) -> None:
    request = installation.create()
    assert request.token
    address = f"reply+{request.token}@reply.example.com"
    pasted = {"feedback": f"see {address}", "last_error": f"no route to {address}"}
    assert installation.store.transition(request.id, ["pending"], pasted)
    installation.store.add(  # as a release before redaction wrote it, not through audit_event
        AuditEvent(
            request_id=request.id,
            at=utcnow(),
            event="email_sent",
            actor=address,
            detail={"reply_to": address, "message_id": f"<hitl.{request.token}.1@example.com>"},
        )
    )

    text = installation.cli("requests", "show", request.id)
    shown = installation.json("requests", "show", request.id)

    assert text.returncode == 0
    for output in (text.stdout, json.dumps(shown, ensure_ascii=False)):
        assert request.token not in output.lower()
        assert f"reply+{request.token[:6]}…@reply.example.com" in output


def test_requests_list_status_shows_only_requests_in_that_status(
    installation: Installation,
) -> None:
    pending = installation.create()
    with pytest.raises(RoutingError):
        installation.create(method_name="budget", state={"manager": "not an address"})
    [unroutable] = installation.store.requests("unroutable")

    only_pending = installation.json("requests", "list", "--status", "pending")
    only_unroutable = installation.json("requests", "list", "--status", "unroutable")

    assert [item["id"] for item in only_pending] == [pending.id]
    assert [item["id"] for item in only_unroutable] == [unroutable.id]
    assert "not an email address" in only_unroutable[0]["error"]


def test_requests_retry_of_a_request_that_did_not_fail_exits_1(
    installation: Installation,
) -> None:
    request = installation.create()

    out = installation.cli("requests", "retry", request.id)

    assert out.returncode == 1
    assert "pending" in out.stderr
    assert installation.store.get(request.id).status == "pending"
    assert "resume_retry_requested" not in [e.event for e in installation.store.trail(request.id)]
