"""The emails hitl-mail writes, read back the way a mail client would read them."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from html.parser import HTMLParser
from typing import Any, cast, get_args

import pydantic
import pytest

from hitl_mail.compose import (
    ErrorKind,
    Reassignment,
    RequestContent,
    Sender,
    auto_response,
    confirmation,
    default_label,
    error_mail,
    make_message_id,
    message_bytes,
    notification,
    reminder,
    sender_domain,
)

SENDER = Sender("Reviews <reviews@mail.example.com>")
TO = "Ann Example <ann@example.org>"
TOKEN = "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpjqwe3dd"  # tokens.py shape: 48 base32
REPLY_TO = f"reply+{TOKEN}@reply.example.com"
# Longer than the ids the daemon writes, so that a header folded at 78 columns would show.
THREAD_ID = f"<hitl.{'0123456789abcdef' * 4}@mail.example.com>"
DEADLINE = datetime(2030, 3, 4, 15, 30, tzinfo=UTC)
EXPIRES = datetime(2030, 3, 11, 9, 0, tzinfo=UTC)
SUBJECT = "Post: review draft — Approve this draft?"
MARKDOWN = """# Draft post

The launch is **on track**.

| metric | value |
|--------|------:|
| users  | 1200  |

```python
print("<hi>")
```
"""


def make_content(**changes: Any) -> RequestContent:
    content = RequestContent(
        request_id="aaaabbbbccccdddd",
        flow_class="blog.flows.PostFlow",
        method_name="review_draft",
        message="Approve this draft?",
        method_output=MARKDOWN,
        emit=("approved", "rejected", "needs_revision"),
        default_outcome="needs_revision",
        deadline=None,
    )
    return dataclasses.replace(content, **changes)


def build_notification(content: RequestContent | None = None, **kwargs: Any) -> EmailMessage:
    message_id = make_message_id(sender_domain(SENDER.from_address))
    return notification(
        content or make_content(),
        sender=SENDER,
        to=TO,
        reply_to=REPLY_TO,
        message_id=message_id,
        **kwargs,
    )


def send_notification(content: RequestContent | None = None, **kwargs: Any) -> EmailMessage:
    return received(build_notification(content, **kwargs))


def received(message: EmailMessage) -> EmailMessage:
    """The message as a recipient's client parses it from the wire."""
    return email.message_from_bytes(message.as_bytes(), policy=email.policy.default)


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return cast(str, part.get_content())


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return cast(str, part.get_content()).replace("\r\n", "\n")  # as sent: CRLF


class ElementCollector(HTMLParser):
    """Every start tag and its attributes, as a browser would see them."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def every_kind() -> dict[str, Callable[[], EmailMessage]]:
    content = make_content(deadline=DEADLINE, auto_outcome="approved")
    threaded: dict[str, Any] = {"sender": SENDER, "to": TO, "thread_id": THREAD_ID}
    kinds: dict[str, Callable[[], EmailMessage]] = {
        "notification": lambda: build_notification(content),
        "reminder": lambda: reminder(content, reply_to=REPLY_TO, **threaded),
        "confirmation": lambda: confirmation(content, outcome="ok", feedback="ok", **threaded),
        "auto-response": lambda: auto_response(content, outcome="approved", **threaded),
    }
    for kind in get_args(ErrorKind):
        kinds[f"error:{kind}"] = partial(error_mail, kind, content, reply_to=REPLY_TO, **threaded)
    return kinds


KINDS = every_kind()


@pytest.mark.parametrize("kind", KINDS)
def test_every_email_carries_the_headers_of_an_automated_hitl_message(kind: str) -> None:
    message = received(KINDS[kind]())
    assert message["From"] == SENDER.from_address
    assert message["To"] == TO
    assert message["Date"].datetime.tzinfo is not None
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["X-Auto-Response-Suppress"] == "All"
    assert message["X-HITL-Event"] == kind.partition(":")[0]
    assert message["X-HITL-Request-Id"] == "aaaabbbbccccdddd"
    message_id = message["Message-ID"]
    assert message_id.startswith("<")
    assert message_id.endswith(">")
    assert message_id.rstrip(">").rpartition("@")[2] == "mail.example.com"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "notification"])
def test_every_follow_up_threads_under_the_notification_with_its_own_message_id(
    kind: str,
) -> None:
    message = received(KINDS[kind]())
    assert message["In-Reply-To"] == THREAD_ID
    assert message["References"] == THREAD_ID
    assert message["Message-ID"] != THREAD_ID
    assert message["Subject"].removeprefix("Reminder: ").removeprefix("Re: ") == SUBJECT


@pytest.mark.parametrize("kind", KINDS)
def test_every_email_is_seven_bit_clean_with_folded_headers(kind: str) -> None:
    raw = KINDS[kind]().as_bytes()
    assert raw.isascii()
    head, _, body = raw.partition(b"\r\n\r\n")
    ids = (b"Message-ID:", b"In-Reply-To:", b"References:")  # a msg-id cannot be folded
    assert all(len(line) <= 78 for line in head.split(b"\r\n") if not line.startswith(ids))
    assert all(len(line) <= 78 for line in body.split(b"\r\n"))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "notification"])
def test_the_thread_id_is_written_as_is_for_threading_clients(kind: str) -> None:
    raw = KINDS[kind]().as_bytes()
    assert f"\r\nIn-Reply-To: {THREAD_ID}\r\n".encode() in raw
    assert f"\r\nReferences: {THREAD_ID}\r\n".encode() in raw


def test_the_notification_is_text_and_html_alternatives_with_the_token_in_reply_to() -> None:
    message = send_notification()
    assert message.get_content_type() == "multipart/alternative"
    types = [part.get_content_type() for part in message.iter_parts()]
    assert types == ["text/plain", "text/html"]
    assert message["Reply-To"].addresses[0].addr_spec == REPLY_TO
    assert message["Subject"] == SUBJECT
    assert TOKEN not in message["Message-ID"].lower()


def test_the_method_output_markdown_becomes_html_with_a_table_bold_and_code() -> None:
    page = html_of(send_notification())
    assert "<table" in page
    assert "<strong" in page
    assert "on track</strong>" in page
    assert "<pre" in page
    assert "monospace" in page
    assert "&lt;hi&gt;" in page
    assert 'align="right"' in page


def test_the_html_is_one_600px_column_styled_inline_for_mail_clients() -> None:
    page = html_of(send_notification())
    assert 'name="viewport"' in page
    assert "max-width:600px" in page
    for tag, attributes in ElementCollector(page).elements:
        if tag in {"h1", "p", "table", "th", "td", "pre"}:
            assert attributes.get("style"), f"<{tag}> has no inline style"


def test_the_text_part_keeps_the_markdown_source_not_html() -> None:
    text = text_of(send_notification())
    assert "The launch is **on track**." in text
    assert "| users  | 1200  |" in text
    assert "<table" not in text


def test_raw_html_in_the_method_output_is_shown_as_text_never_run() -> None:
    hostile = (
        "Hi <script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n"
        "[click](javascript:alert(3)) <a href='javascript:alert(4)'>x</a>"
    )
    page = html_of(send_notification(make_content(method_output=hostile)))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for tag, attributes in ElementCollector(page).elements:
        assert tag not in {"script", "img", "iframe"}
        assert not any(name.startswith("on") for name in attributes)
        assert not any("javascript:" in (value or "").lower() for value in attributes.values())


def test_every_interpolated_string_is_escaped_in_the_html() -> None:
    content = make_content(
        message="<b>Ship</b> it?",
        flow_class="x.<i>Flow</i>",
        emit=("<u>yes</u>", "no"),
        method_output={"<key>": "<value>"},
    )
    page = html_of(send_notification(content))
    tags = {tag for tag, _ in ElementCollector(page).elements}
    assert not tags & {"b", "i", "u"}
    assert "&lt;b&gt;Ship&lt;/b&gt; it?" in page
    assert "&lt;key&gt;" in page
    assert "&lt;value&gt;" in page


def test_a_dict_output_is_a_table_of_keys_and_values_with_nested_values_as_json() -> None:
    output = {"title": "Launch", "score": 0.9, "tags": ["a", "b"]}
    message = send_notification(make_content(method_output=output))
    page = html_of(message)
    assert '<th scope="row"' in page
    assert ">title</th>" in page
    assert ">Launch</td>" in page
    assert "<pre" in page
    assert "&quot;a&quot;" in page
    text = text_of(message)
    assert "title: Launch" in text
    assert "score: 0.9" in text
    assert 'tags:\n  [\n    "a",' in text


def test_a_pydantic_model_output_is_shown_like_its_dumped_dict() -> None:
    class Verdict(pydantic.BaseModel):
        label: str
        confidence: float

    message = send_notification(make_content(method_output=Verdict(label="ok", confidence=1)))
    assert ">label</th>" in html_of(message)
    assert "confidence: 1.0" in text_of(message)


def test_a_list_output_is_a_bulleted_list() -> None:
    message = send_notification(make_content(method_output=["first", {"n": 2}]))
    page = html_of(message)
    assert "<ul" in page
    assert ">first</li>" in page
    assert '- first\n- {\n    "n": 2\n  }' in text_of(message)


@pytest.mark.parametrize("output", [None, "", {}, []])
def test_an_empty_output_says_so(output: Any) -> None:
    message = send_notification(make_content(method_output=output))
    assert "(no output)" in text_of(message)
    assert "(no output)" in html_of(message)


def test_a_list_right_after_prose_renders_as_a_list_as_llms_expect() -> None:
    page = html_of(send_notification(make_content(method_output="Changes:\n- one\n- two")))
    assert "<ul" in page
    assert ">one</li>" in page


def test_the_notification_lists_the_outcomes_and_what_an_empty_reply_means() -> None:
    message = send_notification()
    text = " ".join(text_of(message).split())
    assert "Reply with one of: approved, rejected, needs_revision" in text
    assert "Reply with one word, or one line saying what to change." in text
    assert "An empty reply means needs_revision." in text
    assert "<strong>needs_revision</strong>" in html_of(message)


def test_a_request_without_outcomes_asks_for_feedback() -> None:
    text = text_of(send_notification(make_content(emit=None, default_outcome=None)))
    assert "Reply with your feedback in one line." in text
    assert "Reply with one of" not in text
    assert "empty reply" not in text


def test_the_deadline_and_what_happens_then_are_shown() -> None:
    content = make_content(deadline=DEADLINE, auto_outcome="rejected")
    text = " ".join(text_of(send_notification(content)).split())
    assert "Please answer by Monday, March 4, 2030, 3:30 PM UTC (in " in text
    assert "If there is no answer by then, rejected is applied automatically." in text


def test_no_deadline_means_no_deadline_sentence() -> None:
    assert "Please answer by" not in text_of(send_notification())


def test_the_notification_says_only_the_first_line_counts_and_the_link_is_personal() -> None:
    text = " ".join(text_of(send_notification(expires_at=EXPIRES)).split())
    answer, _, footer = text.partition(" -- ")
    assert "Only the first line of your reply is read." in answer
    assert "The reply link works until Monday, March 11, 2030, 9:00 AM UTC." in answer
    assert "sent to ann@example.org; replies from any other address are not recorded" in footer


def test_the_notification_shows_one_date_the_deadline_when_there_is_one() -> None:
    content = make_content(deadline=DEADLINE)
    text = " ".join(text_of(send_notification(content, expires_at=EXPIRES)).split())
    assert "March 4, 2030" in text
    assert "March 11" not in text


def test_the_text_part_is_wrapped_to_a_readable_width() -> None:
    code_line = "call(" + ", ".join(f"arg{i}" for i in range(30)) + ")"
    long_output = "word " * 100 + "\n\n```\n" + "x" * 120 + "\n" + code_line + "\n```"
    text = text_of(send_notification(make_content(method_output=long_output)))
    long_lines = [line for line in text.splitlines() if len(line) > 72]
    assert long_lines == ["x" * 120]  # a word longer than a line is never cut
    assert "call(arg0, arg1," in text
    assert "arg29)" in text
    assert "\n  arg2" in text  # a long code line continues on lines indented two more


def test_the_message_id_uses_the_domain_of_the_from_address() -> None:
    assert sender_domain("Reviews <Reviews@Mail.Example.COM>") == "mail.example.com"
    assert sender_domain("bare@example.net") == "example.net"
    message_id = make_message_id(sender_domain(SENDER.from_address))
    assert message_id.endswith("@mail.example.com>")
    with pytest.raises(ValueError, match="domain"):
        sender_domain("no-domain")


def test_a_message_id_is_opaque_random_and_carries_no_credential() -> None:
    ids = {make_message_id("Mail.Example.com") for _ in range(100)}
    assert len(ids) == 100
    for message_id in ids:
        local, _, domain = message_id.strip("<>").partition("@")
        assert domain == "mail.example.com"
        prefix, _, random = local.partition(".")
        assert prefix == "hitl"
        assert re.fullmatch(r"[0-9a-f]{32}", random)  # 128 bits, nothing else


def test_a_domain_that_cannot_sit_in_a_message_id_is_refused() -> None:
    with pytest.raises(ValueError, match="domain"):
        make_message_id("exa mple.com")


def test_a_thread_id_must_be_one_message_id_and_may_lack_brackets() -> None:
    bare = received(
        confirmation(
            make_content(),
            sender=SENDER,
            to=TO,
            thread_id="n1@x.example",
            outcome=None,
            feedback="",
        )
    )
    assert bare["In-Reply-To"] == "<n1@x.example>"
    with pytest.raises(ValueError, match="one Message-ID"):
        confirmation(
            make_content(), sender=SENDER, to=TO, thread_id="<a@x> <b@y>", outcome=None, feedback=""
        )


def test_a_confirmation_records_the_outcome_in_a_header_and_in_words() -> None:
    message = received(
        confirmation(
            make_content(),
            sender=SENDER,
            to=TO,
            thread_id=THREAD_ID,
            outcome="approved",
            feedback="Looks good, ship it",
        )
    )
    assert message["X-HITL-Outcome"] == "approved"
    text = text_of(message)
    assert "Recorded: approved" in text
    assert "The question was: Approve this draft?" in text
    assert "Your reply “Looks good, ship it” was recorded as approved." in " ".join(text.split())
    assert "The flow continues" in text


def test_a_confirmation_without_an_outcome_has_no_outcome_header() -> None:
    message = received(
        confirmation(
            make_content(emit=None, default_outcome=None),
            sender=SENDER,
            to=TO,
            thread_id=THREAD_ID,
            outcome=None,
            feedback="Tighten the intro",
        )
    )
    assert "X-HITL-Outcome" not in message
    assert "Tighten the intro" in text_of(message)


def test_an_auto_response_names_the_outcome_applied_at_the_deadline() -> None:
    content = make_content(deadline=DEADLINE, auto_outcome="rejected")
    message = received(
        auto_response(content, sender=SENDER, to=TO, thread_id=THREAD_ID, outcome="rejected")
    )
    assert message["X-HITL-Outcome"] == "rejected"
    text = " ".join(text_of(message).split())
    assert "by its deadline, Monday, March 4, 2030, 3:30 PM UTC, so rejected was recorded" in text


def test_a_reminder_repeats_the_request_and_keeps_the_reply_address() -> None:
    message = received(
        reminder(make_content(), sender=SENDER, to=TO, reply_to=REPLY_TO, thread_id=THREAD_ID)
    )
    assert message["Reply-To"].addresses[0].addr_spec == REPLY_TO
    assert message["Subject"] == f"Reminder: {SUBJECT}"
    assert "still waiting" in text_of(message)
    assert "on track</strong>" in html_of(message)


ERROR_WORDS: dict[str, str] = {
    "expired": "The reply link you used has expired, so your reply was not recorded.",
    "already_answered": "already answered with approved, so your reply was not recorded",
    "wrong_sender": "but it was sent to ann@example.org, so nothing was recorded. If that was "
    "you, reply from ann@example.org.",
    "undecided": "could not be matched to one of the answers with certainty",
    "cancelled": "cancelled before your reply arrived, so your reply was not recorded",
    "reassigned": "This review now waits for someone else.",
}


@pytest.mark.parametrize("kind", get_args(ErrorKind))
def test_an_error_mail_names_its_kind_and_explains_plainly(kind: ErrorKind) -> None:
    message = received(
        error_mail(
            kind,
            make_content(),
            sender=SENDER,
            to=TO,
            thread_id=THREAD_ID,
            reply_to=None,
            detail="seen at 10:00",
            answered_outcome="approved",
            answered_feedback="Fine by me",
        )
    )
    assert message["X-HITL-Error"] == kind
    assert "Reply-To" not in message
    text = " ".join(text_of(message).split())
    assert ERROR_WORDS[kind] in text
    assert "Details: seen at 10:00" in text


def test_an_undecided_error_can_be_answered_again_by_reply() -> None:
    message = received(
        error_mail(
            "undecided",
            make_content(),
            sender=SENDER,
            to=TO,
            thread_id=THREAD_ID,
            reply_to=REPLY_TO,
        )
    )
    assert message["Reply-To"].addresses[0].addr_spec == REPLY_TO
    text = text_of(message)
    assert "Reply with one of: approved, rejected, needs_revision" in text
    assert "An empty reply means needs_revision." in text
    assert "Only the first line of your reply is read." in text


def test_line_breaks_in_flow_names_cannot_inject_headers() -> None:
    content = make_content(
        message="Approve?\r\nBcc: victim@example.net",
        method_name="review\nX-Injected: yes",
        request_id="aaaabbbbccccdddd\r\nX-Other: 1",
    )
    built = notification(
        content,
        sender=SENDER,
        to=TO,
        reply_to=REPLY_TO,
        message_id=make_message_id("mail.example.com"),
    )
    head = built.as_bytes().partition(b"\r\n\r\n")[0]
    assert b"\nBcc:" not in head
    assert b"\nX-Injected" not in head
    assert b"\nX-Other" not in head
    message = received(built)
    assert "Bcc" not in message
    assert "X-Injected" not in message
    assert "X-Other" not in message
    assert message["Subject"] == ("Post: review X-Injected: yes — Approve? Bcc: victim@example.net")


def test_a_very_long_message_is_shortened_in_the_subject_only() -> None:
    content = make_content(message="Is this fine? " * 20)
    message = send_notification(content)
    assert len(message["Subject"]) < 160
    assert "…" in message["Subject"]
    assert ("Is this fine? " * 20).strip() in " ".join(text_of(message).split())


def test_non_ascii_text_survives_the_round_trip() -> None:
    content = make_content(
        message="Größe prüfen? ✓",
        method_name="überprüfen",
        method_output="Résumé: **naïve** café 🚀\n\n| Schlüssel | Wert |\n|---|---|\n| ä | ß |",
        emit=("genehmigt", "abgelehnt"),
        default_outcome=None,
    )
    sender = Sender("Prüfstelle <pruef@mail.example.com>")
    message = received(
        notification(
            content,
            sender=sender,
            to="Zoë <zoe@example.org>",
            reply_to=REPLY_TO,
            message_id=make_message_id(sender_domain(sender.from_address)),
        )
    )
    assert message["Subject"] == "Post: überprüfen — Größe prüfen? ✓"
    assert message["From"].addresses[0].display_name == "Prüfstelle"
    assert message["To"].addresses[0].display_name == "Zoë"
    assert "Résumé: **naïve** café 🚀" in text_of(message)
    page = html_of(message)
    assert "<strong" in page
    assert "naïve</strong>" in page
    assert "🚀" in page
    assert "Schlüssel" in page


@pytest.mark.parametrize("kind", KINDS)
def test_the_fast_writer_gives_the_stdlib_generators_bytes(kind: str) -> None:
    built = KINDS[kind]()
    assert message_bytes(built) == built.as_bytes()


def test_the_fast_writer_folds_long_and_non_ascii_headers_as_the_stdlib_does() -> None:
    long_ascii = make_content(message="Approve the quarterly budget draft " * 4)
    long_utf8 = make_content(message="Überprüfung der Entwürfe für das nächste Quartal " * 3)
    for content in (long_ascii, long_utf8):
        built = confirmation(
            content, sender=SENDER, to=TO, thread_id=THREAD_ID, outcome="ok", feedback="ok"
        )
        assert b"\r\n " in built.as_bytes().partition(b"\r\n\r\n")[0]  # a folded header
        assert message_bytes(built) == built.as_bytes()


def test_the_fast_writer_leaves_other_shapes_to_the_stdlib() -> None:
    single = EmailMessage(policy=email.policy.SMTP)
    single["Subject"] = "Grüße " * 30
    single.set_content("one part\nonly\n")
    with_preamble = build_notification()
    with_preamble.preamble = "This is a multi-part message in MIME format."
    for message in (single, with_preamble):
        assert message_bytes(message) == message.as_bytes()


# --- what the responder reads first ---------------------------------------------------

UNBREAKABLE = re.compile(r"\s*(?:[-*>]\s+)?\S+")  # one token (a URL, an address), perhaps indented
HOW_TO_ANSWER = {
    "notification": "Reply with one of: approved, rejected, needs_revision",
    "reminder": "Reply with one of: approved, rejected, needs_revision",
    "error:undecided": "Reply with one of: approved, rejected, needs_revision",
    "error:wrong_sender": "reply from ann@example.org",
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_text_part_says_how_to_answer_above_the_signature_within_78_columns(
    kind: str,
) -> None:
    wide = MARKDOWN + "\n" + "| " + " | ".join(f"column {i}" for i in range(7)) + " |\n"
    content = make_content(deadline=DEADLINE, auto_outcome="rejected", method_output=wide)
    built = {
        "notification": lambda: build_notification(content),
        "reminder": lambda: reminder(
            content, sender=SENDER, to=TO, reply_to=REPLY_TO, thread_id=THREAD_ID
        ),
    }.get(kind, KINDS[kind])
    text = text_of(received(built()))
    body, marker, _ = text.partition("\n-- \n")
    assert marker, "no signature marker"
    if kind in HOW_TO_ANSWER:
        assert HOW_TO_ANSWER[kind] in " ".join(body.split())
    if kind in ("notification", "reminder"):
        flat = " ".join(body.split())
        assert "Only the first line of your reply is read." in flat
        assert flat.index("Please answer by") < flat.index("Draft post")  # the output follows
    too_long = [line for line in text.splitlines() if len(line) > 78]
    assert all(UNBREAKABLE.fullmatch(line) for line in too_long), too_long


def test_subjects_name_the_flow_and_step_in_words_or_by_the_rule_label() -> None:
    assert default_label("finance.flows.ReviewFlow", "approve_budget") == "Review: approve budget"
    assert default_label("x.HTTPCheckFlow", "sign_off") == "HTTP Check: sign off"
    assert default_label("Flow", "approve_budget") == "Approve budget"
    labelled = send_notification(make_content(label="Budget sign-off"))
    assert labelled["Subject"] == "Budget sign-off — Approve this draft?"


def test_an_escalated_notification_says_from_whom_and_why() -> None:
    message = send_notification(
        make_content(), reassigned=Reassignment("Bob <bob@example.org>", timedelta(hours=4))
    )
    assert message["Subject"] == f"Reassigned to you: {SUBJECT}"
    text = " ".join(text_of(message).split())
    assert text.startswith("Reassigned to you: bob@example.org did not answer within 4 hours.")


def test_the_preview_line_has_the_question_the_options_and_the_due_date() -> None:
    page = html_of(send_notification(make_content(deadline=DEADLINE)))
    hidden = re.search(r'<div style="display:none[^>]*>([^<]*)', page)
    assert hidden is not None
    assert hidden[1].startswith(
        "Approve this draft? · Reply: approved / rejected / needs_revision · by Mon, Mar 4"
    )


def test_each_option_is_a_one_tap_mailto_to_the_reply_address() -> None:
    page = html_of(send_notification())
    links = [a["href"] for tag, a in ElementCollector(page).elements if tag == "a" and a["href"]]
    buttons = [link for link in links if link.startswith("mailto:")]
    assert len(buttons) == 3
    for link, option in zip(buttons, ("approved", "rejected", "needs_revision"), strict=True):
        address, _, query = link.removeprefix("mailto:").partition("?")
        assert urllib.parse.unquote(address) == REPLY_TO
        fields = urllib.parse.parse_qs(query)
        assert fields["body"] == [option]
        assert fields["subject"] == [f"Re: {SUBJECT}"]


def test_the_reply_to_has_a_display_name_and_the_address_as_before() -> None:
    raw = build_notification().as_bytes().decode()
    assert f"Reply-To: Reply to answer <{REPLY_TO}>" in raw.replace("\r\n ", " ")


def test_output_headings_sit_below_the_title_and_two_space_lists_nest() -> None:
    nested = "# Plan\n\nSteps:\n- one\n  - one.a\n    - one.a.i\n- two\n1. first\n   - sub"
    page = html_of(send_notification(make_content(method_output=nested)))
    assert page.count("<h1") == 1
    assert re.search(r"<h3[^>]*>Plan</h3>", page)
    assert re.search(r"one\s*<ul[^>]*>\s*<li[^>]*>one\.a\s*<ul[^>]*>\s*<li[^>]*>one\.a\.i", page)
    assert re.search(r"first\s*<ul[^>]*>\s*<li[^>]*>sub", page)


def test_tables_scroll_in_their_own_box_and_code_wraps() -> None:
    page = html_of(send_notification())
    assert re.search(r'<div style="[^"]*overflow-x:auto;[^"]*"><table', page)
    pre = next(a["style"] for tag, a in ElementCollector(page).elements if tag == "pre")
    assert "white-space:pre-wrap" in (pre or "")


def test_the_html_declares_light_and_dark_and_its_footer_reads_at_aa_contrast() -> None:
    page = html_of(send_notification())
    assert '<meta name="color-scheme" content="light dark">' in page
    assert '<meta name="supported-color-schemes" content="light dark">' in page
    footer = re.search(r'class="hm-foot" style="[^"]*;color:(#[0-9a-f]{6})', page)
    assert footer is not None
    assert contrast(footer[1], "#f3f4f6") >= 4.5


def contrast(one: str, other: str) -> float:
    def luminance(colour: str) -> float:
        channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(one), luminance(other)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_mail_sent_unasked_never_speaks_of_a_reply() -> None:
    threaded: dict[str, Any] = {"sender": SENDER, "to": TO, "thread_id": THREAD_ID}
    cancelled = error_mail("cancelled", make_content(), reply_to=None, replied=False, **threaded)
    reassigned = error_mail(
        "reassigned",
        make_content(),
        reply_to=None,
        replied=False,
        reassigned_to="bob@example.org",
        reassigned_after=timedelta(days=2),
        **threaded,
    )
    for message in (cancelled, reassigned):
        text = " ".join(text_of(received(message)).split())
        assert "your reply" not in text.lower()
        assert "Reply-To" not in message
    assert "You can ignore the earlier email." in " ".join(text_of(received(cancelled)).split())
    assert "There was no answer within 2 days, so this review now waits for bob@example.org." in (
        " ".join(text_of(received(reassigned)).split())
    )


def test_the_undecided_mail_quotes_the_first_line_and_nothing_of_the_llm() -> None:
    message = received(
        error_mail(
            "undecided",
            make_content(),
            sender=SENDER,
            to=TO,
            thread_id=THREAD_ID,
            reply_to=REPLY_TO,
            your_reply="Hi team,\nlooks fine to me",
        )
    )
    text = " ".join(text_of(message).split())
    assert "Your reply “Hi team,” could not be matched" in text
    assert "looks fine" not in text
    assert not re.search(r"LLM|model|provider|error", text, re.I)


def test_the_expired_mail_offers_a_fresh_link_or_says_whom_to_ask() -> None:
    threaded: dict[str, Any] = {"sender": SENDER, "to": TO, "thread_id": THREAD_ID}
    fresh = "reply+freshtoken@reply.example.com"
    offered = received(
        error_mail("expired", make_content(), reply_to=REPLY_TO, fresh_reply_to=fresh, **threaded)
    )
    assert offered["Reply-To"].addresses[0].addr_spec == fresh
    text = " ".join(text_of(offered).split())
    assert "reply to this email, which has a new link" in text
    assert "Reply with one of: approved, rejected, needs_revision" in text
    assert REPLY_TO.partition("@")[0] not in html_of(offered)  # no button keeps the old token
    closed = received(error_mail("expired", make_content(), reply_to=REPLY_TO, **threaded))
    assert "Reply-To" not in closed
    assert "ask the person who runs this flow to send it again" in " ".join(text_of(closed).split())


@pytest.mark.parametrize(
    ("read_as", "outcome", "said"),
    [
        ("exact", "approved", "Your reply “approved” matched the answer approved."),
        ("llm", "approved", "did not name an answer exactly; it was read as approved."),
        ("default", "needs_revision", "Your reply was empty, which means needs_revision."),
    ],
)
def test_the_confirmation_says_how_the_reply_was_read(
    read_as: str, outcome: str, said: str
) -> None:
    feedback = "" if read_as == "default" else ("approved" if read_as == "exact" else "ship it")
    message = confirmation(
        make_content(),
        sender=SENDER,
        to=TO,
        thread_id=THREAD_ID,
        outcome=outcome,
        feedback=feedback,
        read_as=read_as,
    )
    assert said in " ".join(text_of(received(message)).split())


def test_the_confirmation_says_a_revision_comes_back_when_the_outcome_asks_for_one() -> None:
    threaded: dict[str, Any] = {"sender": SENDER, "to": TO, "thread_id": THREAD_ID}
    revise = confirmation(make_content(), outcome="needs_revision", feedback="x", **threaded)
    done = confirmation(make_content(), outcome="approved", feedback="x", **threaded)
    assert "the revised version will come to you for review" in " ".join(
        text_of(received(revise)).split()
    )
    assert "nothing more you need to do" in text_of(received(done))


def test_german_mail_is_german_with_german_dates() -> None:
    content = make_content(language="de", deadline=DEADLINE, auto_outcome="rejected")
    message = send_notification(content)
    text = " ".join(text_of(message).split())
    assert "Antworten Sie mit einem von: approved, rejected, needs_revision" in text
    assert "Bitte antworten Sie bis Montag, 4. März 2030, 15:30 UTC" in text
    assert 'lang="de"' in html_of(message)
    assert message["Reply-To"].addresses[0].display_name == "Hier antworten"
