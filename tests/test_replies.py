"""A reply's raw bytes become its new text and first line; machine mail is recognised.

The corpus under ``tests/replies/`` holds complete messages as the common mail
clients write them; ``tests/replies/machine/`` holds auto-replies, bounces, list
copies, our own mail, and the human mail that looks machine-made.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hitl_mail.replies import (
    MAX_TEXT_LINES,
    ParsedReply,
    extract_new_text,
    html_to_text,
    machine_reason,
    parse_reply,
)

CORPUS = Path(__file__).parent / "replies"
PERSON = "jane.doe@example.org"

# file stem -> (first_line, whole text or None when only the first line is pinned)
EXPECTED: dict[str, tuple[str, str | None]] = {
    # Gmail
    "gmail-alternative-wrapped-attribution": ("Approved!", "Approved!"),
    "gmail-html-only-gmail-quote": ("approved", "approved\n\nThanks – Jane"),
    "gmail-quoted-printable-multiline": (
        "Needs more detail on the costs",
        "Needs more detail on the costs\n"
        "Can you split travel from hardware? The hardware line looks high compared to Q3"
        " – it’s twice the spend.\n\nThanks,\nJane",
    ),
    "gmail-signature-dash-dash-space": ("Approved, go ahead.", "Approved, go ahead."),
    "gmail-android": ("approved", "approved"),
    "gmail-forwarded-message-marker": ("approved", "approved"),
    "gmail-first-line-starting-with-on": ("On reflection, approved.", None),
    # Outlook desktop, web and mobile
    "outlook-desktop-header-block": (
        "Needs more detail on the costs",
        "Needs more detail on the costs\n\nKind regards\nTom",
    ),
    "outlook-desktop-original-message": (
        "Rejected - wrong cost centre.",
        "Rejected - wrong cost centre.\n\nTom",
    ),
    "outlook-desktop-html-only": ("Approved", "Approved\n\nTom"),
    "outlook-web-underscore-separator": ("approved", "approved"),
    "outlook-web-html-divrplyfwdmsg": (
        "Needs more detail on the costs",
        "Needs more detail on the costs\n\nMaria Rossi | Controller",
    ),
    "outlook-web-html-divrplyfwdmsg-without-appendonsend": ("Rejected", "Rejected"),
    "outlook-mobile-get-outlook-for-ios": ("Approved", "Approved"),
    # Apple
    "apple-mail-macos-plain": ("Approved", "Approved"),
    "apple-mail-html-blockquote-cite": ("Approved!", "Approved!"),
    "apple-mail-html-attribution-outside-blockquote": (
        "Rejected, the offsite is not in this budget.",
        "Rejected, the offsite is not in this budget.\n\nLena",
    ),
    "apple-begin-forwarded-message": ("Approved from my side — forwarding to Finance.", None),
    "iphone-sent-from-my-iphone": ("Approved", "Approved"),
    "ipad-sent-from-my-ipad": ("OK to proceed", "OK to proceed"),
    # Thunderbird
    "thunderbird-format-flowed": (
        "Needs more detail on the costs. The hardware line is twice what we spent in Q3"
        " and I cannot see why.",
        None,
    ),
    "thunderbird-format-flowed-delsp": (
        "Approved, but split the travel costs per team.",
        "Approved, but split the travel costs per team.\nFrom now on please attach the quotes.",
    ),
    "thunderbird-html-moz-cite-prefix": (
        "Rejected: the offsite is out of scope.",
        "Rejected: the offsite is out of scope.\n\nAnna",
    ),
    # other mobile clients
    "samsung-sent-from-my-galaxy": ("Approved", "Approved"),
    # languages
    "gmail-french-a-ecrit": ("Parfait, approuvé.", "Parfait, approuvé."),
    "iphone-french-envoye-de-mon-iphone": ("Approuvé", "Approuvé"),
    "outlook-french-de-envoye": (
        "Refusé, il manque le détail des coûts.",
        "Refusé, il manque le détail des coûts.\n\nClaire",
    ),
    "gmail-german-schrieb-wrapped": ("Genehmigt", "Genehmigt"),
    "iphone-german-von-meinem-iphone-gesendet": ("Passt so.", "Passt so."),
    "outlook-german-von-gesendet-latin1": (
        "Genehmigt.",
        "Genehmigt.\n\nMit freundlichen Grüßen\nJürgen",
    ),
    "outlook-german-urspruengliche-nachricht-cp1252": (
        "Abgelehnt – bitte „Reisekosten“ aufschlüsseln.",
        None,
    ),
    "gmail-spanish-escribio-wrapped": ("Aprobado", "Aprobado"),
    "iphone-spanish-enviado-desde-mi-iphone": ("Rechazado, falta el desglose.", None),
    "outlook-spanish-de-enviado": ("Aprobado con cambios", "Aprobado con cambios"),
    "gmail-italian-ha-scritto": ("Approvato", "Approvato"),
    "outlook-italian-da-inviato": ("Respinto", "Respinto"),
    "gmail-dutch-schreef": ("Goedgekeurd", "Goedgekeurd"),
    "outlook-dutch-van-verzonden": ("Afgewezen", "Afgewezen"),
    "gmail-portuguese-escreveu-wrapped": ("Aprovado", "Aprovado"),
    # posting styles
    "mutt-bottom-posted": (
        "Approved, go ahead.",
        "Approved, go ahead.\nPlease book the offsite early.",
    ),
    "bottom-posted-interleaved": ("approved", "approved"),
    "top-posted-double-dash-signature": ("Rejected", "Rejected"),
    # nothing new
    "empty-reply-only-quote": ("", ""),
    "empty-reply-html-only-quote": ("", ""),
    "empty-reply-only-mobile-signature": ("", ""),
    # charsets, transfer encodings, invisible characters
    "base64-utf8-emoji": ("Approved ✅", "Approved ✅"),
    "windows-1252-smart-quotes": ("“Approved” – but cap travel at €5,000.", None),
    "windows-1252-quoted-printable": ("Genehmigt – „passt“.", None),
    "bogus-charset-utf8-bytes": ("Approuvé ✓", "Approuvé ✓"),
    "bogus-charset-latin1-bytes": ("Approuvé, très bien", "Approuvé, très bien"),
    "utf8-bom-base64": ("Approved", "Approved"),
    "nbsp-lines-and-words": ("Approved with changes", "Approved with changes"),
    "zero-width-characters": ("Approved!", "Approved!"),
    "leading-blank-lines": ("approved", "approved"),
    # MIME structure
    "multipart-mixed-with-pdf-attachment": (
        "Approved, signed PDF attached.",
        "Approved, signed PDF attached.",
    ),
    "multipart-related-html-with-inline-image": ("Approved", "Approved"),
    "yahoo-html-yahoo-quoted": ("Approved", "Approved"),
    # phone clients
    "iphone-ios-mail-html-blockquote-cite": ("Approved, thanks!", "Approved, thanks!"),
    "iphone-german-am-um-schrieb": ("Ja, passt. Genehmigt.", "Ja, passt. Genehmigt."),
    "gmail-android-html-gmail-quote": ("Approved", "Approved"),
    "gmail-ios-app-wrapped-attribution": (
        "Needs revision: split travel from hardware please",
        "Needs revision: split travel from hardware please",
    ),
    "outlook-ios-get-outlook-for-ios-html": (
        "Rejected - not this quarter.",
        "Rejected - not this quarter.",
    ),
    "outlook-android-html-only-base64": ("Approved 👍", "Approved 👍"),
    "samsung-email-original-message": ("Approved", "Approved"),
    "samsung-german-urspruengliche-nachricht": (
        "Abgelehnt, bitte Reisekosten getrennt ausweisen.",
        "Abgelehnt, bitte Reisekosten getrennt ausweisen.",
    ),
    # Outlook on the web in other languages
    "outlook-web-german-von-gesendet-html": ("Genehmigt, danke!", "Genehmigt, danke!"),
    "outlook-web-french-de-envoye-html": (
        "Refusé : le budget déplacements est trop élevé.",
        "Refusé : le budget déplacements est trop élevé.",
    ),
    "outlook-web-spanish-de-enviado-html": ("Aprobado, gracias.", "Aprobado, gracias."),
    "outlook-web-dutch-van-verzonden-html": (
        "Graag meer detail over de kosten.",
        "Graag meer detail over de kosten.",
    ),
    "outlook-web-portuguese-de-enviado-html": ("Aprovado", "Aprovado"),
    # the reply on the quote header's own line
    "same-line-reply-on-wrote": ("Approved", "Approved"),
    "same-line-reply-dashes-on-wrote": (
        "Rejected, wrong cost centre",
        "Rejected, wrong cost centre",
    ),
    "same-line-reply-le-a-ecrit": ("Approuvé", "Approuvé"),
    # bottom-posted under an embedded quoted email
    "bottom-posted-under-original-message": ("approved", "approved\n\nTom"),
    "bottom-posted-under-forwarded-message": (
        "Needs revision - the hardware line is twice Q3.",
        "Needs revision - the hardware line is twice Q3.\n\nJane",
    ),
    "alpine-bottom-posted-nested-quotes": (
        "Rejected: the offsite is not in this budget.",
        "Rejected: the offsite is not in this budget.",
    ),
    # malformed MIME: the text part declared some other way
    "broken-mime-multipart-without-boundary": (
        "Approved, café budget included.",
        "Approved, café budget included.",
    ),
    "broken-mime-boundary-mismatch": ("Approved", "Approved"),
    "broken-mime-plain-slash-text": ("Rejected", "Rejected"),
    "broken-mime-type-without-semicolon": ("Genehmigt – danke.", "Genehmigt – danke."),
}

# file stem -> (envelope MAIL FROM, expected machine_reason)
MACHINE: dict[str, tuple[str, str | None]] = {
    "exchange-automatic-reply": ("tom.baker@example.org", "auto-submitted"),
    "gmail-vacation-responder": ("jane.doe@gmail.com", "auto-submitted"),
    "postfix-bounce-report": ("", "bounce:null-sender"),
    "hitl-own-confirmation": ("reviews@example.com", "own-mail"),
    "mailing-list-copy": ("finance-team-bounces@lists.example.org", "precedence:list"),
    "outlook-human-with-auto-response-suppress": ("tom.baker@example.org", None),
    "human-with-auto-submitted-no": ("kim@example.net", None),
}


def read(name: str) -> bytes:
    return (CORPUS / f"{name}.eml").read_bytes()


def message(*headers: str, body: str = "Approved\n") -> bytes:
    """A minimal raw message with these header lines."""
    head = "\n".join(("From: Jane Doe <jane.doe@example.org>", *headers, "MIME-Version: 1.0"))
    return f"{head}\n\n{body}".encode()


def elapsed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


# --- the corpus ---------------------------------------------------------------------------


def test_the_corpus_holds_at_least_75_replies_and_each_has_an_expectation() -> None:
    names = {path.stem for path in CORPUS.glob("*.eml")}
    assert names == set(EXPECTED)
    assert len(names) >= 75
    assert {path.stem for path in (CORPUS / "machine").glob("*.eml")} == set(MACHINE)


@pytest.mark.parametrize(
    ("name", "first_line", "text"),
    [pytest.param(name, *expected, id=name) for name, expected in EXPECTED.items()],
)
def test_each_reply_in_the_corpus_yields_what_the_person_wrote(
    name: str, first_line: str, text: str | None
) -> None:
    reply = parse_reply(read(name), envelope_from=PERSON)

    assert reply.first_line == first_line
    if text is not None:
        assert reply.text == text
    assert reply.machine_reason is None


@pytest.mark.parametrize("name", list(EXPECTED))
def test_crlf_line_endings_change_nothing(name: str) -> None:
    raw = read(name)
    crlf = raw.replace(b"\n", b"\r\n")

    assert parse_reply(crlf, envelope_from=PERSON) == parse_reply(raw, envelope_from=PERSON)


def test_a_gmail_reply_exposes_its_threading_headers_without_angle_brackets() -> None:
    reply = parse_reply(read("gmail-alternative-wrapped-attribution"), envelope_from=PERSON)

    assert reply.message_id == "CAF1x9Zk2@mail.gmail.com"
    assert reply.from_address == "jane.doe@gmail.com"
    assert reply.subject == "Re: Approve the Q4 budget?"
    assert reply.in_reply_to == ("hitl.01jc9k2v6d.notification@example.com",)
    assert reply.references == ("hitl.01jc9k2v6d.notification@example.com",)


def test_an_encoded_from_header_yields_the_lowercased_address() -> None:
    reply = parse_reply(read("outlook-desktop-header-block"), envelope_from=PERSON)
    german = parse_reply(read("outlook-german-von-gesendet-latin1"), envelope_from=PERSON)

    assert reply.from_address == "tom.baker@example.org"
    assert german.from_address == "juergen.weber@example.de"


# --- headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("<a@x.example>", ("a@x.example",), id="single"),
        pytest.param("<a@x.example>,<b@y.example>", ("a@x.example", "b@y.example"), id="commas"),
        pytest.param(
            "<a@x.example>, <b@y.example>", ("a@x.example", "b@y.example"), id="comma-space"
        ),
        pytest.param("<a@x.example> <b@y.example>", ("a@x.example", "b@y.example"), id="spaces"),
        pytest.param("<a@x.example><b@y.example>", ("a@x.example", "b@y.example"), id="adjacent"),
        pytest.param(
            "<a@x.example>\n <b@y.example>\n\t<c@z.example>",
            ("a@x.example", "b@y.example", "c@z.example"),
            id="folded",
        ),
        pytest.param("a@x.example b@y.example", ("a@x.example", "b@y.example"), id="no-brackets"),
        pytest.param("<a@x.example> <a@x.example>", ("a@x.example",), id="duplicates"),
        pytest.param("", (), id="empty"),
    ],
)
def test_references_are_read_in_every_form_clients_write(
    header: str, expected: tuple[str, ...]
) -> None:
    reply = parse_reply(message(f"References: {header}"), envelope_from=PERSON)

    assert reply.references == expected


def test_in_reply_to_keeps_every_id_and_drops_a_trailing_comment() -> None:
    raw = message("In-Reply-To: <a@x.example> <b@y.example> (Reviews's message of Monday)")

    assert parse_reply(raw, envelope_from=PERSON).in_reply_to == ("a@x.example", "b@y.example")


def test_a_folded_encoded_subject_is_decoded_onto_one_line() -> None:
    raw = message("Subject: =?utf-8?q?Re=3A_R=C3=A9vision?=\n =?utf-8?q?_du_budget?=")

    assert parse_reply(raw, envelope_from=PERSON).subject == "Re: Révision du budget"


def test_raw_utf8_headers_from_an_smtputf8_client_are_read_as_text() -> None:
    raw = "From: José Núñez <José@Example.org>\nSubject: Re: Révision\n\nOui\n".encode()

    reply = parse_reply(raw, envelope_from=PERSON)

    assert (reply.from_address, reply.subject, reply.text) == (
        "josé@example.org",
        "Re: Révision",
        "Oui",
    )


def test_a_display_name_with_a_comma_does_not_hide_the_address() -> None:
    raw = b"From: =?utf-8?q?Doe=2C_Jane?= <Jane.Doe@Example.ORG>\nSubject: x\n\nok\n"

    assert parse_reply(raw, envelope_from=PERSON).from_address == "jane.doe@example.org"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"Subject: no sender\n\nok\n", id="no-from"),
        pytest.param(b"From: undisclosed-recipients:;\n\nok\n", id="group"),
        pytest.param(b"From: Jane\n\nok\n", id="no-address"),
    ],
)
def test_a_missing_or_unusable_from_gives_no_address(raw: bytes) -> None:
    reply = parse_reply(raw, envelope_from=PERSON)

    assert reply.from_address is None
    assert reply.message_id is None


# --- machine mail -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "envelope_from", "reason"),
    [pytest.param(name, *expected, id=name) for name, expected in MACHINE.items()],
)
def test_machine_mail_in_the_corpus_is_recognised(
    name: str, envelope_from: str, reason: str | None
) -> None:
    raw = (CORPUS / "machine" / f"{name}.eml").read_bytes()

    reply = parse_reply(raw, envelope_from=envelope_from, own_addresses=["reviews@example.com"])

    assert reply.machine_reason == reason


def test_an_outlook_reply_carrying_auto_response_suppress_is_human() -> None:
    headers = {"From": "Tom <tom@example.org>", "X-Auto-Response-Suppress": "All"}

    assert machine_reason(headers, envelope_from="tom@example.org") is None


def test_auto_submitted_no_is_human() -> None:
    headers = {"From": "Kim <kim@example.net>", "Auto-Submitted": "No"}

    assert machine_reason(headers, envelope_from="kim@example.net") is None


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({"Auto-Submitted": "auto-replied"}, "auto-submitted", id="auto-replied"),
        pytest.param({"auto-submitted": "Auto-Generated"}, "auto-submitted", id="auto-generated"),
        pytest.param(
            {"Auto-Submitted": "auto-notified; owner-email=x@example.org"},
            "auto-submitted",
            id="auto-notified-with-parameter",
        ),
        pytest.param({"X-Autoreply": "yes"}, "x-autoreply", id="x-autoreply"),
        pytest.param({"X-Autorespond": "vacation"}, "x-autorespond", id="x-autorespond"),
        pytest.param({"X-AutoResponder": "1"}, "x-autoresponder", id="x-autoresponder"),
        pytest.param({"Precedence": "bulk"}, "precedence:bulk", id="precedence-bulk"),
        pytest.param({"Precedence": "Junk"}, "precedence:junk", id="precedence-junk"),
        pytest.param({"Precedence": "list"}, "precedence:list", id="precedence-list"),
        pytest.param({"Precedence": "auto_reply"}, "precedence:auto_reply", id="precedence-auto"),
        pytest.param({"List-Id": "<team.lists.example.org>"}, "list-id", id="list-id"),
        pytest.param(
            {"List-Unsubscribe": "<mailto:leave@example.org>"},
            "list-unsubscribe",
            id="list-unsubscribe",
        ),
        pytest.param(
            {"Content-Type": "multipart/report; report-type=delivery-status"},
            "bounce:report",
            id="multipart-report",
        ),
        pytest.param(
            {"From": "MAILER-DAEMON@mx.example.org (Mail Delivery System)"},
            "bounce:mailer-daemon",
            id="from-mailer-daemon",
        ),
        pytest.param(
            {"From": "Postmaster <postmaster@example.org>"},
            "bounce:mailer-daemon",
            id="from-postmaster",
        ),
        pytest.param({"X-HITL-Event": "notification"}, "own-mail", id="x-hitl-event"),
        pytest.param({"Precedence": "first-class"}, None, id="precedence-other"),
        pytest.param({"X-Autoreply": "no"}, None, id="x-autoreply-no"),
    ],
)
def test_each_machine_header_gives_its_reason(headers: dict[str, str], reason: str | None) -> None:
    headers = {"From": "Jane <jane@example.org>", "Subject": "Re: Approve?", **headers}

    assert machine_reason(headers, envelope_from="jane@example.org") == reason


@pytest.mark.parametrize("envelope_from", ["", None, "<>", " "])
def test_a_null_reverse_path_is_a_bounce(envelope_from: str | None) -> None:
    headers = {"From": "Jane <jane@example.org>", "Subject": "Re: Approve?"}

    assert machine_reason(headers, envelope_from=envelope_from) == "bounce:null-sender"


def test_an_envelope_from_mailer_daemon_is_a_bounce() -> None:
    headers = {"From": "Jane <jane@example.org>", "Subject": "Re: Approve?"}

    reason = machine_reason(headers, envelope_from="MAILER-DAEMON@mx.example.org")

    assert reason == "bounce:mailer-daemon"


@pytest.mark.parametrize(
    "subject",
    [
        "Automatic reply: Approve the Q4 budget?",
        "Auto: Approve the Q4 budget?",
        "AutoReply: Approve the Q4 budget?",
        "Auto-Reply: Approve the Q4 budget?",
        "Out of Office: Approve the Q4 budget?",
        "Out of the office until Monday",
        "Abwesenheitsnotiz: Approve the Q4 budget?",
        "Automatische Antwort: Approve the Q4 budget?",
        "Réponse automatique : Approve the Q4 budget?",
        "Re\u0301ponse automatique : decomposed accent",
        "Absence du bureau",
        "Respuesta automática: Approve the Q4 budget?",
        "Risposta automatica: Approve the Q4 budget?",
        "Automatisch antwoord: Approve the Q4 budget?",
        "Fuera de la oficina",
        "Resposta automática: Approve the Q4 budget?",
    ],
)
def test_an_auto_reply_subject_marks_machine_mail(subject: str) -> None:
    headers = {"From": "Jane <jane@example.org>", "Subject": subject}

    assert machine_reason(headers, envelope_from="jane@example.org") == "auto-reply-subject"


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Approve the absence request?",
        "RE: Out of office policy for Q4",
        "AW: Automatische Antwort einrichten?",
        "Re: Automation budget",
        "Autumn offsite",
    ],
)
def test_a_person_replying_about_absences_is_not_an_auto_reply(subject: str) -> None:
    headers = {"From": "Jane <jane@example.org>", "Subject": subject}

    assert machine_reason(headers, envelope_from="jane@example.org") is None


@pytest.mark.parametrize(
    ("from_header", "own_addresses", "own_domains"),
    [
        pytest.param("Reviews <Reviews@Example.com>", ["reviews@example.com"], [], id="address"),
        pytest.param("Bot <bot@hitl.example.com>", [], ["HITL.example.com"], id="domain"),
        pytest.param("Bot <bot@hitl.example.com>", [], ["@hitl.example.com"], id="at-domain"),
    ],
)
def test_mail_from_ourselves_is_own_mail(
    from_header: str, own_addresses: list[str], own_domains: list[str]
) -> None:
    raw = message(body="Approved\n").replace(
        b"From: Jane Doe <jane.doe@example.org>", f"From: {from_header}".encode()
    )

    reply = parse_reply(
        raw,
        envelope_from="reviews@example.com",
        own_addresses=own_addresses,
        own_domains=own_domains,
    )

    assert reply.machine_reason == "own-mail"


def test_a_person_on_another_domain_is_not_own_mail() -> None:
    reply = parse_reply(
        message(),
        envelope_from=PERSON,
        own_addresses=["reviews@example.com"],
        own_domains=["example.com"],
    )

    assert reply.machine_reason is None


# --- new text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "after"),
    [
        pytest.param("-- ", "Jane", id="dash-dash-space"),
        pytest.param("--", "Jane", id="dash-dash"),
        pytest.param("Sent from my iPhone", "", id="iphone"),
        pytest.param("Sent from my Android phone", "", id="android"),
        pytest.param("Sent from my mobile", "", id="mobile"),
        pytest.param("Get Outlook for Android", "", id="outlook-android"),
        pytest.param("Envoyé de mon iPhone", "", id="french"),
        pytest.param("Von meinem iPhone gesendet", "", id="german"),
        pytest.param("Enviado desde mi iPhone", "", id="spanish"),
        pytest.param("Inviato da iPhone", "", id="italian"),
        pytest.param("Verzonden vanaf mijn iPhone", "", id="dutch"),
        pytest.param("Enviado do meu iPhone", "", id="portuguese"),
        pytest.param("-----Original Message-----", "From: Reviews", id="original-message"),
        pytest.param("-----Ursprüngliche Nachricht-----", "Von: Reviews", id="urspruenglich"),
        pytest.param("-------- Message d'origine --------", "De : Reviews", id="origine"),
        pytest.param("Begin forwarded message:", "From: Reviews", id="forwarded"),
    ],
)
def test_a_signature_or_history_marker_ends_the_new_text(marker: str, after: str) -> None:
    body = f"Approved\nwith thanks\n\n{marker}\n{after}\nPlease review\n"

    assert extract_new_text(body) == "Approved\nwith thanks"


@pytest.mark.parametrize(
    "attribution",
    [
        "On Mon, 3 Nov 2026 at 10:02, Reviews <reviews@example.com> wrote:",
        "On Mon, 3 Nov 2026 at 10:02, Reviews <reviews@example.com>\nwrote:",
        "On 3 Nov 2026, at 10:02, Reviews <reviews@example.com> wrote:",
        "On 11/3/26 10:02, Reviews wrote:",
        "Le lun. 3 nov. 2026 à 10:02, Reviews <reviews@example.com> a écrit :",
        "Am Mo., 3. Nov. 2026 um 10:02 Uhr schrieb Reviews <reviews@example.com>:",
        "El lun, 3 nov 2026 a las 10:02, Reviews (<reviews@example.com>) escribió:",
        "Il giorno lun 3 nov 2026 alle ore 10:02 Reviews <reviews@example.com> ha scritto:",
        "Op ma 3 nov. 2026 om 10:02 schreef Reviews <reviews@example.com>:",
        "Em seg., 3 de nov. de 2026 às 10:02, Reviews <reviews@example.com> escreveu:",
    ],
)
def test_a_dated_attribution_ends_the_new_text_even_without_quote_marks(attribution: str) -> None:
    body = f"Approved\n\n{attribution}\n\nPlease review the Q4 budget below.\n"

    assert extract_new_text(body) == "Approved"


def test_a_bare_attribution_above_a_quote_is_skipped_when_bottom_posting() -> None:
    body = "Reviews wrote:\n> Approve?\n\nYes, approved.\n"

    assert extract_new_text(body) == "Yes, approved."


def test_a_sentence_ending_in_wrote_is_kept_when_no_quote_follows() -> None:
    body = "As you wrote:\nthe costs are fine.\n"

    assert extract_new_text(body) == "As you wrote:\nthe costs are fine."


def test_a_line_above_a_bare_attribution_is_kept() -> None:
    body = "We need detail\nas Bob wrote:\n> the costs\n"

    assert extract_new_text(body) == "We need detail"


def test_a_from_line_in_the_answer_is_not_an_outlook_header_block() -> None:
    body = "From: the finance side, approved.\nTo be booked next week.\n"

    assert extract_new_text(body) == body.strip()


@pytest.mark.parametrize(
    ("body", "text"),
    [
        pytest.param(
            "reply On Wed, Apr 4, 2012 at 3:59 PM, bob@example.com wrote:\n> Hi",
            "reply",
            id="on-wrote",
        ),
        pytest.param(
            "reply--- On Wed, Apr 4, 2012 at 3:59 PM, me@domain.com wrote:\n> Hi",
            "reply",
            id="dashes",
        ),
        pytest.param(
            "reply\nbla-bla - bla--- On Wed, Apr 4, 2012 at 3:59 PM, me@domain.com wrote:\n> Hi",
            "reply\nbla-bla - bla",
            id="second-line",
        ),
        pytest.param(
            "Approved Am 23.11.2026 um 10:02 schrieb Reviews <r@example.com>:\n\nBitte prüfen",
            "Approved",
            id="german-unquoted-history",
        ),
        pytest.param(
            "Approved On Mon, 23 Nov 2026 at 10:02, Reviews\n<r@example.com> wrote:\n\nApprove?",
            "Approved",
            id="wrapped",
        ),
    ],
)
def test_a_reply_on_the_quote_headers_own_line_is_the_text_before_the_header(
    body: str, text: str
) -> None:
    assert extract_new_text(body) == text


def test_a_header_line_with_an_opening_word_inside_it_is_still_one_header() -> None:
    body = "Approved\n\nOn 4 Apr 2012, Jon On <jon@example.com> wrote:\n> Hi\n"

    assert extract_new_text(body) == "Approved"


@pytest.mark.parametrize(
    "marker",
    [
        "-----Original Message-----",
        "---------- Forwarded message ---------\nFrom: Reviews <r@example.com>\nDate: Mon\n"
        "Subject: Approve?\nTo: <jane@example.org>\n",
        "From: Reviews <r@example.com>\nSent: Monday\nTo: Jane\nSubject: Approve?\n",
    ],
    ids=["original-message", "forwarded", "header-block"],
)
def test_a_reply_below_an_embedded_quoted_email_is_read(marker: str) -> None:
    body = f"{marker}\n> Approve the budget?\n> Reply with one word\n\nApproved\n"

    assert extract_new_text(body) == "Approved"


def test_an_embedded_email_not_marked_with_quotes_is_all_history() -> None:
    body = "Approved\n\n-----Original Message-----\nFrom: R\nSent: Mon\nTo: J\n\nApprove?\n"

    assert extract_new_text(body) == "Approved"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("plain/text; charset=utf-8", "Approved\n", id="halves-swapped"),
        pytest.param(
            "multipart/alternative",
            "--b1\nContent-Type: text/plain\n\nApproved\n--b1--\n",
            id="no-boundary",
        ),
        pytest.param(
            'multipart/alternative; boundary="b2"',
            "--b1\nContent-Type: text/plain\n\nApproved\n--b1--\n",
            id="boundary-not-used",
        ),
        pytest.param('multipart/mixed; boundary="b1"', "Approved\n", id="no-delimiter"),
        pytest.param(
            'multipart/mixed; boundary="b1"',
            "--b1\nContent-Type: text/plain charset=utf-8\n\nApproved\n--b1--\n",
            id="no-semicolon",
        ),
    ],
)
def test_a_text_part_declared_the_wrong_way_is_still_read(content_type: str, body: str) -> None:
    raw = message(f"Content-Type: {content_type}", body=body)

    assert parse_reply(raw, envelope_from=PERSON).first_line == "Approved"


def test_quoted_lines_are_dropped_wherever_they_are() -> None:
    body = "> Approve?\nYes\n  > Travel too?\nNo\n>> older\n"

    assert extract_new_text(body) == "Yes\nNo"


def test_normalisation_strips_line_ends_and_surrounding_blank_lines() -> None:
    body = "\r\n\u00a0\r\n\ufeffApproved   \r\n\r\n\r\nwith  care\t\r\n\r\n"

    assert extract_new_text(body) == "Approved\n\n\nwith  care"


def test_only_the_first_lines_of_a_long_body_are_read() -> None:
    body = "".join(f"line {n}\n" for n in range(MAX_TEXT_LINES + 1000))

    lines = extract_new_text(body).split("\n")

    assert len(lines) == MAX_TEXT_LINES
    assert lines[-1] == f"line {MAX_TEXT_LINES - 1}"


# --- HTML ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("html", "text"),
    [
        pytest.param(
            '<div>Yes</div><div class="gmail_quote"><div>On x wrote:</div>'
            "<blockquote>old</blockquote></div>",
            "Yes",
            id="gmail-quote",
        ),
        pytest.param(
            '<p>Yes</p><div id="divRplyFwdMsg"><b>From:</b> x</div><p>old</p><div>older</div>',
            "Yes",
            id="outlook-everything-after-divrplyfwdmsg",
        ),
        pytest.param(
            'Yes<blockquote type="cite">old<blockquote type="cite">older</blockquote>'
            "still old</blockquote>",
            "Yes",
            id="apple-nested-cite",
        ),
        pytest.param(
            "<p>Yes</p><blockquote>old</blockquote><p>after</p>", "Yes\n\nafter", id="generic"
        ),
        pytest.param(
            "<html><head><title>t</title><style>p { color: red }</style>"
            "<script>var x = '<p>no</p>';</script></head><body><p>Yes</p></body></html>",
            "Yes",
            id="head-style-script",
        ),
        pytest.param(
            "Yes&nbsp;&amp;&#32;no<br>second&lt;line", "Yes & no\nsecond<line", id="entities"
        ),
        pytest.param("<p>a  b\n  c</p><pre>x  y\n z</pre>", "a b c\n\nx  y\nz", id="whitespace"),
        pytest.param(
            "<!-- <p>hidden</p> --><p>Yes</p><!--[if mso]>x<![endif]-->", "Yes", id="comments"
        ),
        pytest.param("a < b and c<d", "a < b and c", id="stray-angle-brackets"),
        pytest.param("", "", id="empty"),
    ],
)
def test_html_becomes_text_without_its_quote_containers(html: str, text: str) -> None:
    assert html_to_text(html) == text


# --- robustness and time ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="garbage"),
        pytest.param(b"\x00\xff\xfe" * 100, id="binary"),
        pytest.param(b"From: a@b.example\n", id="headers-only"),
        pytest.param(
            b'Content-Type: multipart/alternative; boundary="b"\n\n--b\nContent-Type: text/pl',
            id="truncated-mime",
        ),
        pytest.param(
            b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\nQXBwcm92ZW=!!*\n",
            id="broken-base64",
        ),
        pytest.param(
            b'Content-Type: text/plain; charset="utf-8\n'
            b"Content-Transfer-Encoding: quoted-print\n\n=ZZ",
            id="broken-parameters",
        ),
        pytest.param(b"Content-Type: multipart/mixed\n\nno boundary\n", id="multipart-no-boundary"),
        pytest.param(
            b"".join(
                b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i)
                for i in range(3000)
            ),
            id="deeply-nested-multipart",
        ),
        pytest.param(
            b"From: \xff\xfe <\xc3@\xc3>\nSubject: \xe9t\xe9\n\n\xe9\n", id="8bit-headers"
        ),
        pytest.param(b"Subject: =?utf-8?b?!!!?= =?x-bogus?q?a?=\n\nok\n", id="bad-encoded-words"),
    ],
)
def test_malformed_input_never_raises(raw: bytes) -> None:
    reply = parse_reply(raw, envelope_from=PERSON)

    assert isinstance(reply, ParsedReply)
    assert isinstance(reply.text, str)


def test_nothing_readable_gives_an_empty_text() -> None:
    reply = parse_reply(b"", envelope_from=PERSON)

    assert (reply.text, reply.first_line, reply.subject) == ("", "", "")


def test_a_broken_base64_body_keeps_what_could_be_decoded() -> None:
    body = base64.b64encode(b"Approved\n").decode() + "!!\n"
    raw = f"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n{body}".encode()

    assert parse_reply(raw, envelope_from=PERSON).first_line == "Approved"


NESTED_BLOCKQUOTES = "<blockquote>" * 50_000 + "x" + "</blockquote>" * 50_000


@pytest.mark.parametrize(
    "work",
    [
        pytest.param(lambda: extract_new_text("line\n" * 10_000), id="10000-lines"),
        pytest.param(lambda: extract_new_text("a" * 1_000_000), id="1MB-single-line"),
        pytest.param(lambda: extract_new_text("On " + "a" * 50_000), id="on-without-wrote"),
        pytest.param(
            lambda: extract_new_text(("On 3 " + "a" * 390 + ":\n") * 5_000), id="on-lines"
        ),
        pytest.param(lambda: extract_new_text(">" * 50_000), id="50000-quote-marks"),
        pytest.param(lambda: extract_new_text("From: x\n" * 50_000), id="from-lines"),
        pytest.param(lambda: extract_new_text(" " * 1_000_000 + "x"), id="1MB-of-spaces"),
        pytest.param(lambda: html_to_text(NESTED_BLOCKQUOTES), id="nested-blockquotes"),
        pytest.param(lambda: html_to_text("<div>" * 100_000), id="nested-divs"),
        pytest.param(lambda: html_to_text("<a " * 100_000), id="unclosed-tags"),
        pytest.param(lambda: html_to_text("< " * 200_000), id="stray-angle-brackets"),
        pytest.param(lambda: html_to_text("</" * 200_000), id="stray-end-tags"),
        pytest.param(lambda: html_to_text("<!--" * 100_000), id="unclosed-comments"),
        pytest.param(lambda: html_to_text("<script>" * 100_000), id="unclosed-scripts"),
        pytest.param(lambda: html_to_text("&#" * 200_000), id="broken-entities"),
        pytest.param(lambda: html_to_text('<p id="' + "x" * 1_000_000), id="unclosed-attribute"),
        pytest.param(
            lambda: parse_reply(b"Subject: x\n\n" + b"line\n" * 10_000, envelope_from=PERSON),
            id="message-10000-lines",
        ),
        pytest.param(
            lambda: parse_reply(b"Subject: x\n\n" + b"a" * 1_000_000, envelope_from=PERSON),
            id="message-1MB-line",
        ),
        pytest.param(
            lambda: parse_reply(
                b"Content-Type: text/html\n\n" + NESTED_BLOCKQUOTES.encode(), envelope_from=PERSON
            ),
            id="message-nested-blockquotes",
        ),
        pytest.param(
            lambda: parse_reply(
                b"References: " + b"<a@b> " * 100_000 + b"\n\nx", envelope_from=PERSON
            ),
            id="message-huge-references",
        ),
        pytest.param(
            lambda: parse_reply(b"Subject: " + b"Auto " * 200_000 + b"\n\nx", envelope_from=PERSON),
            id="message-huge-subject",
        ),
    ],
)
def test_crafted_input_parses_in_well_under_a_second(work: Callable[[], object]) -> None:
    # A guard against catastrophic backtracking and quadratic scans, not a benchmark.
    assert elapsed(work) < 2.0
