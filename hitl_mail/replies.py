"""Read a raw inbound reply: who sent it, whether a machine did, and the new text it carries.

This module's single job is ``raw bytes -> ParsedReply``: the threading headers,
a verdict on machine mail (auto-replies, bounces, lists, our own mail), and the
*new text* of the reply with quoted history and signature removed, whose first
non-empty line is the feedback. It never raises on malformed input: whatever
cannot be read is left empty, and what cannot be read *safely* is named in
``malformed`` (answering refuses such a reply before any other check).

The sender is read strictly from the raw From header (senders.py); a From
that is not exactly one mailbox leaves ``from_address`` None and says why in
``from_error``. MIME comes from the stdlib ``email`` package with the compat32
policy, which decodes nothing by itself; encoded words (RFC 2047), charsets and
``format=flowed`` (RFC 3676) are decoded here. No third-party parser is on this
path: mail-parser, used before, logged raw header values at WARNING and DEBUG
and decoded encoded words and RFC 2231 values with whatever charset they named.

Charsets are an allow-list (`ALLOWED_CHARSETS`, canonical codec names, aliases
resolved with ``codecs.lookup``): the charsets mail is written in, whose
decoders are linear. A message that names any other codec as a charset, in a
MIME parameter, an RFC 2231 value or an encoded word, is ``malformed``:
``punycode`` is quadratic (a 1 MB body costs minutes), and the rest
(``idna``, ``unicode_escape``, ``*_codec``, ``rot13``, ...) are no charsets
of any mail client. It is checked on the raw bytes before the stdlib parses
them, because the stdlib itself decodes RFC 2231 boundary and charset values
with the charset they name. An unknown label (``x-unknown``, a typo) is read
as if unlabelled: UTF-8, else windows-1252, else latin-1, all linear, because
mislabelled mail is common and harmless. A ``Content-Type`` or
``Content-Disposition`` field over 4 KiB or 64 parameters is ``malformed``
too: the stdlib's parameter parser is quadratic in them (100 KB of ``;``
inside quotes took 40 s).

Work is bounded and linear: scans go line by line, regular expressions are flat.
A header section over 256 KiB is malformed (real ones stay under 64 KiB, Received
and DKIM lines included), and only its first 256 KiB are parsed for the threading
headers. Only the first 1 MiB after the header section is parsed; header values are cut
to 16 Ki characters and a part's bytes to 1 MiB *before* decoding; a decoded
text part is cut to ``MAX_PART_CHARS`` (256 Ki characters; HTML markup
likewise), only its first ``MAX_TEXT_CHARS`` (64 Ki) and ``MAX_TEXT_LINES`` (2,000)
are searched for the new text. The stdlib's MIME parser checks every line against
every enclosing boundary, so a message with more than 100 boundaries, more than
1,000 delimiter lines, or more than 250,000 (boundaries x lines) is read for its
headers only, and its text is empty (a 1 MB reply with attachments makes ~70,000). An answer sits at the top of a reply or under
a short quote, so the caps cost nothing a person types by hand.
"""

from __future__ import annotations

import binascii
import codecs
import email.policy
import functools
import logging
import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from html import unescape

from hitl_mail import senders

logger = logging.getLogger(__name__)

MAX_PART_CHARS = 256 * 1024
MAX_TEXT_CHARS = 64 * 1024
MAX_TEXT_LINES = 2000
_MAX_HEADER_CHARS = 16 * 1024
_MAX_BODY_BYTES = 4 * MAX_PART_CHARS  # parsed after the header section; the rest is never read
_MAX_PART_BYTES = 4 * MAX_PART_CHARS  # of a part, before decoding (4: UTF-32's bytes per char)
_MAX_PARTS = 200
_MAX_BOUNDARIES = 100
_MAX_DELIMITERS = 1000
_MAX_LINE_CHECKS = 250_000  # boundaries x lines: the stdlib's cost of splitting the parts
_MAX_MIME_FIELD = 4096  # octets of a Content-Type or Content-Disposition field
_MAX_MIME_PARAMS = 64
_MAX_CHARSETS = 32  # distinct charset labels in one message
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
# Matches start only where a run of word characters starts (the look-behind), so a
# long run without "@" is scanned once, not once per position.
_BARE_ID = re.compile(r"(?<![^\s,;<>])[^\s,;<>@]+@[^\s,;<>]+")
_ADDRESS = re.compile(r"(?<![^\s<>()\",;:])[^\s<>()\",;:@]+@[^\s<>()\",;:]+")
_DATE_OR_ADDRESS = re.compile(r"[0-9@]")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# RFC 2047 section 2; the charset may carry an RFC 2231 language ("utf-8*en").
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
# Where a message names a charset: a MIME parameter, an RFC 2231 extended value
# (charset'language'value), an encoded word.
_CHARSET_LABEL = re.compile(
    rb"charset\s*=\s*\"?([^\s\"';()<>,]{1,64})"
    rb"|\*\s*=\s*\"?([^\s\"';]{1,64})'"
    rb"|=\?([^?*\s]{1,64})[*?]",
    re.IGNORECASE,
)
# A Content-Type or Content-Disposition field of any part, with its continuation lines
# (the stdlib breaks lines at CR, LF and CRLF alike).
_MIME_FIELD = re.compile(
    rb"(?<![^\r\n])content-(?:type|disposition)[ \t]*:"
    rb"[^\r\n]*(?:(?:\r\n|\r|\n)[ \t][^\r\n]*)*",
    re.IGNORECASE,
)
_MAINTYPES = {
    "multipart", "message", "text", "application", "image", "audio", "video", "font", "model",
}  # fmt: skip
# A multipart delimiter line, its boundary as RFC 2046 allows it (the space aside).
_DELIMITER_LINE = re.compile(r"^--([0-9A-Za-z'()+_,./:=?-]{1,70})[ \t]*\r?$", re.MULTILINE)
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")
_TAG_START = re.compile(r"<(?:/?[a-zA-Z]|!|\?)")
_TAG_NAME = re.compile(r"/?([a-zA-Z][a-zA-Z0-9:-]*)")
_ATTRIBUTE = re.compile(r"""\s(id|class)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.I)

# The charsets mail is written in, as canonical codec names; all decode in linear time.
# Not here, on purpose: utf-7, hz, iso-2022-kr/cn (escape-based, dropped by the WHATWG
# Encoding Standard), and every codec that is no charset (punycode, idna, *_codec, ...).
ALLOWED_CHARSETS = frozenset(
    codecs.lookup(label).name
    for label in (
        "utf-8", "us-ascii", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
        "utf-32-be", "iso-8859-1", "iso-8859-2", "iso-8859-3", "iso-8859-4", "iso-8859-5",
        "iso-8859-6", "iso-8859-7", "iso-8859-8", "iso-8859-9", "iso-8859-10", "iso-8859-11",
        "iso-8859-13", "iso-8859-14", "iso-8859-15", "iso-8859-16", "windows-1250",
        "windows-1251", "windows-1252", "windows-1253", "windows-1254", "windows-1255",
        "windows-1256", "windows-1257", "windows-1258", "cp874", "koi8-r", "koi8-u", "cp866",
        "cp437", "cp850", "mac-roman", "mac-cyrillic", "tis-620", "gb2312", "gbk", "gb18030",
        "big5", "big5hkscs", "cp950", "shift_jis", "cp932", "shift_jis_2004", "euc-jp",
        "euc_jis_2004", "iso-2022-jp", "iso-2022-jp-2", "euc-kr", "cp949",
    )
)  # fmt: skip

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
# An attribution's opening word, capitalised, after other text on its line; tried so often.
_INNER_TRIES = 3
_INNER_OPENING = re.compile(
    r"(?<=[\W\d_])("
    + "|".join(dict.fromkeys(re.escape(start.capitalize()) for start, _ in _ATTRIBUTIONS))
    + ")"
)
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
    from_error: str | None = None  # why From names no one mailbox (then from_address is None)


class _Unsafe(Exception):
    """Reading on would be unsafe (a charset not allowed); the message says why."""


def parse_reply(
    raw: bytes,
    *,
    envelope_from: str | None,
    own_addresses: Collection[str] = (),
    own_domains: Collection[str] = (),
) -> ParsedReply:
    """Parse one raw message; ``envelope_from`` is the SMTP MAIL FROM (None or "" if null)."""
    raw = bytes(raw)
    try:
        from_address, from_error = senders.sender_of(raw).encode().lower().decode(), None
    except senders.BadSender as refused:
        from_address, from_error = None, str(refused)
    message, malformed, truncated = _parse_mime(raw)
    headers, unsafe_header = _read_headers(message, decode=malformed is None)
    malformed = malformed or unsafe_header
    body = ""
    if malformed is None:
        try:
            body = _body(message, truncated=truncated)
        except _Unsafe as unsafe:
            malformed = str(unsafe)
    headers["from"] = from_address or ""  # machine_reason reads the strict address only
    text = extract_new_text(body)
    return ParsedReply(
        message_id=next(iter(_message_ids(headers.get("message-id", ""))), None),
        from_address=from_address,
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
        malformed=malformed,
        from_error=from_error,
    )


def _parse_mime(raw: bytes) -> tuple[Message | None, str | None, bool]:
    """The message as the stdlib's compat32 policy parses it (it decodes nothing by itself),
    why it is malformed if it is, and whether it was cut before parsing."""
    head = _HEADER_END.search(raw)
    head_end = head.end() if head else len(raw)
    parsed = raw[: head_end + _MAX_BODY_BYTES]
    malformed = _unsafe_to_parse(parsed, head_end)
    if malformed or not _simple(parsed):
        headers = raw[: min(head_end, senders.MAX_HEADER_SECTION)]
        return _parse_with_stdlib(headers, headers_only=True), malformed, True
    return _parse_with_stdlib(parsed, headers_only=False), None, len(parsed) < len(raw)


def _unsafe_to_parse(raw: bytes, head_end: int) -> str | None:
    """Why handing ``raw`` to the stdlib's parser, or decoding it, would be unsafe; or None."""
    if head_end > senders.MAX_HEADER_SECTION:  # the stdlib spends ~1.5 us on each field
        return f"a header section over {senders.MAX_HEADER_SECTION // 1024} KiB"
    labels: set[bytes] = set()
    for found in _CHARSET_LABEL.finditer(raw):
        labels.add((found[1] or found[2] or found[3]).lower())
        if len(labels) > _MAX_CHARSETS:
            return f"more than {_MAX_CHARSETS} charsets named"
    try:
        for label in labels:
            _codec(label.decode("latin-1"))
    except _Unsafe as unsafe:
        return str(unsafe)
    for field in _MIME_FIELD.finditer(raw):
        if len(field[0]) > _MAX_MIME_FIELD or field[0].count(b";") > _MAX_MIME_PARAMS:
            return "a Content-Type or Content-Disposition field too long to read safely"
    return None


def _simple(raw: bytes) -> bool:
    """Whether the stdlib may split the parts: it checks each line against each boundary."""
    boundaries = raw.lower().count(b"boundary")
    lines = raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") + 1
    delimiters = raw.count(b"\n--") + raw.count(b"\r--")
    return (
        boundaries <= _MAX_BOUNDARIES
        and delimiters <= _MAX_DELIMITERS
        and boundaries * lines <= _MAX_LINE_CHECKS
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


def _parse_with_stdlib(raw: bytes, *, headers_only: bool) -> Message | None:
    try:
        parser = BytesParser(policy=email.policy.compat32)
        return parser.parsebytes(raw, headersonly=headers_only)
    except Exception:  # includes RecursionError on absurdly nested multiparts
        logger.info("the stdlib could not parse a message")
        return None


def _read_headers(message: Message | None, *, decode: bool) -> tuple[dict[str, str], str | None]:
    """The first value of each header read, cut, then decoded; and why one was unsafe, if so."""
    headers: dict[str, str] = {}
    unsafe: str | None = None
    if message is None:
        return headers, None
    for name, value in message.raw_items():
        key = str(name).lower()
        if key not in _HEADER_NAMES or key in headers:
            continue
        cut = str(value)[:_MAX_HEADER_CHARS]  # before decoding: decoding never sees more
        try:
            headers[key] = _decode_header(cut, decode_words=decode).replace("\x00", "")
        except _Unsafe as exc:
            headers[key], unsafe = "", unsafe or str(exc)
    return headers, unsafe


def _decode_header(value: str, *, decode_words: bool) -> str:
    """A raw header value as text: 8-bit bytes as UTF-8 (RFC 6532) or a legacy charset."""
    data = value.encode("utf-8", "surrogateescape")  # the parser kept 8-bit bytes as surrogates
    text = _decode_bytes(data, None, cut=len(value) >= _MAX_HEADER_CHARS)
    return _decode_words(text) if decode_words else text


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; white space between two of them goes (section 6.2).

    Adjacent words in one charset are decoded together, since clients split a
    multibyte character across words. A word in a charset not allowed raises `_Unsafe`.
    """
    pieces: list[str] = []
    run, run_charset = bytearray(), ""
    position, after_word = 0, False
    for word in _ENCODED_WORD.finditer(value):
        gap = value[position : word.start()]
        charset = word[1].partition("*")[0].lower()
        data = _word_bytes(word[2], word[3])
        if data is None or charset != run_charset or not after_word or gap.strip(" \t\r\n"):
            pieces.append(_decode_bytes(bytes(run), run_charset) if run else "")
            run, run_charset = bytearray(), charset
            if not after_word or gap.strip(" \t\r\n"):
                pieces.append(gap)
        if data is None:  # not decodable: kept as written
            pieces.append(word[0])
            after_word = False
        else:
            run += data
            after_word = True
        position = word.end()
    pieces.append(_decode_bytes(bytes(run), run_charset) if run else "")
    pieces.append(value[position:])
    return "".join(pieces)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    data = text.encode("utf-8", "surrogateescape")
    try:
        if encoding in "qQ":
            return binascii.a2b_qp(data, header=True)
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def _message_ids(value: str) -> tuple[str, ...]:
    """Message ids without <>, from any of the comma, space, folded or bare forms seen."""
    found = _MESSAGE_ID.findall(value) or _BARE_ID.findall(value)
    return tuple(dict.fromkeys(found))


def _address(value: str) -> str:
    """The address of a From-like header value, lowercased: read strictly, else the first
    address-like word (machine mail is told apart with it, never a sender trusted), or ""."""
    try:
        return senders.mailbox(value).encode().lower().decode()  # ASCII letters only
    except senders.BadSender:
        found = _ADDRESS.search(value[:_MAX_HEADER_CHARS])
        return found[0].lower() if found else ""


# --- body -------------------------------------------------------------------------------


def _body(message: Message | None, *, truncated: bool) -> str:
    """``truncated``: the message was cut, so its last part may end inside a character."""
    try:
        return _body_from_message(message, truncated) if message is not None else ""
    except _Unsafe:
        raise
    except Exception:  # a MIME tree malformed beyond what the stdlib tolerates
        logger.info("the stdlib could not walk a message body")
        return ""


def _body_from_message(message: Message, truncated: bool) -> str:
    """The first inline text/plain part with content, else the first text/html part as text."""
    html: str | None = None
    for part in _inline_text_parts(message):
        kind = _text_kind(part)
        if kind == "plain":
            text = _decode_part(part, truncated)
            if text.strip():
                return text
        elif kind == "html" and html is None:
            html = _decode_part(part, truncated)
    return html_to_text(html) if html else ""


def _inline_text_parts(message: Message) -> Iterator[Message]:
    """Text parts in document order, not looking into attachments or attached messages."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    resplit = False
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
        elif maintype == "multipart" and isinstance(payload, str) and not resplit:
            resplit = True  # once a message: the stdlib could not split it (boundary missing)
            stack.extend((child, depth + 1) for child in _resplit(part, payload))
        elif _text_kind(part) is not None:
            yield part


def _text_kind(part: Message) -> str | None:
    """The text subtype of a part ("plain", "html", ...), however its client wrote the type.

    Besides "text/plain": the halves swapped ("plain/text", "html/text"), the
    parameters without their ";" ("text/plain charset=utf-8"), a garbled main
    type with a text subtype ("te\xffxt/plain"). None for a part that is not text.
    """
    maintype, subtype = part.get_content_maintype(), part.get_content_subtype()
    first = re.split(r"[\s;,]", subtype, maxsplit=1)[0]
    if maintype == "text":
        return first
    if subtype == "text" and maintype in ("plain", "html"):
        return maintype
    if maintype not in _MAINTYPES and first in ("plain", "html"):
        return first
    return None


def _resplit(part: Message, payload: str) -> list[Message]:
    """The parts of a multipart the stdlib left whole: its boundary missing, or not the one used.

    Split again on the first delimiter line in it; with none, all of it is one
    text part. The text is part of a body already found safe to split.
    """
    found = _DELIMITER_LINE.search(payload)
    if found is not None:
        head = f'Content-Type: multipart/mixed; boundary="{found[1]}"\n'
    else:
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        head = "Content-Type: text/plain\n"
        if encoding in ("base64", "quoted-printable", "7bit", "8bit"):
            head += f"Content-Transfer-Encoding: {encoding}\n"
    raw = (head + "\n").encode("ascii") + payload.encode("ascii", "surrogateescape")
    whole = _parse_with_stdlib(raw, headers_only=False)
    return [] if whole is None else [whole]


def _decode_part(part: Message, truncated: bool) -> str:
    try:
        payload = part.get_payload(decode=True)
        charset = part.get_content_charset()
        flowed = str(part.get_param("format", "")).lower() == "flowed"
        delsp = str(part.get_param("delsp", "")).lower() == "yes"
    except Exception:  # broken parameters or transfer encoding: nothing readable
        return ""
    if not isinstance(payload, bytes):
        return ""
    cut = truncated or len(payload) > _MAX_PART_BYTES  # cut before decoding
    text = _decode_bytes(payload[:_MAX_PART_BYTES], charset, cut=cut)
    text = text[:MAX_PART_CHARS].replace("\r\n", "\n")
    if flowed and part.get_content_subtype() == "plain":
        text = _unflow(text, delsp=delsp)
    return text


def _decode_bytes(payload: bytes, charset: str | None, *, cut: bool = False) -> str:
    """Decode with the declared charset, else UTF-8, else windows-1252, else latin-1.

    Strict at each step, so a wrong or unknown label (``x-unknown``) falls through
    to the next guess instead of filling the text with replacement characters;
    latin-1 decodes any byte, so the chain always ends with text. A charset that
    is not allowed raises `_Unsafe`. ``cut``: the bytes were cut, so a character
    they end in the middle of is dropped rather than failing the charset.
    """
    for candidate in (_codec(charset), "utf-8", "cp1252"):
        if not candidate:
            continue
        try:
            text = codecs.getincrementaldecoder(candidate)().decode(payload, final=not cut)
            text.encode("utf-8")  # some codecs yield lone surrogates, which are not text
        except (UnicodeError, ValueError):
            continue
        return text
    return payload.decode("latin-1")


def _codec(label: str | None) -> str | None:
    """The allowed codec a charset label names; None if none or unknown; `_Unsafe` if forbidden."""
    if not label:
        return None
    name = _canonical(label.strip().strip('"').lower()[:64])
    if name is not None and name not in ALLOWED_CHARSETS:
        raise _Unsafe(f"charset {name} is not allowed")
    return name


@functools.lru_cache(maxsize=512)
def _canonical(label: str) -> str | None:
    try:
        return codecs.lookup(label).name
    except (LookupError, ValueError):  # unknown, or a NUL in the label
        return None


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
            block = _history_block(lines, index)
            if not block or not _quote_follows(lines, index + block):
                return
            index += block  # an embedded quoted email: a reply may follow below it
            continue
        span, before = _attribution(lines, index)
        if before:
            yield before  # "Approved On 3 Nov 2026, X wrote:": the reply shares the line
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


def _history_block(lines: list[str], index: int) -> int:
    """How many lines the history marker or header block at ``index`` spans; 0 for a signature.

    A marker ("-----Original Message-----") and the header lines after it,
    up to the first blank line: if quoted lines follow, they are the quoted
    email, and what comes below them may be a bottom-posted reply.
    """
    if _is_signature(lines[index].strip().lower()):
        return 0
    end = index + 1
    while end < min(len(lines), index + 12) and lines[end].strip():
        if _header_key(lines[end]) not in _FROM_KEYS | _HEADER_KEYS and not _is_quoted(lines[end]):
            return 0
        if _is_quoted(lines[end]):
            break
        end += 1
    return end - index


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


def _attribution(lines: list[str], index: int) -> tuple[int, str]:
    """The lines an "On … wrote:" header at ``index`` spans (or 0), and any reply before it.

    Some clients put the reply on the header's own line: "Approved On Wed, Apr 4,
    2012 at 3:59 PM, X wrote:" (or "Approved--- On …"). The header then starts at
    a capitalised opening word ("On", "Le", "Am", …) inside the line, and the
    text before it is the reply. A line that itself opens a header is read whole.
    """
    first = lines[index].strip()
    if len(first) > _MAX_MARKER_CHARS:
        return 0, ""
    lowered = first.lower()
    if not any(lowered.startswith(start) for start, _ in _ATTRIBUTIONS):
        for cut in _inner_openings(first):
            span = _attribution_span(lines, index, first[cut:])
            if span:
                return span, first[:cut].rstrip(" -")
    return _attribution_span(lines, index, first), ""


def _inner_openings(line: str) -> Iterator[int]:
    """Where an attribution's capitalised opening word starts inside ``line``, leftmost first.

    At most `_INNER_TRIES` of them: each is read as a header over up to three lines.
    """
    for found, _ in zip(_INNER_OPENING.finditer(line), range(_INNER_TRIES), strict=False):
        yield found.start(1)


def _attribution_span(lines: list[str], index: int, first: str) -> int:
    """How many lines the "On … wrote:" header at ``index`` spans (Gmail wraps it), or 0.

    ``first`` is the header's first line (from where it starts on line ``index``).
    A dated header ("On 3 Nov 2026, X wrote:") marks history even with no ">" below
    it; a bare one-line "X wrote:" only when quoted lines follow.
    """
    if first.endswith(":") and len(first) <= _MAX_MARKER_CHARS:
        tail = first[-40:].lower()
        if any(verb in tail for verb in _ATTRIBUTION_VERBS) and _quote_follows(lines, index + 1):
            return 1
    pieces: list[str] = []
    for line in [first, *lines[index + 1 : index + 3]]:
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
