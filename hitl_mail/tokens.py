"""Mint and verify the reply tokens carried in `reply+TOKEN@reply_domain`.

A token binds a request id and the address it was issued to, and carries its
issue time so it can expire. It is written in lowercase base32 (a-z, 2-7):
mail systems may change the letter case of a local part, so the alphabet must
mean the same in either case, and it must not contain `+` or `-`, which are
the tag separators. Layout, 30 bytes before encoding:

    request id (10 bytes) | issued at (4 bytes, Unix seconds) | HMAC-SHA256 tag (16 bytes)

The tag covers the first 14 bytes and the lowercased address, so a token
minted for one address fails for another, and a reassigned request's old
token stops working. 48 characters: `reply+` plus the token stays well within
the 64-octet local part of RFC 5321 section 4.5.3.1.1. Keys are derived with
itsdangerous; the first key signs, every key verifies (rotation).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from itsdangerous import Signer
from itsdangerous.encoding import want_bytes
from itsdangerous.signer import HMACAlgorithm

ID_BYTES = 10
TAG_BYTES = 16
TOKEN_LENGTH = 48
SHOWN = 6  # characters of a token that logs and audit details may show (SPEC 9)
_SALT = b"hitl-mail.reply-token"
_ALGORITHM = HMACAlgorithm(hashlib.sha256)
# Linear: a position inside a run fails the look-behind at once.
_TOKEN_RUN = re.compile(rf"(?<![a-z2-7])[a-z2-7]{{{TOKEN_LENGTH},}}", re.IGNORECASE)
_TOKEN_PARAM = re.compile(r"(?<=[?&;]token=)[^&#\s\"'<>…]{7,}", re.IGNORECASE)


class BadToken(Exception):
    """Not a token of ours: malformed, or not signed by any of our keys for this address."""


class ExpiredToken(Exception):
    """Correctly signed, but older than `[tokens].max_age`."""

    def __init__(self, parts: TokenParts) -> None:
        self.parts = parts
        super().__init__(f"token for request {parts.request_id} issued {parts.issued_at:%Y-%m-%d}")


@dataclass(frozen=True)
class TokenParts:
    request_id: str
    issued_at: datetime


def new_request_id() -> str:
    """A random request id in the token alphabet (16 characters)."""
    return _b32(secrets.token_bytes(ID_BYTES))


def mint(request_id: str, address: str, keys: Sequence[str], now: datetime | None = None) -> str:
    """A token for `request_id`, answerable only from `address`."""
    issued = int((now or datetime.now(UTC)).timestamp())
    body = _id_bytes(request_id) + struct.pack(">I", issued)
    return _b32(body + _tag(keys[0], body, address))


def read(token: str) -> TokenParts:
    """The request id and issue time, without checking the signature."""
    raw = _decode(token)
    issued = struct.unpack(">I", raw[ID_BYTES : ID_BYTES + 4])[0]
    return TokenParts(_b32(raw[:ID_BYTES]), datetime.fromtimestamp(issued, UTC))


def verify(
    token: str,
    address: str,
    keys: Sequence[str],
    max_age: timedelta | None,
    now: datetime | None = None,
) -> TokenParts:
    """Check the signature for `address` under any key, then the age.

    The signature is checked first so that a forged token is reported as bad,
    never as merely expired.
    """
    raw = _decode(token)
    body, tag = raw[: ID_BYTES + 4], raw[ID_BYTES + 4 :]
    if not any(secrets.compare_digest(tag, _tag(key, body, address)) for key in keys):
        raise BadToken("signature does not match")
    parts = read(token)
    if max_age is not None and (now or datetime.now(UTC)) - parts.issued_at > max_age:
        raise ExpiredToken(parts)
    return parts


def looks_like_token(text: str) -> bool:
    try:
        _decode(text)
    except BadToken:
        return False
    return True


def redact(text: str) -> str:
    """`text` with every token-looking run cut to its first characters: safe to log or audit.

    A token is a credential (SPEC 9): whoever holds it can answer from the
    assignee's address. Any run of 48 or more token-alphabet characters, in
    either case, is shown as its first `SHOWN` characters and "…", whether it
    sits in `reply+TOKEN@`, in a Message-ID or in a quoted reply; so is the
    value of a `token=` URL parameter (a callback URL's own token).
    """
    return _TOKEN_PARAM.sub(_shorten, _TOKEN_RUN.sub(_shorten, text))


def redacted(value: Any) -> Any:
    """`redact` applied to every string inside a JSON-like value (an audit detail)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(v) for v in value]
    return value


def _shorten(match: re.Match[str]) -> str:
    return match[0][:SHOWN] + "…"


def _tag(key: str, body: bytes, address: str) -> bytes:
    message = body + b"\x00" + want_bytes(address.strip().lower())
    return _ALGORITHM.get_signature(_derived_key(key), message)[:TAG_BYTES]


@functools.lru_cache(maxsize=16)
def _derived_key(key: str) -> bytes:
    """The signing key derived from a secret key (the same for every token under it)."""
    return bytes(
        Signer(key, salt=_SALT, key_derivation="hmac", digest_method=hashlib.sha256).derive_key()
    )


@functools.lru_cache(maxsize=4096)
def _decode(token: str) -> bytes:
    """The token's bytes. Remembered for the tokens seen last: the SMTP edge reads each
    token four times per reply (RCPT, DATA), and base64's base32 is pure Python."""
    text = token.strip().upper()
    if len(text) != TOKEN_LENGTH:
        raise BadToken("wrong length")
    try:
        return base64.b32decode(text)
    except (binascii.Error, ValueError) as exc:
        raise BadToken("not base32") from exc


def _id_bytes(request_id: str) -> bytes:
    try:
        raw = base64.b32decode(request_id.upper())
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a request id: {request_id!r}") from exc
    if len(raw) != ID_BYTES:
        raise ValueError(f"not a request id: {request_id!r}")
    return raw


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True)
class ReplyAddressing:
    """How tokens sit in addresses: `{local_part}{separator}{token}@{domain}`."""

    domain: str
    local_part: str = "reply"
    separator: str = "+"

    def address(self, token: str) -> str:
        return f"{self.local_part}{self.separator}{token}@{self.domain}"

    def is_ours(self, recipient: str) -> bool:
        return recipient.rpartition("@")[2].strip().lower() == self.domain.lower()

    def token_in(self, recipient: str) -> str | None:
        """The token in one of our recipient addresses, or None for the bare `local_part@`.

        Raises BadToken for a local part of ours that carries no valid-looking token.
        """
        local = recipient.rpartition("@")[0].strip().strip('"').lower()
        if local == self.local_part:
            return None  # the +tag was stripped on the way; References may still lead back
        prefix = self.local_part + self.separator
        if not local.startswith(prefix) or not looks_like_token(local[len(prefix) :]):
            raise BadToken("no token in the address")
        return local[len(prefix) :]
