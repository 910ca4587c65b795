"""The configuration file: the shipped example, every problem at once, sizes, durations, paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from hitl_mail.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    config_from_dict,
    config_path,
    load_config,
    parse_duration,
    parse_size,
)
from hitl_mail.tokens import TOKEN_LENGTH

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECRET = "a-test-secret-of-more-than-16-chars"

MINIMAL = """\
[daemon]
secret_key = "a-test-secret-of-more-than-16-chars"

[inbound]
reply_domain = "reply.example.com"

[outbound]
from_address = "Reviews <reviews@example.com>"
"""

BROKEN = """\
[daemon]
secret_key = "a-test-secret-of-more-than-16-chars"
poll_interval = "soon"

[inbound]
reply_domain = "reply.example.com"
prot = 2525
port = 70000
max_message_size = "ten megs"

[outbound]
from_address = "Reviews <reviews@example.com>"

[routing]
[[routing.rules]]
name = "Approvals to Finance"
assign_to_email = "finance-at-example.com"
colour = "red"

[bogus]
answer = 42
"""


def _write(tmp_path: Path, text: str, name: str = "hitl-mail.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def _minimal(**sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "daemon": {"secret_key": SECRET},
        "inbound": {"reply_domain": "reply.example.com"},
        "outbound": {"from_address": "reviews@example.com"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


# The shipped example


def test_the_example_file_validates_when_the_secret_is_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HITL_MAIL_SECRET", SECRET)
    config = load_config(EXAMPLE)
    assert isinstance(config, Config)
    assert config.daemon.secret_key == SECRET
    assert config.inbound.reply_domain == "reply.example.com"
    assert config.inbound.max_message_size == 1_000_000
    assert config.tokens.max_age == timedelta(days=7)
    assert config.routing.default_assignee == "owner@example.com"
    (rule,) = config.routing.rules
    assert rule.name == "Approvals to Finance"
    assert rule.match.method_name == "approve_*"
    assert rule.assign_to_email == "finance@example.com"
    assert rule.assign_from_input == "manager_email"
    assert config.auto_response.timeout == timedelta(hours=24)


def test_the_example_file_without_the_secret_names_the_key_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HITL_MAIL_SECRET", raising=False)
    problems = _problems(EXAMPLE)
    assert len(problems) == 1
    assert "daemon.secret_key" in problems[0]
    assert "HITL_MAIL_SECRET" in problems[0]


def test_the_example_file_documents_every_key_the_config_accepts() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    sections = [(name, field.annotation) for name, field in Config.model_fields.items()]
    while sections:
        section, settings = sections.pop()
        if section == "source":
            continue
        assert f"[{section}]" in text, section
        if get_origin(settings) is tuple:  # an array of tables: [[webhooks]]
            settings = get_args(settings)[0]
        assert isinstance(settings, type)
        for key, field in settings.model_fields.items():
            if key == "rules":
                assert "[[routing.rules]]" in text
                continue
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                sections.append((f"{section}.{key}", field.annotation))  # [inbound.authentication]
                continue
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{section}.{key}"
    for key in ("name", "match", "method_name", "flow_class"):
        assert key in text


# Every problem, with its key path, in one error


def test_a_broken_file_reports_every_problem_with_its_key_path_at_once(tmp_path: Path) -> None:
    problems = _problems(_write(tmp_path, BROKEN))
    report = "\n".join(problems)
    expected = {
        "daemon.poll_interval": "not a duration",
        "inbound.prot": "did you mean 'port'",
        "inbound.port": "65535",
        "inbound.max_message_size": "not a size",
        "routing.rules[0].assign_to_email": "not an email address",
        "routing.rules[0].colour": "unknown key",
        "bogus": "unknown key",
    }
    for where, what in expected.items():
        assert any(p.startswith(f"{where}:") and what in p for p in problems), (where, report)
    assert len(problems) == len(expected), report


def test_a_misspelled_section_gets_a_suggestion(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "\n[auto_respons]\nenabled = false\n")
    assert _problems(path) == ["auto_respons: unknown key (did you mean 'auto_response'?)"]


def test_a_file_that_is_not_toml_is_reported_with_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "\n[inbound\nport = \n")
    (problem,) = _problems(path)
    assert str(path) in problem
    assert "not valid TOML" in problem


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    (problem,) = _problems(tmp_path / "absent.toml")
    assert "absent.toml" in problem
    assert "cannot read" in problem


def test_required_keys_are_named_when_missing() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"daemon": {"secret_key": SECRET}})
    assert sorted(caught.value.problems) == [
        "inbound: required key is missing",
        "outbound: required key is missing",
    ]


def test_a_short_secret_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"daemon\.secret_key"):
        config_from_dict(_minimal(daemon={"secret_key": "short"}))


def test_any_string_value_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "hunter2")
    config = config_from_dict(_minimal(outbound={"password": "env:SMTP_PASSWORD"}))
    assert config.outbound.password == "hunter2"


def test_an_unset_variable_for_an_optional_key_is_still_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_minimal(llm={"api_key": "env:NO_SUCH_VARIABLE"}))
    assert caught.value.problems == [
        "llm.api_key: environment variable NO_SUCH_VARIABLE is not set"
    ]


def test_tls_settings_that_contradict_each_other_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"outbound: .*not both"):
        config_from_dict(_minimal(outbound={"starttls": True, "use_tls": True}))
    with pytest.raises(ConfigError, match="inbound: tls_cert and tls_key"):
        config_from_dict(_minimal(inbound={"tls_cert": "/etc/cert.pem"}))
    with pytest.raises(ConfigError, match="inbound: require_starttls"):
        config_from_dict(_minimal(inbound={"require_starttls": True}))


def test_a_rule_without_any_target_is_refused() -> None:
    rules = {"rules": [{"name": "Nowhere", "match": {"method_name": "x"}}]}
    with pytest.raises(ConfigError, match=r"routing\.rules\[0\]: a rule needs"):
        config_from_dict(_minimal(routing=rules))


def test_enabled_auto_response_needs_a_default_outcome() -> None:
    with pytest.raises(ConfigError, match="auto_response: enabled auto_response needs"):
        config_from_dict(_minimal(auto_response={"enabled": True}))


def test_the_longest_local_part_allowed_still_fits_rfc_5321() -> None:
    config = config_from_dict(_minimal(inbound={"local_part": "a" * 15, "separator": "-"}))
    assert len(config.inbound.local_part) + 1 + TOKEN_LENGTH <= 64
    with pytest.raises(ConfigError, match=r"inbound\.local_part"):
        config_from_dict(_minimal(inbound={"local_part": "a" * 16}))


def test_the_config_is_frozen() -> None:
    config = config_from_dict(_minimal())
    with pytest.raises(ValueError, match="frozen"):
        config.inbound.port = 25


# Sizes and durations


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10_000_000),
        ("10MiB", 10 * 1024**2),
        ("512KB", 512_000),
        ("1KiB", 1024),
        ("1GB", 1000**3),
        ("2GiB", 2 * 1024**3),
        ("1.5MB", 1_500_000),
        ("300", 300),
        ("300B", 300),
        (4096, 4096),
    ],
)
def test_sizes_use_powers_of_1000_for_kb_and_1024_for_kib(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 megs", "MB", "-1MB", "10XB", "", True])
def test_a_bad_size_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_max_message_size_accepts_binary_units() -> None:
    config = config_from_dict(_minimal(inbound={"max_message_size": "10MiB"}))
    assert config.inbound.max_message_size == 10 * 1024**2


@pytest.mark.parametrize(
    ("text", "duration"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("500ms", timedelta(milliseconds=500)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        ("90S", timedelta(seconds=90)),
        (30, timedelta(seconds=30)),
    ],
)
def test_durations_are_written_with_a_unit(text: str | int, duration: timedelta) -> None:
    assert parse_duration(text) == duration


@pytest.mark.parametrize("text", ["soon", "7", "7 days", "h", "-5s", "", False])
def test_a_bad_duration_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# Paths


def test_a_relative_sqlite_path_is_anchored_at_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    _write(
        config_dir, MINIMAL.replace("[daemon]", '[daemon]\ndatabase_url = "sqlite:///data/h.db"')
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc") / "hitl-mail.toml")
    assert config.daemon.database_url == f"sqlite:///{config_dir.resolve()}/data/h.db"
    assert config.flows.import_paths == (str(config_dir.resolve()),)
    assert config.source == Path("etc") / "hitl-mail.toml"


def test_the_default_database_sits_beside_the_config_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.daemon.database_url == f"sqlite:///{tmp_path.resolve()}/hitl-mail.db"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/hitl-mail/h.db",
        "sqlite:///:memory:",
        "postgresql+psycopg://hitl@db.example.com/hitl",
    ],
)
def test_absolute_and_non_file_database_urls_are_left_alone(tmp_path: Path, url: str) -> None:
    text = MINIMAL.replace("[daemon]", f'[daemon]\ndatabase_url = "{url}"')
    assert load_config(_write(tmp_path, text)).daemon.database_url == url


def test_an_explicit_config_path_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/etc/hitl-mail/from-env.toml")
    assert config_path("given.toml") == Path("given.toml")


def test_the_environment_names_the_config_when_no_path_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/etc/hitl-mail/from-env.toml")
    assert config_path(None) == Path("/etc/hitl-mail/from-env.toml")


def test_without_path_or_environment_the_config_is_hitl_mail_toml_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config_path(None) == Path("hitl-mail.toml")
    monkeypatch.setenv(CONFIG_ENV, "")
    assert config_path(None) == Path("hitl-mail.toml")
