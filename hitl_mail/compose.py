"""Compose every email hitl-mail sends, as `EmailMessage` objects ready for SMTP.

This module's single job is turning a feedback request, and what became of it,
into a message: headers, a plain-text part and a sanitised HTML part. It does
no I/O; sending belongs to the outbound stage, tokens to `tokens.py`.

Each email is first described as a short list of blocks (a title, an answer
box, paragraphs, notes, the method output), then rendered twice, to text and
to HTML, so the two parts cannot drift apart. The person answering sees
nothing of hitl-mail but these emails, so each says first what is asked and
how to answer (in the text part above the `-- ` signature marker, which
clients dim or hide), then the method output. The HTML is one column that
never scrolls sideways from 320 px up: wide tables and long code scroll or
wrap inside their own box.

Every sentence goes through gettext (`i18n.py`): English is the source,
other languages are catalogues in `hitl_mail/locale/`; dates and durations are
written by Babel in the request's language (`RequestContent.language`).

Headers beyond SPEC section 5 (extensions): `X-HITL-Event: reminder` on
reminders, `X-HITL-Error: <kind>` on errors, and `X-HITL-Outcome` on
auto-responses as well as on confirmations.
"""

from __future__ import annotations

import binascii
import html
import json
import re
import secrets
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry, MessageIDHeader
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from importlib import resources
from string import Template
from typing import Any, Literal, cast
from urllib.parse import quote

import markdown  # type: ignore[import-untyped]
import nh3
from babel.dates import format_date, format_skeleton, format_time, format_timedelta

from hitl_mail import i18n

ErrorKind = Literal[
    "expired", "already_answered", "wrong_sender", "undecided", "cancelled", "reassigned"
]
Event = Literal["notification", "reminder", "confirmation", "error", "auto-response"]

_WIDTH = 72
_RULE = "-" * 40
_CTE = "quoted-printable"
_ID_PREFIX = "hitl"
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
# The stdlib reads In-Reply-To and References as unstructured text and, once a long
# Message-ID passes 78 columns, rewrites it as RFC 2047 encoded words, which breaks
# threading. Parsed as msg-ids (we only ever write one), they stay as written.
_HEADERS = HeaderRegistry()
# typeshed wants a BaseHeader subclass; the registry itself mixes BaseHeader in.
_HEADERS.map_to_type("in-reply-to", cast("type[BaseHeader]", MessageIDHeader))
_HEADERS.map_to_type("references", cast("type[BaseHeader]", MessageIDHeader))
_POLICY = policy.SMTP.clone(header_factory=_HEADERS)
_ONE_MSG_ID = re.compile(r"[^<>\s@]+@[^<>\s@]+")
_LINE_END = re.compile(r"\r\n|\r|\n")  # what the stdlib generator rewrites as linesep
_NOT_IN_HEADERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Everything Markdown may produce; nothing else survives sanitising (SPEC 5).
_MD_TAGS = {"p", "br", "hr", "strong", "em", "code", "pre", "blockquote", "ul", "ol", "li", "a"}
_MD_TAGS |= {"h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td"}
_MD_ATTRIBUTES = {"a": {"href", "title"}, "th": {"align"}, "td": {"align"}, "ol": {"start"}}
_LIST_ITEM = re.compile(r"\s*(?:[-*+]|\d+[.)])\s+\S")
_LIST_MARKER = re.compile(r"( *)((?:[-*+]|\d+[.)]) +)\S")
_PROSE_TO_LIST = re.compile(r" {0,3}(?:[-*+]|1[.)])\s+\S")  # CommonMark: may interrupt prose
_OUTPUT_HEADING = re.compile(r"<(/?)h([1-6])\b")
_HEADING_DEMOTION = 2  # the email's own title is the one h1; output headings start at h3
# Outcome names that, by their word, send the work back for another round.
_LOOPS_BACK = re.compile(r"revis|change|redo|rework|retry|again|edit|fix|improve", re.I)


@dataclass(frozen=True)
class Sender:
    """Who the daemon writes as; Message-IDs use this address's domain (SPEC 7)."""

    from_address: str


@dataclass(frozen=True)
class RequestContent:
    """What a feedback request shows its reviewer, as the flow recorded it.

    `label` names the flow and step in words for subjects (the routing rule's
    `label`, else `default_label`); `language` is a code from
    `i18n.languages()` (another is written in English).
    """

    request_id: str
    flow_class: str
    method_name: str
    message: str
    method_output: Any
    emit: tuple[str, ...] | None
    default_outcome: str | None
    deadline: datetime | None
    auto_outcome: str | None = None
    label: str | None = None
    language: str = i18n.SOURCE


@dataclass(frozen=True)
class Reassignment:
    """Why a notification reached a new assignee: from whom, after how long without answer."""

    from_address: str
    after: timedelta | None = None


def default_label(flow_class: str, method_name: str) -> str:
    """`pkg.ReviewFlow` + `approve_budget` → "Review: approve budget"."""
    name = _one_line(flow_class).rpartition(".")[2]
    name = name.removesuffix("Flow") if name != "Flow" else ""
    words = " ".join(re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", name))
    step = " ".join(_one_line(method_name).replace("_", " ").split())
    return f"{words}: {step}" if words else step.capitalize()


def sender_domain(from_address: str) -> str:
    """The lowercased domain of a `From` value such as `Reviews <reviews@example.com>`."""
    domain = Address(addr_spec=parseaddr(_one_line(from_address))[1]).domain.lower()
    if not domain:
        raise ValueError(f"no domain in from_address {from_address!r}")
    return domain


def make_message_id(domain: str) -> str:
    """A fresh, opaque `<hitl.RANDOM@domain>`: 128 random bits and nothing else.

    It carries no credential (SPEC 9): every reply, and every mail the assignee
    forwards to a colleague, repeats it in In-Reply-To/References. A reply that
    lost its token is matched to the request by this id only when its sender is
    authenticated or the operator allowed it (answering.py).
    """
    domain = domain.strip().lower()
    if not _DOT_ATOM.fullmatch(domain):
        raise ValueError(f"not a domain for a Message-ID: {domain!r}")
    return f"<{_ID_PREFIX}.{secrets.token_hex(16)}@{domain}>"


@dataclass(frozen=True)
class _Mail:
    event: Event
    subject: str
    blocks: Sequence[_Block]
    footer: Sequence[str]
    headers: Mapping[str, str] = field(default_factory=dict)
    preheader: str = ""
    language: str = i18n.SOURCE
    reply_name: str = ""  # the display name on Reply-To


def notification(
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    reply_to: str,
    message_id: str,
    expires_at: datetime | None = None,
    reassigned: Reassignment | None = None,
) -> EmailMessage:
    """The request itself: what is asked and how to answer, then the method output (SPEC 5).

    One date is shown: the deadline, or without one, when the reply link
    expires. A `reassigned` notification says from whom it came and why.
    """
    w = _Words(content)
    lead: list[_Block] = []
    subject = _subject(content)
    if reassigned is not None:
        lead.append(_reassigned_note(w, reassigned))
        subject = w("Reassigned to you: {subject}", subject=subject)
    blocks = [*lead, *_request_blocks(w, content, reply_to, subject, expires_at)]
    footer = _reply_footer(w, content, to)
    mail = _Mail("notification", subject, blocks, footer, **_asking(w, content))
    return _build(mail, content, sender, to, message_id=message_id, reply_to=reply_to)


def reminder(
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    reply_to: str,
    thread_id: str,
    expires_at: datetime | None = None,
) -> EmailMessage:
    """The notification again, threaded under it, for a request still waiting."""
    w = _Words(content)
    subject = w("Reminder: {subject}", subject=_subject(content))
    nudge = _note(w("Reminder: this review is still waiting for your answer."))
    blocks = [nudge, *_request_blocks(w, content, reply_to, subject, expires_at)]
    footer = _reply_footer(w, content, to)
    mail = _Mail("reminder", subject, blocks, footer, **_asking(w, content))
    return _build(mail, content, sender, to, reply_to=reply_to, thread_id=thread_id)


def confirmation(
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    thread_id: str,
    outcome: str | None,
    feedback: str,
    read_as: str | None = None,
) -> EmailMessage:
    """What was recorded from the reply, how it was read, and what happens next.

    `read_as` is how the reply became its outcome (`outcomes.Method`): "exact",
    "default" (an empty reply), "llm" or "passthrough" (interpreted).
    """
    w = _Words(content)
    if outcome is None:
        blocks = [
            _title(w("Recorded your feedback")),
            _para(*w.bold("Your reply: {reply}", reply=_quoted(w, feedback))),
            _para(w("It was passed to the flow, which continues from here.")),
        ]
    else:
        blocks = [
            _title(w("Recorded: {outcome}", outcome=outcome)),
            _note(*w.bold("The question was: {question}", question=_question(w, content))),
            _para(*_read_as(w, outcome, feedback, read_as)),
            _para(_next_step(w, content, outcome)),
        ]
    headers = {"X-HITL-Outcome": outcome} if outcome is not None else {}
    preheader = blocks[0].spans[0]
    footer = _plain_footer(w, content)
    mail = _Mail(
        "confirmation", _re_subject(content), blocks, footer, headers, preheader, w.language
    )
    return _build(mail, content, sender, to, thread_id=thread_id)


def auto_response(
    content: RequestContent, *, sender: Sender, to: str, thread_id: str, outcome: str
) -> EmailMessage:
    """Nobody answered in time, so the configured outcome was applied."""
    w = _Words(content)
    if content.deadline is not None:
        said = w.bold(
            "Nobody answered this review by its deadline, {deadline}, so {outcome} was "
            "recorded automatically.",
            deadline=_when(w, content.deadline),
            outcome=outcome,
        )
    else:
        said = w.bold(
            "Nobody answered this review in time, so {outcome} was recorded automatically.",
            outcome=outcome,
        )
    blocks = [
        _title(w("No answer in time: {outcome} applied", outcome=outcome)),
        _note(*w.bold("The question was: {question}", question=_question(w, content))),
        _para(*said),
        _para(w("The flow continues from here. Replies to the earlier email are not recorded.")),
    ]
    headers = {"X-HITL-Outcome": outcome}
    footer = _plain_footer(w, content)
    preheader = blocks[0].spans[0]
    mail = _Mail(
        "auto-response", _re_subject(content), blocks, footer, headers, preheader, w.language
    )
    return _build(mail, content, sender, to, thread_id=thread_id)


def error_mail(
    kind: ErrorKind,
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    thread_id: str,
    reply_to: str | None,
    detail: str = "",
    answered_outcome: str | None = None,
    answered_feedback: str | None = None,
    replied: bool = True,
    your_reply: str | None = None,
    from_address: str | None = None,
    reassigned_to: str | None = None,
    reassigned_after: timedelta | None = None,
    fresh_reply_to: str | None = None,
) -> EmailMessage:
    """Why nothing was recorded, told to the address the token was issued to.

    `replied` is False for what is told unasked (a cancellation, a
    reassignment away), True for an answer to the person's reply. Only a
    mail that can still be answered carries a Reply-To: an undecided or
    wrong-sender one keeps `reply_to`, an expired one offers `fresh_reply_to`
    (a new token) or none, and the rest none.
    """
    w = _Words(content)
    facts = _Facts(
        replied, your_reply, from_address, to, reassigned_to, reassigned_after, fresh_reply_to
    )
    blocks = _error_blocks(w, kind, content, facts, answered_outcome, answered_feedback)
    answerable = {"undecided": reply_to, "wrong_sender": reply_to, "expired": fresh_reply_to}
    reply_to = answerable.get(kind)
    if reply_to:
        blocks += _answer_blocks(w, content, reply_to, _re_subject(content), None)
    if detail.strip():
        blocks.append(_note(w("Details:") + " ", detail.strip()))
    footer = _reply_footer(w, content, to) if reply_to else _plain_footer(w, content)
    preheader = blocks[0].spans[0]
    headers = {"X-HITL-Error": kind}
    mail = _Mail(
        "error",
        _re_subject(content),
        blocks,
        footer,
        headers,
        preheader,
        w.language,
        _reply_name(w),
    )
    return _build(mail, content, sender, to, reply_to=reply_to, thread_id=thread_id)


# --- what the emails say -------------------------------------------------------------


class _Em(str):
    """A span shown in bold in the HTML part and as it is in the text part."""


@dataclass(frozen=True)
class _Button:
    label: str
    href: str


@dataclass(frozen=True)
class _Block:
    kind: Literal["title", "para", "note", "output", "box", "buttons", "heading"]
    spans: tuple[str, ...] = ()
    value: Any = None


class _Words:
    """The request's language: `w(msgid, **values)` for a sentence, `w.bold` to bold the values.

    Each msgid is a literal at its call, so `pybabel extract -k w -k bold`
    finds every sentence (README, "Languages").
    """

    def __init__(self, content: RequestContent) -> None:
        self.language = content.language if content.language in i18n.languages() else "en"
        self.locale = i18n.locale(self.language)
        self._gettext: Callable[[str], str] = i18n.translations(self.language).gettext

    def __call__(self, msgid: str, **values: str) -> str:
        return self._gettext(msgid).format(**values)

    def bold(self, msgid: str, **values: str) -> list[str]:
        """The sentence split at its `{placeholders}`, each value an `_Em` span."""
        spans: list[str] = []
        for index, piece in enumerate(re.split(r"\{(\w+)\}", self._gettext(msgid))):
            if index % 2:
                spans.append(_Em(values[piece]))
            elif piece:
                spans.append(piece)
        return spans


@dataclass(frozen=True)
class _Facts:
    """What an error mail knows of its situation beyond the request."""

    replied: bool
    your_reply: str | None
    from_address: str | None
    to: str
    reassigned_to: str | None
    reassigned_after: timedelta | None
    fresh_reply_to: str | None


def _title(text: str) -> _Block:
    return _Block("title", (text,))


def _para(*spans: str) -> _Block:
    return _Block("para", spans)


def _note(*spans: str) -> _Block:
    return _Block("note", spans)


def _request_blocks(
    w: _Words,
    content: RequestContent,
    reply_to: str,
    subject: str,
    expires_at: datetime | None,
) -> list[_Block]:
    """The question, the answer box, then the method output under the flow's label."""
    return [
        _title(_question(w, content)),
        *_answer_blocks(w, content, reply_to, subject, expires_at),
        _Block("heading", (_label(content),)),
        _Block("output", (w("(no output)"),), content.method_output),
    ]


def _answer_blocks(
    w: _Words,
    content: RequestContent,
    reply_to: str,
    subject: str,
    expires_at: datetime | None,
) -> list[_Block]:
    """The answer box: the options, the one-line rule, the one date, one-tap buttons."""
    inner: list[_Block] = []
    if content.emit:
        inner.append(_para(w("Reply with one of:") + " ", *_outcome_list(content.emit)))
        inner.append(_Block("buttons", value=_buttons(w, content.emit, reply_to, subject)))
        inner.append(_para(w("Reply with one word, or one line saying what to change.")))
        if content.default_outcome:
            inner.append(
                _para(*w.bold("An empty reply means {outcome}.", outcome=content.default_outcome))
            )
    else:
        inner.append(_para(w("Reply with your feedback in one line.")))
    inner.append(_para(w("Only the first line of your reply is read.")))
    if content.deadline is not None:
        spans = w.bold(
            "Please answer by {date} ({relative}).",
            date=_when(w, content.deadline),
            relative=_relative(w, content.deadline),
        )
        if content.auto_outcome:
            then = w.bold(
                "If there is no answer by then, {outcome} is applied automatically.",
                outcome=content.auto_outcome,
            )
            spans += [" ", *then]
        inner.append(_para(*spans))
    elif expires_at is not None:
        inner.append(
            _para(*w.bold("The reply link works until {date}.", date=_when(w, expires_at)))
        )
    return [_Block("box", value=inner)]


def _buttons(w: _Words, emit: Sequence[str], reply_to: str, subject: str) -> list[_Button]:
    """One `mailto:` per option: a new mail to the reply address, its answer already typed."""
    address = quote(parseaddr(reply_to)[1] or reply_to, safe="@")
    re_subject = quote(w("Re: {subject}", subject=subject), safe="")
    return [
        _Button(option, f"mailto:{address}?subject={re_subject}&body={quote(option, safe='')}")
        for option in emit
    ]


def _asking(w: _Words, content: RequestContent) -> dict[str, Any]:
    """A request's `_Mail` fields beyond its blocks: the inbox preview line, and more.

    The preview is the question, the options and the due date, in one line.
    """
    parts = [_question(w, content)]
    if content.emit:
        parts.append(w("Reply: {options}", options=" / ".join(content.emit)))
    if content.deadline is not None:
        parts.append(w("by {date}", date=_short_when(w, content.deadline)))
    return {"preheader": " · ".join(parts), "language": w.language, "reply_name": _reply_name(w)}


def _reply_name(w: _Words) -> str:
    return w("Reply to answer")


def _reassigned_note(w: _Words, reassigned: Reassignment) -> _Block:
    who = parseaddr(reassigned.from_address)[1] or reassigned.from_address
    if reassigned.after is not None:
        return _note(
            *w.bold(
                "Reassigned to you: {person} did not answer within {duration}.",
                person=who,
                duration=_duration(w, reassigned.after),
            )
        )
    return _note(*w.bold("Reassigned to you from {person}.", person=who))


def _read_as(w: _Words, outcome: str, feedback: str, read_as: str | None) -> list[str]:
    reply = _quoted(w, feedback)
    if read_as == "exact":
        return w.bold(
            "Your reply {reply} matched the answer {outcome}.", reply=reply, outcome=outcome
        )
    if read_as == "default":
        return w.bold("Your reply was empty, which means {outcome}.", outcome=outcome)
    if read_as in ("llm", "passthrough"):
        return w.bold(
            "Your reply {reply} did not name an answer exactly; it was read as {outcome}.",
            reply=reply,
            outcome=outcome,
        )
    return w.bold("Your reply {reply} was recorded as {outcome}.", reply=reply, outcome=outcome)


def _next_step(w: _Words, content: RequestContent, outcome: str) -> str:
    if _LOOPS_BACK.search(outcome):
        return w(
            "The flow continues with your answer. If it sends the work back for changes, "
            "the revised version will come to you for review in a new email."
        )
    return w("The flow continues from here; there is nothing more you need to do.")


def _error_blocks(
    w: _Words,
    kind: ErrorKind,
    content: RequestContent,
    facts: _Facts,
    outcome: str | None,
    feedback: str | None,
) -> list[_Block]:
    question = _note(*w.bold("The question was: {question}", question=_question(w, content)))
    if kind == "already_answered":
        if outcome is not None:
            said = w.bold(
                "This review was already answered with {outcome}, so your reply was not "
                "recorded. Nothing more is needed from you.",
                outcome=outcome,
            )
        else:
            said = w.bold(
                "This review was already answered, so your reply was not recorded. "
                "Nothing more is needed from you."
            )
        blocks = [_title(w("This review was already answered")), question, _para(*said)]
        if feedback is not None and feedback.strip():
            blocks.append(
                _note(*w.bold("The answer recorded: {answer}", answer=_quoted(w, feedback)))
            )
        return blocks
    if kind == "undecided":
        return [
            _title(w("Which answer did you mean?")),
            _para(
                *w.bold(
                    "Your reply {reply} could not be matched to one of the answers with "
                    "certainty, so nothing was recorded yet.",
                    reply=_quoted(w, facts.your_reply),
                )
            ),
            question,
        ]
    if kind == "wrong_sender":
        other = facts.from_address or w("another address")
        mine = parseaddr(facts.to)[1] or facts.to
        return [
            _title(w("Your reply came from another address")),
            _para(
                *w.bold(
                    "A reply to this review came from {other}, but it was sent to {mine}, "
                    "so nothing was recorded. If that was you, reply from {mine}.",
                    other=other,
                    mine=mine,
                )
            ),
            question,
        ]
    if kind == "expired":
        return _expired_blocks(w, facts, question)
    if kind == "reassigned":
        return _reassigned_blocks(w, facts, question)
    return _cancelled_blocks(w, facts, question)


def _expired_blocks(w: _Words, facts: _Facts, question: _Block) -> list[_Block]:
    said = w("The reply link you used has expired, so your reply was not recorded.")
    if facts.fresh_reply_to:
        then = w(
            "The review still waits for your answer: reply to this email, which has a new link."
        )
    else:
        then = w(
            "Replying to this email will not work either. If the review still needs your "
            "answer, ask the person who runs this flow to send it again."
        )
    return [_title(w("Your reply link has expired")), question, _para(said + " " + then)]


def _reassigned_blocks(w: _Words, facts: _Facts, question: _Block) -> list[_Block]:
    who = facts.reassigned_to or w("someone else")
    if facts.reassigned_after is not None:
        said = w.bold(
            "There was no answer within {duration}, so this review now waits for {person}.",
            duration=_duration(w, facts.reassigned_after),
            person=who,
        )
    else:
        said = w.bold("This review now waits for {person}.", person=who)
    then = w("There is nothing more for you to do; the earlier email's reply link no longer works.")
    return [_title(w("This review was reassigned")), question, _para(*said, " ", then)]


def _cancelled_blocks(w: _Words, facts: _Facts, question: _Block) -> list[_Block]:
    if facts.replied:
        said = w(
            "This review was cancelled before your reply arrived, so your reply was not "
            "recorded. Nothing more is needed from you."
        )
    else:
        said = w(
            "This review was cancelled, so it no longer needs your answer. You can ignore "
            "the earlier email."
        )
    return [_title(w("This review was cancelled")), question, _para(said)]


def _outcome_list(emit: Sequence[str]) -> list[str]:
    spans: list[str] = []
    for option in emit:
        spans += [", ", _Em(option)] if spans else [_Em(option)]
    return spans


def _reply_footer(w: _Words, content: RequestContent, to: str) -> list[str]:
    address = parseaddr(to)[1] or to
    line = w(
        "This email was sent to {address}; replies from any other address are not recorded.",
        address=address,
    )
    return [line, *_plain_footer(w, content)]


def _plain_footer(w: _Words, content: RequestContent) -> list[str]:
    ref = f"{_one_line(content.flow_class)}.{_name(content)}"
    return [w("Request {id} · {reference}", id=content.request_id, reference=ref)]


def _label(content: RequestContent) -> str:
    label = _one_line(content.label or "")
    return label or default_label(content.flow_class, content.method_name)


def _question(w: _Words, content: RequestContent) -> str:
    return content.message.strip() or w("Your review is needed")


def _name(content: RequestContent) -> str:
    return _one_line(content.method_name)


def _quoted(w: _Words, text: str | None) -> str:
    first = (text or "").strip().splitlines()[0].strip() if text and text.strip() else ""
    return w("“{text}”", text=_shorten(first, 200)) if first else w("(an empty reply)")


def _utc(moment: datetime) -> datetime:
    # Naive datetimes are read as UTC, the store's convention; one zone for every reader.
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _when(w: _Words, moment: datetime) -> str:
    """Weekday, date and time in the reader's language, e.g. "Monday, March 4, 2030, 3:30 PM UTC"."""
    at = _utc(moment)
    day = format_date(at, format="full", locale=w.locale)
    return w("{date}, {time} UTC", date=day, time=format_time(at, format="short", locale=w.locale))


def _short_when(w: _Words, moment: datetime) -> str:
    at = _utc(moment)
    day = format_skeleton("MMMEd", at, locale=w.locale)
    return f"{day}, {format_time(at, format='short', locale=w.locale)} UTC"


def _relative(w: _Words, moment: datetime) -> str:
    """How far off `moment` is ("in 2 days", "in 3 Stunden"), in the reader's language."""
    delta = _utc(moment) - datetime.now(UTC)
    return format_timedelta(delta, add_direction=True, threshold=1.5, locale=w.locale)


def _duration(w: _Words, length: timedelta) -> str:
    return format_timedelta(length, threshold=1.5, locale=w.locale)


# --- headers -------------------------------------------------------------------------


def _build(
    mail: _Mail,
    content: RequestContent,
    sender: Sender,
    to: str,
    *,
    message_id: str | None = None,
    reply_to: str | None = None,
    thread_id: str | None = None,
) -> EmailMessage:
    msg = EmailMessage(policy=_POLICY)
    headers = {
        "From": sender.from_address,
        "To": to,
        "Subject": mail.subject,
        "Date": format_datetime(datetime.now(UTC)),
        "Message-ID": message_id or make_message_id(sender_domain(sender.from_address)),
        # RFC 3834 section 5: tells vacation responders and mailing lists not to answer us.
        "Auto-Submitted": "auto-generated",
        # Exchange honours this instead: no out-of-office or delivery receipts back to us.
        "X-Auto-Response-Suppress": "All",
        "X-HITL-Event": mail.event,
        "X-HITL-Request-Id": content.request_id,
        **({"Reply-To": _named(reply_to, mail.reply_name)} if reply_to else {}),
        **(
            {"In-Reply-To": _msg_id(thread_id), "References": _msg_id(thread_id)}
            if thread_id
            else {}
        ),
        **mail.headers,
    }
    for name, value in headers.items():
        _set_header(msg, name, _one_line(value))
    msg.set_raw("MIME-Version", "1.0")
    # A boundary that quoted-printable text can never contain ("=_" would be "=3D_"),
    # so the generator need not search the parts for it.
    msg.set_raw("Content-Type", f'multipart/alternative;\n boundary="=_{secrets.token_hex(16)}"')
    msg.attach(_text_part(_render_text(mail), "plain"))
    msg.attach(_text_part(_render_html(mail), "html"))
    return msg


def _named(address: str, name: str) -> str:
    """`"Reply to answer" <reply+TOKEN@…>`: the address exactly as given, under a name."""
    if not name or "<" in address:
        return address
    return str(Address(display_name=_one_line(name), addr_spec=address.strip()))


def message_bytes(msg: EmailMessage) -> bytes:
    """`msg.as_bytes()`, byte for byte, for the shape `_build` makes, in a fraction of the time.

    The stdlib generator parses each part's Content-Type several times over
    (to choose a handler, to find the boundary) and copies every part through
    a generator of its own: 0.45 ms a message, 40 % of the daemon's CPU for
    recording an answer. Our messages are one multipart/alternative of text
    parts with ready quoted-printable payloads, so writing them is folding
    each header as the generator would and joining the lines. Any other shape
    goes to `as_bytes` (the tests hold the two to the same bytes).
    """
    payload = msg.get_payload()
    parts = cast("list[EmailMessage]", payload if isinstance(payload, list) else [])
    texts = [text for part in parts if isinstance(text := part.get_payload(), str)]
    boundary = msg.get_boundary() if parts else None
    if (
        not boundary
        or len(texts) != len(parts)
        or msg.preamble is not None
        or msg.epilogue is not None
    ):
        return msg.as_bytes()
    fold, nl = msg.policy.fold_binary, msg.policy.linesep

    def as_ascii(value: str) -> bytes:  # as the generator writes a str
        return value.encode("ascii", "surrogateescape")

    out = [*(fold(name, value) for name, value in msg.raw_items()), as_ascii(nl)]
    for index, (part, text) in enumerate(zip(parts, texts, strict=True)):
        out.append(as_ascii(f"{nl if index else ''}--{boundary}{nl}"))
        out.extend(fold(name, value) for name, value in part.raw_items())
        out.append(as_ascii(nl + _LINE_END.sub(nl, text)))
    out.append(as_ascii(f"{nl}--{boundary}--{nl}"))
    return b"".join(out)


def _set_header(msg: EmailMessage, name: str, value: str) -> None:
    """ASCII values go in as written; others are parsed and RFC 2047-encoded by the policy.

    The policy's header objects cost a parse on every assignment and a refold on
    output (most of the time it takes to build a message); plain ASCII needs
    neither, and the generator still refolds a raw value longer than a line.
    """
    if value.isascii():
        msg.set_raw(name, value)
    else:
        msg[name] = value


def _text_part(text: str, subtype: str) -> EmailMessage:
    """One text part, quoted-printable (7-bit clean for any relay, 8BITMIME or not)."""
    part = EmailMessage(policy=_POLICY)
    part.set_raw("Content-Type", f'text/{subtype}; charset="utf-8"')
    part.set_raw("Content-Transfer-Encoding", _CTE)
    part.set_payload(binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii"))
    return part


def _one_line(text: str) -> str:
    """`text` without CR, LF or other controls: flow code names can't inject headers."""
    return " ".join(_NOT_IN_HEADERS.sub(" ", text).split())


def _msg_id(thread_id: str) -> str:
    """One `<id@domain>`, as RFC 5322 3.6.4 wants for In-Reply-To; brackets optional on input."""
    core = thread_id.strip().strip("<>")
    if not _ONE_MSG_ID.fullmatch(core):
        raise ValueError(f"thread_id must be one Message-ID, not {thread_id!r}")
    return f"<{core}>"


def _subject(content: RequestContent) -> str:
    """`Review: approve budget — Approve this draft?`: the flow's label, then the question."""
    label = _shorten(_label(content), 60)
    message = _shorten(_one_line(content.message), 80)
    return f"{label} — {message}" if message else label


def _re_subject(content: RequestContent) -> str:
    return f"Re: {_subject(content)}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --- the text part -------------------------------------------------------------------


def _render_text(mail: _Mail) -> str:
    body = "\n\n".join(text for block in mail.blocks if (text := _block_text(block)))
    footer = "\n".join(_fill(line) for line in mail.footer)
    return f"{body}\n\n-- \n{footer}\n"  # "-- " is the signature delimiter (RFC 3676 4.3)


def _block_text(block: _Block) -> str:
    if block.kind == "output":
        return f"{_RULE}\n{_output_text(block.value) or block.spans[0]}\n{_RULE}"
    if block.kind == "box":
        return "\n".join(text for inner in block.value if (text := _block_text(inner)))
    if block.kind == "buttons":
        return ""  # the options line above says the same in words
    return _fill("".join(block.spans))


def _fill(text: str) -> str:
    return "\n".join(_wrap(line) for line in text.splitlines())


def _wrap(line: str, indent: str = "") -> str:
    return textwrap.fill(
        line, _WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _output_text(value: Any) -> str:
    value = _jsonable(value)
    if isinstance(value, str):
        text = _wrap_markdown(value.strip())
    elif isinstance(value, dict):
        text = "\n".join(_pair_text(str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        text = "\n".join("- " + _scalar_text(item).replace("\n", "\n  ") for item in value)
    else:
        text = "" if value is None else _scalar_text(value)
    return _wrap_markdown(text)


def _pair_text(key: str, value: Any) -> str:
    text = _scalar_text(value)
    return f"{key}:\n{textwrap.indent(text, '  ')}" if "\n" in text else f"{key}: {text}"


def _scalar_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """A pydantic model as its JSON-mode dict; anything else unchanged."""
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if callable(dump) else value


def _wrap_markdown(source: str) -> str:
    """Lines wider than the text part wrapped at spaces, each under its own indentation.

    Prose wraps under its list marker; a long code or table line continues on
    the next lines indented two more spaces. A word longer than a line (a URL,
    a hash) is never cut.
    """
    out = []
    for line in source.splitlines():
        if len(line) <= _WIDTH:
            out.append(line)
            continue
        marker = _LIST_ITEM.match(line)
        hang = " " * (marker.end() - 1) if marker else line[: len(line) - len(line.lstrip())]
        out.append(
            textwrap.fill(
                line,
                _WIDTH,
                subsequent_indent=hang if marker else hang + "  ",
                break_long_words=False,
                break_on_hyphens=False,
                drop_whitespace=True,
            )
        )
    return "\n".join(out)


def _fence_flags(lines: Sequence[str]) -> list[bool]:
    """For each line, whether it is a code fence or inside one."""
    flags, inside = [], False
    for line in lines:
        is_fence = line.lstrip().startswith(("```", "~~~"))
        flags.append(inside or is_fence)
        inside ^= is_fence
    return flags


# --- the HTML part -------------------------------------------------------------------


def _render_html(mail: _Mail) -> str:
    preheader = mail.preheader or "".join(mail.blocks[0].spans if mail.blocks else ())
    return Template(_template("email.html")).substitute(
        lang=html.escape(mail.language),
        title=html.escape(mail.subject),
        preheader=html.escape(preheader),
        content="\n".join(_block_html(block) for block in mail.blocks),
        footer="\n".join(f"<p{_style('.footer')}>{html.escape(line)}</p>" for line in mail.footer),
    )


def _block_html(block: _Block) -> str:
    if block.kind == "output":
        shown = (
            _output_html(block.value) or f"<p{_style('.note')}>{html.escape(block.spans[0])}</p>"
        )
        return f"<div{_style('.output')}>{shown}</div>"
    if block.kind == "box":
        inner = "\n".join(_block_html(part) for part in block.value)
        return f'<div class="hm-box"{_style(".box")}>{inner}</div>'
    if block.kind == "buttons":
        links = "".join(
            f'<a class="hm-button" href="{html.escape(button.href)}"{_style(".button")}>'
            f"{html.escape(button.label)}</a> "
            for button in block.value
        )
        return f"<p{_style('.buttons')}>{links}</p>"
    inner = "".join(
        f"<strong>{html.escape(span)}</strong>" if isinstance(span, _Em) else html.escape(span)
        for span in block.spans
    )
    tag = {"title": "h1", "heading": "h2"}.get(block.kind, "p")
    muted = ' class="hm-muted"' if block.kind in ("note", "heading") else ""
    return f"<{tag}{muted}{_style('.' + block.kind)}>{inner}</{tag}>"


def _output_html(value: Any) -> str:
    value = _jsonable(value)
    if isinstance(value, str) and value.strip():
        return _markdown_html(value)
    if isinstance(value, dict) and value:
        rows = "".join(
            f'<tr><th scope="row"{_style(".key")}>{html.escape(str(key))}</th>'
            f"<td{_style('.value')}>{_value_html(item)}</td></tr>"
            for key, item in value.items()
        )
        return _scrolling(f"<table{_style('.table')}><tbody>{rows}</tbody></table>")
    if isinstance(value, list) and value:
        items = "".join(f"<li{_style('.item')}>{_value_html(item)}</li>" for item in value)
        return f"<ul{_style('.list')}>{items}</ul>"
    if value is None or value in ("", {}, []):
        return ""  # the block's own "(no output)" shows instead
    return f"<p{_style('.para')}>{_value_html(value)}</p>"


def _value_html(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"<pre{_style('.json')}>{html.escape(_scalar_text(value))}</pre>"
    return html.escape(_scalar_text(value))


def _scrolling(table: str) -> str:
    """A table in a box of its own that scrolls sideways, so the page never does."""
    return f"<div{_style('.scroll')}>{table}</div>"


def _markdown_html(source: str) -> str:
    """Markdown to HTML with raw HTML shown as text, then sanitised all the same."""
    md = markdown.Markdown(
        extensions=["tables", "fenced_code", "sane_lists"],
        extension_configs={"tables": {"use_align_attribute": True}},
    )
    # SPEC 5: raw HTML in the method output is escaped, never passed through. Without
    # these two parsers Python-Markdown treats `<tag>` as text and escapes it.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    rendered: str = md.convert(_nest_lists(_loosen_lists(source)))
    # Below the email's own title: an output `# Heading` is an h3, never a second h1.
    rendered = _OUTPUT_HEADING.sub(
        lambda m: f"<{m[1]}h{min(int(m[2]) + _HEADING_DEMOTION, 6)}", rendered
    )
    # Defence in depth: nothing outside Markdown's own vocabulary survives, links
    # keep http/https/mailto only, and every element gets its inline style here,
    # since many mail clients ignore <style> in <head>.
    sanitised: str = nh3.clean(
        rendered,
        tags=_MD_TAGS,
        clean_content_tags={"script", "style"},
        attributes=_MD_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        set_tag_attribute_values={
            tag: {"style": _styles()[tag]} for tag in _MD_TAGS & _styles().keys()
        },
    )
    # Only Markdown's own tables are left, and their markup is exactly "<table ...>".
    return re.sub(r"<table\b.*?</table>", lambda m: _scrolling(m[0]), sanitised, flags=re.S)


def _loosen_lists(source: str) -> str:
    """A blank line before a list that follows prose, as CommonMark and LLMs assume."""
    lines = source.splitlines()
    out: list[str] = []
    for line, fenced in zip(lines, _fence_flags(lines), strict=True):
        previous = out[-1] if out else ""
        prose = previous.strip() and not previous[0].isspace() and not _LIST_ITEM.match(previous)
        if not fenced and prose and _PROSE_TO_LIST.match(line):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _nest_lists(source: str) -> str:
    """List items re-indented four spaces a level, so two-space nesting stays nested.

    Python-Markdown nests a list only under four spaces; most LLMs indent
    by two (or three, under `1. `). Each item's level is read from its
    indentation relative to the items above it; the lines that continue an
    item follow it. Code fences are left as written.
    """
    lines = source.splitlines()
    out: list[str] = []
    stack: list[int] = []  # the indentation of each open list level
    for line, fenced in zip(lines, _fence_flags(lines), strict=True):
        item = None if fenced else _LIST_MARKER.match(line)
        if item is not None:
            indent = len(item[1])
            while stack and stack[-1] > indent:
                stack.pop()
            if not stack or stack[-1] < indent:
                stack.append(indent)
            out.append("    " * (len(stack) - 1) + line[indent:])
        elif stack and line.strip() and not fenced and line[0] == " ":
            out.append("    " * len(stack) + line.lstrip())
        else:
            if line.strip() and not line[0].isspace():
                stack = []
            out.append(line)
    return "\n".join(out)


def _style(name: str) -> str:
    """` style="..."` for a class of templates/email.css, or nothing."""
    style = _styles().get(name)
    return f' style="{html.escape(style, quote=False)}"' if style else ""


@cache
def _styles() -> dict[str, str]:
    """templates/email.css as selector -> declarations, to inline into elements."""
    css = re.sub(r"/\*.*?\*/", "", _template("email.css"), flags=re.S)
    styles: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        # Double quotes would end the style attribute; CSS takes single ones alike.
        rules = (d.partition(":") for d in body.replace('"', "'").split(";") if d.strip())
        declarations = "".join(f"{name.strip()}:{' '.join(v.split())};" for name, _, v in rules)
        for selector in selectors.split(","):
            styles[selector.strip()] = styles.get(selector.strip(), "") + declarations
    return styles


@cache
def _template(name: str) -> str:
    return resources.files("hitl_mail").joinpath("templates", name).read_text(encoding="utf-8")
