"""Read a raw inbound reply: who sent it, whether a machine did, and the new text it carries.

This module's single job is ``raw bytes -> ParsedReply``: the threading headers,
a verdict on machine mail (auto-replies, bounces, lists, our own mail), and the
*new text* of the reply with quoted history and signature removed, whose first
non-empty line is the feedback. It never raises on malformed input: whatever
cannot be read is left empty.

MIME comes from mail-parser (headers, decoded per RFC 2047) with the stdlib
``email`` package as fallback; text parts are decoded here, because
mail-parser neither unfolds ``format=flowed`` (RFC 3676) nor retries a
wrongly labelled charset with anything but UTF-8 replacement characters.

Work is bounded and linear: scans go line by line, regular expressions are flat.
A decoded text part is cut to ``MAX_PART_CHARS`` (256 Ki characters; HTML markup
likewise), only its first ``MAX_TEXT_CHARS`` (64 Ki) and ``MAX_TEXT_LINES`` (2,000)
are searched for the new text, and a message with more than 100 MIME boundaries is
read for its headers only. An answer sits at the top of a reply or under a short
quote, so the caps cost nothing a person types by hand.
"""

from __future__ import annotations

import email.policy
import logging
import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses
from html import unescape
from typing import Any

import mailparser
from mailparser import utils as mailparser_utils

logger = logging.getLogger(__name__)

MAX_PART_CHARS = 256 * 1024
MAX_TEXT_CHARS = 64 * 1024
MAX_TEXT_LINES = 2000
_MAX_HEADER_CHARS = 16 * 1024
_MAX_PARTS = 200
_MAX_BOUNDARIES = 100
_MAX_MIME_DEPTH = 20
_MAX_MARKER_CHARS = 400  # longer lines are text, never a quote header or signature
_SIGNATURE_MAX_WORDS = 7

# Headers read for the verdict and threading; names are lowercase throughout.
_HEADER_NAMES = (
    "from", "subject", "message-id", "in-reply-to", "references", "content-type",
    "auto-submitted", "x-autoreply", "x-autorespond", "x-autoresponder", "precedence",
    "list-id", "list-unsubscribe", "x-hitl-event",
)  # fmt: skip
_NULL_PRECEDENCE = {"bulk", "junk", "list", "auto_reply", "auto-reply"}
_BOUNCE_LOCAL_PARTS = {"mailer-daemon", "postmaster"}
_AUTO_SUBJECT = re.compile(
    r"auto ?:|(?:auto(?:matic)?[ -]?(?:reply|response)|out of (?:the )?office"
    r"|abwesenheit(?:snotiz)?|automatische antwort|réponse automatique|absence|respuesta automática"
    r"|risposta automatica|automatisch antwoord|fuera de la oficina|resposta automática"
    r"|afwezig|autosvar)\b",
    re.IGNORECASE,
)
_MESSAGE_ID = re.compile(r"<([^<>\s]+)>")
_BARE_ID = re.compile(r"[^\s,;<>]+@[^\s,;<>]+")
_ADDRESS = re.compile(r"[^\s<>()\",;:]+@[^\s<>()\",;:]+")
_DATE_OR_ADDRESS = re.compile(r"[0-9@]")
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")
_TAG_START = re.compile(r"<(?:/?[a-zA-Z]|!|\?)")
_TAG_NAME = re.compile(r"/?([a-zA-Z][a-zA-Z0-9:-]*)")
_ATTRIBUTE = re.compile(r"""\s(id|class)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)

# U+00A0 reads as a space; zero-width characters, the BOM and NUL read as nothing
# (PostgreSQL text cannot hold NUL, and no person types one).
_INVISIBLE = {
    0xA0: " ",
    0x200B: None,
    0x200C: None,
    0x200D: None,
    0x2060: None,
    0xFEFF: None,
    0x00: None,
}

# (how the line starts, the verb it must contain); it must also end with ":".
_ATTRIBUTIONS = (
    ("on ", "wrote"), ("on ", "writes"), ("le ", "a écrit"), ("am ", "schrieb"),
    ("el ", "escribió"), ("il ", "scritto"), ("op ", "schreef"), ("em ", "escreveu"),
    ("den ", "skrev"), ("w dniu ", "pisze"),
)  # fmt: skip
_ATTRIBUTION_VERBS = tuple(dict.fromkeys(verb for _, verb in _ATTRIBUTIONS))
_HISTORY_MARKERS = {
    "original message", "ursprüngliche nachricht", "message d'origine", "mensaje original",
    "messaggio originale", "oorspronkelijk bericht", "mensagem original", "forwarded message",
    "weitergeleitete nachricht", "begin forwarded message", "message transféré",
    "anfang der weitergeleiteten nachricht", "début du message réexpédié",
}  # fmt: skip
_FROM_KEYS = {"from", "von", "de", "da", "van", "från", "fra", "od"}
_HEADER_KEYS = {
    "sent", "date", "to", "cc", "subject", "reply-to", "gesendet", "datum", "an", "betreff",
    "envoyé", "à", "objet", "enviado", "enviada", "fecha", "para", "asunto", "assunto",
    "inviato", "data", "a", "oggetto", "verzonden", "aan", "onderwerp", "skickat", "ämne",
}  # fmt: skip
# (start, end) of a mobile client's signature line; "" matches anything.
_MOBILE_SIGNATURES = (
    ("sent from my ", ""), ("sent from outlook", ""), ("sent from mail for ", ""),
    ("sent from yahoo mail", ""), ("get outlook for ", ""), ("envoyé de mon ", ""),
    ("envoyé depuis mon ", ""), ("envoyé à partir de ", ""), ("von meinem ", "gesendet"),
    ("gesendet von meinem ", ""), ("enviado desde mi ", ""), ("enviado do meu ", ""),
    ("enviado de meu ", ""), ("inviato dal mio ", ""), ("inviato da ", ""),
    ("verzonden vanaf mijn ", ""), ("verstuurd vanaf mijn ", ""), ("skickat från min ", ""),
)  # fmt: skip

# HTML: containers holding quoted history or a signature, and markers after which
# everything is history (Outlook's reply header and its relatives).
_RAW_TEXT_ENDS = {tag: re.compile(rf"</{tag}\s*>", re.I) for tag in ("script", "style", "title")}
_DROPPED_CLASSES = {"gmail_quote", "gmail_signature", "yahoo_quoted", "moz-signature"}
_HISTORY_IDS = {"divrplyfwdmsg", "appendonsend", "mail-editor-reference-message-container"}
_BLOCK_TAGS = {
    "p", "div", "br", "tr", "li", "ul", "ol", "table", "hr", "pre", "section", "article",
    "h1", "h2", "h3", "h4", "h5", "h6", "dl", "dt", "dd", "address", "center",
}  # fmt: skip


@dataclass(frozen=True)
class ParsedReply:
    """What an inbound message says, as far as it could be read."""

    message_id: str | None
    from_address: str | None
    subject: str
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    machine_reason: str | None
    text: str
    first_line: str
    malformed: str | None = None  # why the message cannot be read safely, if it cannot


def parse_reply(
    raw: bytes,
    *,
    envelope_from: str | None,
    own_addresses: Collection[str] = (),
    own_domains: Collection[str] = (),
) -> ParsedReply:
    """Parse one raw message; ``envelope_from`` is the SMTP MAIL FROM (None or "" if null)."""
    # The stdlib's MIME parser slows quadratically with nesting and recurses once per
    # level; a person's reply has a handful of boundaries, so past the cap only the
    # headers are read.
    raw = bytes(raw)
    simple = raw.lower().count(b"boundary") <= _MAX_BOUNDARIES
    # One parse with the stdlib's compat32 policy (the one mail-parser uses too),
    # headers decoded with mail-parser's helpers; the slower header-object policy
    # and mail-parser's full parse are not needed on this path.
    message = _parse_with_stdlib(raw, headers_only=not simple)
    headers = _read_headers(message)
    body = _body(message)
    if simple and not body.strip():
        body = _body_from_mailparser(_parse_with_mailparser(raw))
    text = extract_new_text(body)
    return ParsedReply(
        message_id=next(iter(_message_ids(headers.get("message-id", ""))), None),
        from_address=_addr_spec(headers.get("from", "")),
        subject=" ".join(headers.get("subject", "").split()),
        in_reply_to=_message_ids(headers.get("in-reply-to", "")),
        references=_message_ids(headers.get("references", "")),
        machine_reason=machine_reason(
            headers,
            envelope_from=envelope_from,
            own_addresses=own_addresses,
            own_domains=own_domains,
        ),
        text=text,
        first_line=next((line.strip() for line in text.split("\n") if line.strip()), ""),
    )


# --- machine mail -----------------------------------------------------------------------


def machine_reason(
    headers: Mapping[str, str],
    *,
    envelope_from: str | None,
    own_addresses: Collection[str] = (),
    own_domains: Collection[str] = (),
) -> str | None:
    """Why this message was written by a machine (or by us), or None for a person's mail.

    ``headers`` maps header names (any case) to decoded values; ``envelope_from`` is
    the SMTP MAIL FROM, where None, "" and "<>" all mean the null reverse-path of a
    bounce. The first reason found wins: own mail, bounce, automatic-mail headers,
    list headers, then an auto-reply subject. ``List-Unsubscribe``
    counts as machine mail: RFC 2369/8058 headers are written by list managers and
    bulk senders, never by a client replying for a person, and taking an auto-reply
    as the answer would be irrevocable (a request is answered once). Deliberately
    *not* machine: ``Auto-Submitted: no`` (RFC 3834's value for a person) and
    ``X-Auto-Response-Suppress``, which Outlook puts on ordinary human replies.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    sender = _address(lowered.get("from", ""))
    return (
        _own_mail(lowered, sender, own_addresses, own_domains)
        or _bounce(lowered, sender, envelope_from)
        or _auto_header(lowered)
        or _auto_subject(lowered.get("subject", ""))
    )


def _own_mail(
    headers: Mapping[str, str], sender: str, addresses: Collection[str], domains: Collection[str]
) -> str | None:
    # Every mail the daemon sends carries X-HITL-Event (SPEC §5): never answer ourselves.
    if "x-hitl-event" in headers:
        return "own-mail"
    if sender and sender in {address.strip().lower() for address in addresses}:
        return "own-mail"
    domain = sender.rpartition("@")[2]
    if domain and domain in {d.strip().lstrip("@").lower() for d in domains}:
        return "own-mail"
    return None


def _bounce(headers: Mapping[str, str], sender: str, envelope_from: str | None) -> str | None:
    # RFC 5321 §4.5.5: delivery reports go out with a null reverse-path.
    envelope = (envelope_from or "").strip().strip("<>").strip().lower()
    if not envelope:
        return "bounce:null-sender"
    if headers.get("content-type", "").strip().lower().startswith("multipart/report"):
        return "bounce:report"
    local_parts = {sender.partition("@")[0], envelope.partition("@")[0]}
    if local_parts & _BOUNCE_LOCAL_PARTS:
        return "bounce:mailer-daemon"
    return None


def _auto_header(headers: Mapping[str, str]) -> str | None:
    # RFC 3834 §5: any Auto-Submitted value but "no" marks automatic mail.
    submitted = headers.get("auto-submitted")
    if submitted is not None and submitted.split(";")[0].strip().lower() not in {"no", ""}:
        return "auto-submitted"
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder"):
        value = headers.get(name)
        if value is not None and value.strip().lower() not in {"no", "false", "0"}:
            return name
    precedence = headers.get("precedence", "").strip().lower()
    if precedence in _NULL_PRECEDENCE:
        return f"precedence:{precedence}"
    return next((name for name in ("list-id", "list-unsubscribe") if name in headers), None)


def _auto_subject(subject: str) -> str | None:
    # Anchored at the start: a person's reply begins "Re:", so a notification about an
    # "absence request" cannot make its answers look automatic.
    normalised = unicodedata.normalize("NFC", subject[:_MAX_MARKER_CHARS]).strip()
    return "auto-reply-subject" if _AUTO_SUBJECT.match(normalised) else None


# --- headers ----------------------------------------------------------------------------


def _parse_with_mailparser(raw: bytes) -> Any:
    try:
        return mailparser.parse_from_bytes(raw)
    except Exception:  # MailParserRecursionError and others on hostile input
        logger.info("mail-parser could not read a message either")
        return None


def _parse_with_stdlib(raw: bytes, *, headers_only: bool) -> Message | None:
    try:
        parser = BytesParser(policy=email.policy.compat32)
        return parser.parsebytes(raw, headersonly=headers_only)
    except Exception:  # includes RecursionError on absurdly nested multiparts
        logger.info("the stdlib could not parse a message")
        return None


def _read_headers(message: Message | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if message is None:
        return headers
    for name in _HEADER_NAMES:
        value = _header(message, name)
        if value is not None:
            headers[name] = value[:_MAX_HEADER_CHARS].replace("\x00", "")
    return headers


def _header(message: Message, name: str) -> str | None:
    """The first value of one header, with encoded words decoded; None when absent."""
    try:
        values = message.get_all(name)
    except Exception:  # a crafted header the parser kept but cannot hand back
        return None
    if not values:
        return None
    try:
        return str(mailparser_utils.decode_header_part(values[0]))
    except Exception:  # undecodable words: the raw text is still better than nothing
        return str(values[0])


def _message_ids(value: str) -> tuple[str, ...]:
    """Message ids without <>, from any of the comma, space, folded or bare forms seen."""
    found = _MESSAGE_ID.findall(value) or _BARE_ID.findall(value)
    return tuple(dict.fromkeys(found))


def _address(value: str) -> str:
    """The first address in a From-like header value, lowercased, or ""."""
    try:
        candidates = [address for _, address in getaddresses([value]) if address]
    except Exception:  # getaddresses has raised on crafted input in some releases
        candidates = []
    candidates += _ADDRESS.findall(value)
    with_domain = [c for c in candidates if "@" in c]
    return (with_domain or candidates or [""])[0].strip().lower()


def _addr_spec(value: str) -> str | None:
    address = _address(value)
    return address if "@" in address else None


# --- body -------------------------------------------------------------------------------


def _body(message: Message | None) -> str:
    try:
        return _body_from_message(message) if message is not None else ""
    except Exception:  # a MIME tree malformed beyond what the stdlib tolerates
        logger.info("the stdlib could not walk a message body")
        return ""


def _body_from_message(message: Message) -> str:
    """The first inline text/plain part with content, else the first text/html part as text."""
    html: str | None = None
    for part in _inline_text_parts(message):
        if part.get_content_subtype() == "plain":
            text = _decode_part(part)
            if text.strip():
                return text
        elif part.get_content_subtype() == "html" and html is None:
            html = _decode_part(part)
    return html_to_text(html) if html else ""


def _body_from_mailparser(parsed: Any) -> str:
    # mail-parser recovers parts the stdlib leaves in a broken multipart's epilogue.
    try:
        plain = [text for text in parsed.text_plain if text.strip()]
        html = [text for text in parsed.text_html if text.strip()]
    except Exception:  # no parse at all, or a half-built one
        return ""
    if plain:
        return str(plain[0])[:MAX_PART_CHARS]
    return html_to_text(str(html[0])) if html else ""


def _inline_text_parts(message: Message) -> Iterator[Message]:
    """Text parts in document order, not looking into attachments or attached messages."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    for _ in range(_MAX_PARTS):
        if not stack:
            return
        part, depth = stack.pop()
        if part.get_content_disposition() == "attachment":
            continue
        maintype = part.get_content_maintype()
        payload = part.get_payload()
        if maintype == "multipart" and isinstance(payload, list) and depth < _MAX_MIME_DEPTH:
            children = [child for child in payload if isinstance(child, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))
        elif maintype == "text":
            yield part


def _decode_part(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
        charset = part.get_content_charset()
        flowed = str(part.get_param("format", "")).lower() == "flowed"
        delsp = str(part.get_param("delsp", "")).lower() == "yes"
    except Exception:  # broken parameters or transfer encoding: nothing readable
        return ""
    if not isinstance(payload, bytes):
        return ""
    text = _decode_bytes(payload, charset)[:MAX_PART_CHARS].replace("\r\n", "\n")
    if flowed and part.get_content_subtype() == "plain":
        text = _unflow(text, delsp=delsp)
    return text


def _decode_bytes(payload: bytes, charset: str | None) -> str:
    """Decode with the declared charset, else UTF-8, else windows-1252, else latin-1.

    Strict at each step, so a wrong or unknown label (``x-unknown``) falls through
    to the next guess instead of filling the text with replacement characters;
    latin-1 decodes any byte, so the chain always ends with text.
    """
    for candidate in (charset, "utf-8", "windows-1252"):
        if not candidate:
            continue
        try:
            text = payload.decode(candidate)
            text.encode("utf-8")  # some codecs yield lone surrogates, which are not text
        except (LookupError, UnicodeError, ValueError):
            continue
        return text
    return payload.decode("latin-1")


def _unflow(text: str, *, delsp: bool) -> str:
    """Join the soft-broken lines of a ``format=flowed`` text (RFC 3676 §4)."""
    out: list[str] = []
    paragraph: list[str] = []
    paragraph_depth = 0
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        content = content[1:] if content.startswith(" ") else content  # §4.4 space-stuffing
        flowed = content.endswith(" ") and content != "-- "
        if paragraph and depth != paragraph_depth:  # §4.5: a depth change ends a paragraph
            out.append(_requote(paragraph_depth, paragraph))
            paragraph = []
        paragraph.append(content[:-1] if flowed and delsp else content)
        paragraph_depth = depth
        if not flowed:
            out.append(_requote(depth, paragraph))
            paragraph = []
    if paragraph:
        out.append(_requote(paragraph_depth, paragraph))
    return "\n".join(out)


def _requote(depth: int, pieces: list[str]) -> str:
    return ">" * depth + " " + "".join(pieces) if depth else "".join(pieces)


# --- new text ---------------------------------------------------------------------------


def extract_new_text(body: str) -> str:
    """The new text of a plain-text reply body: no quoted history, no signature.

    Only the first ``MAX_TEXT_CHARS`` characters and ``MAX_TEXT_LINES`` lines are read.
    """
    text = body[:MAX_TEXT_CHARS].replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    lines = text.split("\n", MAX_TEXT_LINES)[:MAX_TEXT_LINES]
    return _tidy(list(_new_lines(lines)))


def _new_lines(lines: list[str]) -> Iterator[str]:
    """Unquoted lines up to the first signature or history marker (top- or bottom-posted)."""
    index = 0
    while index < len(lines):
        line = lines[index]
        if _is_quoted(line):
            index += 1
            continue
        if _ends_new_text(lines, index):
            return
        span = _attribution_span(lines, index)
        if span and not _quote_follows(lines, index + span):
            return  # the history below is not marked with ">": all of it is history
        if not span:
            yield line
        index += max(span, 1)


def _tidy(lines: list[str]) -> str:
    stripped = [line.rstrip() for line in lines]
    while stripped and not stripped[-1]:
        stripped.pop()
    start = next((i for i, line in enumerate(stripped) if line), len(stripped))
    return "\n".join(stripped[start:])


def _is_quoted(line: str) -> bool:
    return line.lstrip(" ").startswith(">")


def _quote_follows(lines: list[str], start: int) -> bool:
    following = (line for line in lines[start : start + 4] if line.strip())
    return _is_quoted(next(following, ""))


def _ends_new_text(lines: list[str], index: int) -> bool:
    line = lines[index].strip()
    if not line or len(line) > _MAX_MARKER_CHARS:
        return False
    lowered = line.lower()
    return (
        _is_signature(lowered)
        or lowered.strip("-=_*: ") in _HISTORY_MARKERS
        or _is_header_block(lines, index)
        or (len(line) >= 20 and not line.strip("_") and _header_follows(lines, index + 1))
    )


def _is_signature(lowered: str) -> bool:
    # RFC 3676 §4.3: "-- " alone on a line opens the signature; many clients drop the space.
    if lowered == "--":
        return True
    if len(lowered.split()) > _SIGNATURE_MAX_WORDS:
        return False
    words = lowered.rstrip(".!")
    return any(words.startswith(s) and words.endswith(e) for s, e in _MOBILE_SIGNATURES)


def _header_key(line: str) -> str:
    stripped = line.strip().lstrip("*")
    colon = stripped.find(":", 0, 24)
    return stripped[:colon].strip(" *").lower() if colon > 0 else ""


def _is_header_block(lines: list[str], index: int) -> bool:
    """An Outlook-style "From: / Sent: / To: / Subject:" block, in any of several languages."""
    if _header_key(lines[index]) not in _FROM_KEYS:
        return False
    following = lines[index + 1 : index + 8]
    return sum(_header_key(line) in _HEADER_KEYS for line in following) >= 2


def _header_follows(lines: list[str], start: int) -> bool:
    following = [i for i in range(start, min(start + 3, len(lines))) if lines[i].strip()]
    return bool(following) and _is_header_block(lines, following[0])


def _attribution_span(lines: list[str], index: int) -> int:
    """How many lines the "On … wrote:" header at ``index`` spans (Gmail wraps it), or 0.

    A dated header ("On 3 Nov 2026, X wrote:") marks history even with no ">" below
    it; a bare one-line "X wrote:" only when quoted lines follow.
    """
    first = lines[index].strip()
    if first.endswith(":") and len(first) <= _MAX_MARKER_CHARS:
        tail = first[-40:].lower()
        if any(verb in tail for verb in _ATTRIBUTION_VERBS) and _quote_follows(lines, index + 1):
            return 1
    pieces: list[str] = []
    for line in lines[index : index + 3]:
        stripped = line.strip()
        if not stripped or len(stripped) > _MAX_MARKER_CHARS:
            return 0
        pieces.append(stripped)
        if stripped.endswith(":") and _is_dated_attribution(" ".join(pieces).lower()):
            return len(pieces)
    return 0


def _is_dated_attribution(text: str) -> bool:
    return bool(_DATE_OR_ADDRESS.search(text)) and any(
        text.startswith(start) and verb in text for start, verb in _ATTRIBUTIONS
    )


# --- HTML -------------------------------------------------------------------------------


def html_to_text(html: str) -> str:
    """Readable text of an HTML body, without its quoted history.

    Dropped: Gmail's ``gmail_quote``, Apple's and Thunderbird's ``<blockquote
    type="cite">`` and every other ``<blockquote>``, the signatures Gmail and
    Thunderbird mark, and Outlook's ``divRplyFwdMsg`` / ``appendonsend`` with
    everything after them. Only the first ``MAX_PART_CHARS`` characters are read.

    A small scanner rather than ``html.parser``, which under Python 3.11.7 spends
    over a minute on 64 KiB of ``<a <a <a …`` (it rescans unfinished tags; compare
    CVE-2025-6069). Here each search for ``>`` starts past the previous one.
    """
    markup = html[:MAX_PART_CHARS]
    text = _HtmlText()
    position = text_from = 0
    closing = -1
    while not text.stopped:
        opening = markup.find("<", position)
        if opening < 0:
            text.data(markup[text_from:])
            break
        if not _TAG_START.match(markup, opening):  # a "<" in running text
            position = opening + 1
            continue
        text.data(markup[text_from:opening])
        if closing <= opening:
            closing = markup.find(">", opening + 1)
            closing = len(markup) if closing < 0 else closing
        position = text_from = _read_tag(markup, opening, closing, text)
    return text.result()


def _read_tag(markup: str, opening: int, closing: int, text: _HtmlText) -> int:
    """Hand the tag at ``opening`` (ending at ``closing``) to ``text``; return where to go on."""
    if markup.startswith("<!--", opening):
        end = markup.find("-->", opening + 4)
        return len(markup) if end < 0 else end + 3
    name = _TAG_NAME.match(markup, opening + 1)
    if name is None or closing >= len(markup):  # doctype, CDATA, instruction; or unterminated
        return closing + 1
    tag = name.group(1).lower()
    if name.group(0).startswith("/"):
        text.end(tag)
    elif tag in _RAW_TEXT_ENDS:  # script, style, title: their content is neither text nor tags
        raw_end = _RAW_TEXT_ENDS[tag].search(markup, closing + 1)
        return len(markup) if raw_end is None else raw_end.end()
    else:
        inner = markup[name.end() : closing]
        text.start(tag, _ATTRIBUTE.findall(inner), self_closing=inner.endswith("/"))
    return closing + 1


class _HtmlText:
    """The text of the tags and data it is handed, skipping dropped containers."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.stopped = False  # past a marker after which everything is history
        self._skip_tag = ""  # the dropped container we are in, counted by its nesting
        self._skip_depth = 0
        self._pre = 0

    def start(
        self, tag: str, attributes: list[tuple[str, str, str, str]], *, self_closing: bool
    ) -> None:
        if self._skip_depth:
            self._skip_depth += tag == self._skip_tag and not self_closing
            return
        values = [(name.lower(), "".join(value).lower()) for name, *value in attributes]
        classes = {c for name, value in values if name == "class" for c in value.split()}
        if any(name == "id" and value in _HISTORY_IDS for name, value in values):
            self.stopped = True
        elif (tag == "blockquote" or classes & _DROPPED_CLASSES) and not self_closing:
            self._skip_tag, self._skip_depth = tag, 1
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")
            self._pre += tag == "pre" and not self_closing

    def end(self, tag: str) -> None:
        if self._skip_depth:
            self._skip_depth -= tag == self._skip_tag
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")
            self._pre -= tag == "pre" and self._pre > 0

    def data(self, data: str) -> None:
        if data and not self._skip_depth:
            data = unescape(data)
            self.chunks.append(data if self._pre else _HTML_SPACE.sub(" ", data))

    def result(self) -> str:
        lines = [line.strip() for line in "".join(self.chunks).translate(_INVISIBLE).split("\n")]
        kept = [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]
        return _tidy(kept)
