"""Who sent a message: the addr-spec of its one From mailbox, read strictly from the raw bytes.

This module's single job is ``raw message bytes -> addr-spec``, or `BadSender`
saying why the From header cannot be trusted to name one mailbox (SPEC 9).

Strict on purpose. A lenient reader can be led to take an address from a
display name: RFC 2047 decoding first turns ``=?utf-8?q?Boss_=3Cboss=40corp?=``
into ``Boss <boss@corp>``; the stdlib's ``policy.default`` reads ``From:
boss@corp.com <mallory@x.example>`` as boss@corp.com, only noting a defect;
``getaddresses(strict=True)`` exists only from Python 3.11.10. An MTA enforcing
DMARC looks at the real mailbox, on the attacker's own domain, and passes all of
these. So the From field is read here before any decoding, with the grammar of
RFC 5322 section 3.4 (UTF-8 allowed, RFC 6532), and everything outside the
narrow form a mail client writes is refused:

- exactly one From field (a second one, even spelled ``From :``, is refused),
  in a header section of at most 256 KiB where every line is a field or its
  continuation, with no NUL and no bare CR (which some parsers read as a
  line break, others not);
- exactly one mailbox: ``addr-spec`` or ``[display-name] <addr-spec>``, with
  quoted strings and (nested) comments; no group, no list, no route, no domain
  literal, nothing but a phrase before ``<``; encoded words are plain atoms
  here and never decoded;
- no comment or space inside the addr-spec, local part at most 64 octets and
  the whole at most 254 (RFC 5321 section 4.5.3.1), the field at most
  `MAX_FIELD_OCTETS`.

Only the addr-spec is returned, never anything of a display name or a comment.
Its domain is lowercased, ASCII letters only: domains are compared as bytes,
with no IDNA or Unicode folding, so a look-alike domain never equals the real
one. A quoted local part is written back in its canonical form (``"jane"`` is
``jane``, RFC 5322 section 3.4.1). Every step moves forward through the input:
time is linear in its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_FIELD_OCTETS = 2048  # a From a client writes is well under one 998-octet line
MAX_HEADER_SECTION = 256 * 1024  # real ones stay under 64 KiB, Received and DKIM included
MAX_LOCAL_OCTETS = 64
MAX_ADDRESS_OCTETS = 254
MAX_COMMENT_DEPTH = 8

# RFC 5322 section 3.6.8: a field name is printable ASCII but ":"; obs-field allows
# white space before the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_SPACE = re.compile(r"[ \t]+")
# atext (RFC 5322 section 3.2.3) plus any non-ASCII character but the C1 controls
# (RFC 6532 section 3.2).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u00a0-\U0010ffff]"
_ATOM = re.compile(f"{_ATEXT}+")
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# qtext or quoted-pair (RFC 5322 section 3.2.4), then the closing quote.
_QUOTED = re.compile(r'((?:[^"\\\x00-\x08\x0a-\x1f\x7f-\x9f]|\\[\t\x20-\x7e\u00a0-\U0010ffff])*)"')
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_SPECIALS = "<>@."
_REFUSED_SPECIALS = {
    ",": "more than one mailbox",
    ";": "group syntax",
    ":": "group or route syntax",
    "[": "a domain literal",
    "]": "a domain literal",
}


class BadSender(ValueError):
    """The From header does not name exactly one mailbox in a form we read; says why."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "atom", "quoted", or one of the characters of _SPECIALS
    text: str  # an atom as written, a quoted string's content with its escapes undone
    spaced: bool  # white space or a comment came right before it


def sender_of(raw: bytes) -> str:
    """The addr-spec of the one From mailbox of a raw message; `BadSender` says why not."""
    fields = from_fields(raw)
    if not fields:
        raise BadSender("no From header")
    if len(fields) > 1:
        raise BadSender("more than one From header")
    return mailbox(fields[0])


def from_fields(raw: bytes) -> list[bytes]:
    """The unfolded values of every From field of the header section, as raw bytes."""
    end = _HEADER_END.search(raw)
    if raw.startswith((b"\n", b"\r\n")):
        return []
    section = raw[: end.start()] if end else raw
    if len(section) > MAX_HEADER_SECTION:
        raise BadSender(f"a header section over {MAX_HEADER_SECTION // 1024} KiB")
    if b"\x00" in section:
        raise BadSender("a NUL byte in the header section")
    if b"\r" in section.replace(b"\r\n", b""):
        raise BadSender("a bare CR in the header section")
    fields: list[bytes] = []
    current: list[bytes] | None = None  # the pieces of the From field being read
    for line in section.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue  # a continuation of another field, or of nothing (read by nobody)
        field = _FIELD.match(line)
        if field is None:
            raise BadSender("a line in the header section is not a header field")
        if current is not None:
            fields.append(b"".join(current))
        current = [line[field.end() :]] if field[1].lower() == b"from" else None
    if current is not None:
        fields.append(b"".join(current))
    return fields


def mailbox(value: bytes | str) -> str:
    """The addr-spec of a From field body holding exactly one mailbox; `BadSender` says why not."""
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if len(value) > MAX_FIELD_OCTETS:
        raise BadSender(f"a From header longer than {MAX_FIELD_OCTETS} bytes")
    try:
        text = _FOLD.sub(b"", value).decode("utf-8")
    except UnicodeDecodeError:
        raise BadSender("a From header that is not UTF-8") from None
    tokens = _tokens(text)
    if not tokens:
        raise BadSender("an empty From header")
    kinds = [token.kind for token in tokens]
    if "<" not in kinds and ">" not in kinds:
        return _addr_spec(tokens)
    if kinds.count("<") != 1 or kinds.count(">") != 1 or kinds[-1] != ">":
        raise BadSender("angle brackets that do not enclose one address")
    opening = kinds.index("<")
    _display_name(tokens[:opening])
    return _addr_spec(tokens[opening + 1 : -1])


def _tokens(text: str) -> list[_Token]:
    """Atoms, quoted strings and specials; white space and comments only mark what follows."""
    tokens: list[_Token] = []
    position, spaced = 0, False
    while position < len(text):
        char = text[position]
        if char in " \t":
            space = _SPACE.match(text, position)
            assert space is not None
            position, spaced = space.end(), True
            continue
        if char == "(":
            position, spaced = _comment_end(text, position), True
            continue
        if char == '"':
            quoted = _QUOTED.match(text, position + 1)
            if quoted is None:
                raise BadSender("a quoted string that does not end")
            tokens.append(_Token("quoted", _QUOTED_PAIR.sub(r"\1", quoted[1]), spaced))
            position = quoted.end()
        elif char in _SPECIALS:
            tokens.append(_Token(char, char, spaced))
            position += 1
        elif (atom := _ATOM.match(text, position)) is not None:
            tokens.append(_Token("atom", atom[0], spaced))
            position = atom.end()
        else:
            raise BadSender(_REFUSED_SPECIALS.get(char, "a character not allowed in From"))
        spaced = False
    return tokens


def _comment_end(text: str, start: int) -> int:
    """Where the comment opening at ``start`` ends (RFC 5322 section 3.2.2, nested)."""
    depth, position = 0, start
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == "(":
            depth += 1
            if depth > MAX_COMMENT_DEPTH:
                raise BadSender("comments nested too deep")
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position + 1
        elif (char < " " and char != "\t") or "\x7f" <= char <= "\x9f":
            raise BadSender("a control character in From")
        position += 1
    raise BadSender("a comment that does not end")


def _display_name(tokens: list[_Token]) -> None:
    """Words, and the periods of obs-phrase ("John Q. Public"); nothing else before "<"."""
    for index, token in enumerate(tokens):
        if token.kind not in ("atom", "quoted") and not (token.kind == "." and index):
            raise BadSender("a display name that is not a phrase")


def _addr_spec(tokens: list[_Token]) -> str:
    if any(token.spaced for token in tokens[1:]):
        raise BadSender("white space or a comment inside the address")
    kinds = [token.kind for token in tokens]
    if kinds.count("@") != 1:
        raise BadSender("not one address")
    at = kinds.index("@")
    local, domain = _local_part(tokens[:at]), _dotted(tokens[at + 1 :])
    if not local or not domain:
        raise BadSender("not one address")
    if len(local.encode()) > MAX_LOCAL_OCTETS:
        raise BadSender(f"a local part longer than {MAX_LOCAL_OCTETS} octets")
    address = f"{local}@{_ascii_lower(domain)}"
    if len(address.encode()) > MAX_ADDRESS_OCTETS:
        raise BadSender(f"an address longer than {MAX_ADDRESS_OCTETS} octets")
    return address


def _local_part(tokens: list[_Token]) -> str:
    if len(tokens) == 1 and tokens[0].kind == "quoted":
        content = tokens[0].text
        if _DOT_ATOM.fullmatch(content):
            return content  # RFC 5322 section 3.4.1: the quotes change nothing
        return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"' if content else ""
    return _dotted(tokens)


def _dotted(tokens: list[_Token]) -> str:
    """A dot-atom's text: atoms separated by single periods, or "" if it is not one."""
    kinds = [token.kind for token in tokens]
    if kinds != ["atom", "."] * (len(kinds) // 2) + ["atom"]:
        return ""
    return "".join(token.text for token in tokens)


def _ascii_lower(text: str) -> str:
    return text.encode("utf-8").lower().decode("utf-8")
