"""Emails in the reader's language: the catalogues, the configuration, and a German assignee end to end."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from babel.messages.extract import extract_from_file
from babel.messages.pofile import read_po
from conftest import Setup, reply_to, send

from hitl_mail import compose, i18n
from hitl_mail.config import ConfigError, config_from_dict

PACKAGE = Path(compose.__file__).parent
LOCALE = PACKAGE / "locale"
TEMPLATE = LOCALE / "hitl_mail.pot"
SECRET = "k3y-Ab9Zq0Xw7Vu2Ts5Rp8On1Ml4Kj6Ih"


def sentences() -> set[str]:
    """Every sentence compose.py writes, as `pybabel extract -k w -k bold` finds it."""
    found = extract_from_file(
        "python", str(PACKAGE / "compose.py"), keywords={"w": None, "bold": None}
    )
    return {message for _, message, _, _ in found if isinstance(message, str)}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("language", sorted(i18n.languages() - {i18n.SOURCE}))
def test_the_template_and_every_catalogue_cover_every_sentence(language: str) -> None:
    with TEMPLATE.open("rb") as source:
        template = {m.id for m in read_po(source) if m.id}
    with (LOCALE / language / "LC_MESSAGES" / "hitl_mail.po").open("rb") as source:
        translated = {m.id: m for m in read_po(source, locale=language) if m.id}
    assert sentences() == template, "regenerate locale/hitl_mail.pot (README, Languages)"
    for sentence in template:
        entry = translated.get(sentence)
        assert entry is not None, sentence
        assert entry.string, sentence
        assert not entry.fuzzy, sentence
        placeholders = set(re.findall(r"\{\w+\}", sentence))
        assert set(re.findall(r"\{\w+\}", str(entry.string))) == placeholders, sentence


@pytest.mark.sqlite_only
def test_german_ships_and_an_unknown_language_is_refused_with_its_key_path() -> None:
    assert {"en", "de"} <= i18n.languages()
    with pytest.raises(ConfigError, match=r"routing\.language: .*'xx'.*\['de', 'en'\]"):
        config_from_dict(raw(routing={"language": "xx"}))
    with pytest.raises(ConfigError, match=r"routing\.languages\.anna@example\.de"):
        config_from_dict(raw(routing={"languages": {"anna@example.de": "klingon"}}))
    with pytest.raises(ConfigError, match=r"routing\.languages"):
        config_from_dict(raw(routing={"languages": {"not-an-address": "de"}}))


@pytest.mark.sqlite_only
def test_the_assignee_language_beats_the_rule_which_beats_the_default() -> None:
    rule = {"name": "Finance", "assign_to_email": "f@example.com", "language": "de"}
    routing = config_from_dict(
        raw(
            routing={
                "language": "en",
                "languages": {"Anna@Example.DE": "de", "bob@example.com": "en"},
                "rules": [{**rule, "label": "Budget sign-off"}],
            }
        )
    ).routing
    assert routing.language_for(None, "anna@example.de") == "de"
    assert routing.language_for("Finance", "bob@example.com") == "en"
    assert routing.language_for("Finance", "carol@example.com") == "de"
    assert routing.language_for(None, "carol@example.com") == "en"
    assert routing.label_for("Finance") == "Budget sign-off"
    assert routing.label_for(None) is None


def raw(**sections: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {
        "daemon": {"secret_key": SECRET},
        "inbound": {"reply_domain": "reply.example.com"},
        "outbound": {"from_address": "reviews@example.com"},
    }
    return {**values, **sections}


GERMAN = """
[routing.languages]
"owner@example.com" = "de"

[auto_response]
enabled = true
timeout = "2d"
default_outcome = "rejected"
"""


@pytest.mark.slow
def test_a_german_assignee_gets_german_mail_end_to_end_with_german_dates(setup: Setup) -> None:
    setup.config.write_text(setup.config.read_text(encoding="utf-8") + GERMAN, encoding="utf-8")
    setup.start_daemon()
    info = setup.kickoff()["callback_info"]

    [notification] = setup.sink.wait_for("notification", info["request_id"])
    text = " ".join(notification.get_body(("plain",)).get_content().split())  # type: ignore[union-attr]
    assert "Antworten Sie mit einem von: approved, rejected, needs_revision" in text
    assert "Nur die erste Zeile Ihrer Antwort wird gelesen." in text
    weekday = "(Montag|Dienstag|Mittwoch|Donnerstag|Freitag|Samstag|Sonntag)"
    month = "(Januar|Februar|März|April|Mai|Juni|Juli|August|September|Oktober|November|Dezember)"
    deadline = rf"Bitte antworten Sie bis {weekday}, \d{{1,2}}\. {month} \d{{4}}, \d\d:\d\d UTC"
    assert re.search(rf"{deadline} \(in 2 Tagen\)", text), text
    assert "wird automatisch rejected erfasst" in text
    assert notification["Reply-To"].addresses[0].display_name == "Hier antworten"
    html = notification.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert '<html lang="de">' in html

    send(setup.smtp_port, reply_to(notification, "approved"))

    [confirmation] = setup.sink.wait_for("confirmation", info["request_id"])
    said = " ".join(confirmation.get_body(("plain",)).get_content().split())  # type: ignore[union-attr]
    assert said.startswith("Erfasst: approved")
    assert "Die Frage war: Approve the budget?" in said
    assert "Ihre Antwort „approved“ entsprach genau der Antwort approved." in said
    assert "Der Ablauf geht nun weiter; Sie müssen nichts mehr tun." in said
    assert "Anfrage " in said
