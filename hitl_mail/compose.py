"""Compose every email hitl-mail sends, as `EmailMessage` objects ready for SMTP.

This module's single job is turning a feedback request, and what became of it,
into a message: headers, a plain-text part and a sanitised HTML part. It does
no I/O; sending belongs to the outbound stage, tokens to `tokens.py`.

Each email is first described as a short list of blocks (a title, paragraphs,
notes, the method output), then rendered twice, to text and to HTML, so the two
parts cannot drift apart.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry, MessageIDHeader
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import cache
from importlib import resources
from string import Template
from typing import Any, Literal, cast

import markdown  # type: ignore[import-untyped]
import nh3

ErrorKind = Literal[
    "expired", "already_answered", "wrong_sender", "undecided", "cancelled", "reassigned"
]
Event = Literal["notification", "reminder", "confirmation", "error", "auto-response"]

_WIDTH = 72
_RULE = "-" * 40
_NO_OUTPUT = "(no output)"
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
_PROSE_TO_LIST = re.compile(r" {0,3}(?:[-*+]|1[.)])\s+\S")  # CommonMark: may interrupt prose
_NO_WRAP = re.compile(r"^(?: {4}|\t|\s*[#>])|\|")


@dataclass(frozen=True)
class Sender:
    """Who the daemon writes as; Message-IDs use this address's domain (SPEC 7)."""

    from_address: str


@dataclass(frozen=True)
class RequestContent:
    """What a feedback request shows its reviewer, as the flow recorded it."""

    request_id: str
    flow_class: str
    method_name: str
    message: str
    method_output: Any
    emit: tuple[str, ...] | None
    default_outcome: str | None
    deadline: datetime | None
    auto_outcome: str | None = None


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


def notification(
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    reply_to: str,
    message_id: str,
    expires_at: datetime | None = None,
) -> EmailMessage:
    """The request itself: question, method output, how to answer (SPEC 5)."""
    blocks = [*_request_blocks(content), *_answer_blocks(content)]
    mail = _Mail("notification", _subject(content), blocks, _reply_footer(content, to, expires_at))
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
    nudge = _para("Reminder: this review is still waiting for your answer.")
    blocks = [nudge, *_request_blocks(content), *_answer_blocks(content)]
    footer = _reply_footer(content, to, expires_at)
    mail = _Mail("reminder", _re_subject(content), blocks, footer)
    return _build(mail, content, sender, to, reply_to=reply_to, thread_id=thread_id)


def confirmation(
    content: RequestContent,
    *,
    sender: Sender,
    to: str,
    thread_id: str,
    outcome: str | None,
    feedback: str,
) -> EmailMessage:
    """What was recorded from the reply; the flow goes on."""
    blocks = [
        _title(f"Recorded: {outcome}" if outcome is not None else "Recorded your feedback"),
        _para("Your reply, as understood: ", _Em(_quoted(feedback))),
        _para("The flow continues from here; there is nothing more you need to do."),
    ]
    headers = {"X-HITL-Outcome": outcome} if outcome is not None else {}
    mail = _Mail("confirmation", _re_subject(content), blocks, _plain_footer(content), headers)
    return _build(mail, content, sender, to, thread_id=thread_id)


def auto_response(
    content: RequestContent, *, sender: Sender, to: str, thread_id: str, outcome: str
) -> EmailMessage:
    """Nobody answered in time, so the configured outcome was applied."""
    by = f" before its deadline ({_when(content.deadline)})" if content.deadline else " in time"
    blocks = [
        _title(f"No answer in time: {outcome} applied"),
        _para(
            f"Nobody answered this review{by}, so ", _Em(outcome), " was recorded automatically."
        ),
        _para("The flow continues from here. Replies to the earlier email are no longer recorded."),
    ]
    headers = {"X-HITL-Outcome": outcome}
    mail = _Mail("auto-response", _re_subject(content), blocks, _plain_footer(content), headers)
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
) -> EmailMessage:
    """Why a reply recorded nothing, told to the address the token was issued to."""
    blocks = _error_blocks(kind, content, answered_outcome, answered_feedback)
    if detail.strip():
        blocks.append(_note("Details: ", detail.strip()))
    footer = _reply_footer(content, None, None) if reply_to else _plain_footer(content)
    mail = _Mail("error", _re_subject(content), blocks, footer, {"X-HITL-Error": kind})
    return _build(mail, content, sender, to, reply_to=reply_to, thread_id=thread_id)


# --- what the emails say -------------------------------------------------------------


class _Em(str):
    """A span shown in bold in the HTML part and as it is in the text part."""


@dataclass(frozen=True)
class _Block:
    kind: Literal["title", "para", "note", "output"]
    spans: tuple[str, ...] = ()
    value: Any = None


def _title(text: str) -> _Block:
    return _Block("title", (text,))


def _para(*spans: str) -> _Block:
    return _Block("para", spans)


def _note(*spans: str) -> _Block:
    return _Block("note", spans)


def _request_blocks(content: RequestContent) -> list[_Block]:
    return [
        _title(content.message.strip() or "Your review is needed"),
        _note("Flow ", _Em(_one_line(content.flow_class)), ", step ", _Em(_name(content)), ":"),
        _Block("output", value=content.method_output),
    ]


def _answer_blocks(content: RequestContent) -> list[_Block]:
    blocks = _options_blocks(content, "Reply with one of: ", " — or write what should change.")
    if content.deadline is not None:
        spans = ["Please answer by ", _Em(_when(content.deadline)), "."]
        if content.auto_outcome:
            spans += [" If there is no answer by then, ", _Em(content.auto_outcome)]
            spans.append(" is applied automatically.")
        blocks.append(_para(*spans))
    return blocks


def _options_blocks(content: RequestContent, lead: str, tail: str) -> list[_Block]:
    if not content.emit:
        return [_para("Reply with your feedback.")]
    blocks = [_para(lead, *_outcome_list(content.emit), tail)]
    if content.default_outcome:
        blocks.append(_para("An empty reply means ", _Em(content.default_outcome), "."))
    return blocks


_NOT_RECORDED = "Your reply was not recorded, and nothing more is needed from you."
_ERRORS: Mapping[str, tuple[str, str]] = {
    "expired": (
        "This review link has expired",
        "Your reply came through a link that has expired, so nothing was recorded. Links "
        "expire after a while so an old or leaked email cannot answer a review long after "
        "the fact. Ask the flow owner to re-send the request, or reply to the newest "
        "notification.",
    ),
    "wrong_sender": (
        "Someone else tried to answer your review",
        "Someone from another address tried to answer this review with the reply address "
        "sent to you. Nothing was recorded; the review still waits for you. If you did not "
        "forward the email, you may want to tell the flow owner.",
    ),
    "cancelled": ("This review was cancelled", _NOT_RECORDED),
    "reassigned": ("This review was reassigned", _NOT_RECORDED),
}


def _error_blocks(
    kind: ErrorKind, content: RequestContent, outcome: str | None, feedback: str | None
) -> list[_Block]:
    if kind == "already_answered":
        answer = [" with ", _Em(outcome)] if outcome else []
        answer += [f" ({_quoted(feedback)})"] if feedback is not None else []
        return [
            _title("This review was already answered"),
            _para("It was already answered", *answer, ", so your reply was not recorded."),
        ]
    if kind == "undecided":
        lead = "Nothing was recorded yet. Reply with exactly one of: "
        return [
            _title("We could not tell which outcome you meant"),
            *_options_blocks(content, lead, "."),
        ]
    title, text = _ERRORS[kind]
    return [_title(title), _para(text)]


def _outcome_list(emit: Sequence[str]) -> list[str]:
    spans: list[str] = []
    for option in emit:
        spans += [", ", _Em(option)] if spans else [_Em(option)]
    return spans


def _reply_footer(
    content: RequestContent, to: str | None, expires_at: datetime | None
) -> list[str]:
    line = "Reply to this email; only the first line of your reply is read."
    if to is not None:
        line += f" This link is personal to {parseaddr(to)[1] or to}"
        line += f" and expires {_when(expires_at)}." if expires_at else "."
    return [line, *_plain_footer(content)]


def _plain_footer(content: RequestContent) -> list[str]:
    return [f"Request {content.request_id} · {_one_line(content.flow_class)}.{_name(content)}"]


def _name(content: RequestContent) -> str:
    return _one_line(content.method_name)


def _quoted(text: str | None) -> str:
    return f"“{text.strip()}”" if text and text.strip() else "(an empty reply)"


def _when(moment: datetime) -> str:
    # Naive datetimes are read as UTC, the store's convention; one zone for every reader.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return f"{aware.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


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
        **({"Reply-To": reply_to} if reply_to else {}),
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
    message = _shorten(_one_line(content.message), 80)
    method = _shorten(_one_line(content.method_name), 60)
    return f"[Review] {message} — {method}" if message else f"[Review] {method}"


def _re_subject(content: RequestContent) -> str:
    return f"Re: {_subject(content)}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --- the text part -------------------------------------------------------------------


def _render_text(mail: _Mail) -> str:
    body = "\n\n".join(_block_text(block) for block in mail.blocks)
    footer = "\n".join(_fill(line) for line in mail.footer)
    return f"{body}\n\n-- \n{footer}\n"  # "-- " is the signature delimiter (RFC 3676 4.3)


def _block_text(block: _Block) -> str:
    if block.kind == "output":
        return f"{_RULE}\n{_output_text(block.value)}\n{_RULE}"
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
    return text or _NO_OUTPUT


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
    """Long prose lines wrapped; code, tables, headings and quotes left as written."""
    lines = source.splitlines()
    out = []
    for line, fenced in zip(lines, _fence_flags(lines), strict=True):
        if fenced or len(line) <= _WIDTH or _NO_WRAP.search(line):
            out.append(line)
        else:
            marker = _LIST_ITEM.match(line)
            out.append(_wrap(line, " " * (marker.end() - 1) if marker else ""))
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
    first = mail.blocks[0].spans if mail.blocks else ()
    return Template(_template("email.html")).substitute(
        title=html.escape(mail.subject),
        preheader=html.escape("".join(first)),
        content="\n".join(_block_html(block) for block in mail.blocks),
        footer="\n".join(f"<p{_style('.footer')}>{html.escape(line)}</p>" for line in mail.footer),
    )


def _block_html(block: _Block) -> str:
    if block.kind == "output":
        return f"<div{_style('.output')}>{_output_html(block.value)}</div>"
    inner = "".join(
        f"<strong>{html.escape(span)}</strong>" if isinstance(span, _Em) else html.escape(span)
        for span in block.spans
    )
    tag = "h1" if block.kind == "title" else "p"
    return f"<{tag}{_style('.' + block.kind)}>{inner}</{tag}>"


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
        return f"<table{_style('.table')}><tbody>{rows}</tbody></table>"
    if isinstance(value, list) and value:
        items = "".join(f"<li{_style('.item')}>{_value_html(item)}</li>" for item in value)
        return f"<ul{_style('.list')}>{items}</ul>"
    if value is None or value in ("", {}, []):
        return f"<p{_style('.note')}>{_NO_OUTPUT}</p>"
    return f"<p{_style('.para')}>{_value_html(value)}</p>"


def _value_html(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"<pre{_style('.json')}>{html.escape(_scalar_text(value))}</pre>"
    return html.escape(_scalar_text(value))


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
    rendered: str = md.convert(_loosen_lists(source))
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
    return sanitised


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
