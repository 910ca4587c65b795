"""Decide whether a reply's From domain is authenticated, by DMARC or DKIM (SPEC 9).

One pure call, `check(raw, from_address, settings) -> Verdict`, made by the
answering stage in a worker thread after the reply is parsed and before its
outcome is decided. The evidence comes from two places:

- `Authentication-Results` headers (RFC 8601) written by a host named in
  `trusted_authserv_ids`, normally the MTA in front of the daemon (OpenDMARC,
  OpenDKIM). Headers naming any other host are ignored: anyone can write one.
  For each method the topmost trusted header carrying it decides, because an
  MTA prepends its own headers above whatever the sender put in the message;
  a trusted header that cannot be read fails the check rather than letting a
  lower one decide.
- DKIM signatures verified here with dkimpy (`verify_dkim = true`), which
  looks the signer's key up in DNS: for a daemon that receives mail from the
  internet without such an MTA.

`require = "dmarc"`: a trusted `dmarc=pass` whose `header.from` is the From
domain; a trusted DMARC verdict other than pass is final (the domain's own
policy said no). Without any trusted DMARC result, an aligned DKIM pass also
counts, being what DMARC itself accepts (RFC 7489 4.2). `require = "dkim"`:
an aligned DKIM pass, from a trusted header or verified here.

Aligned (RFC 7489 3.1.1, relaxed): the signing domain `d=` is the From domain
or a parent of it. Without a public-suffix list, a parent must have at least
two labels, so no top-level domain can vouch for its subdomains. Signatures
with a body length limit (`l=`) are never accepted: text can be added below
the signed part, and here the first line is the answer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import authres
import dkim
from dkim.dnsplug import get_txt
from dkim.util import parse_tag_value

from hitl_mail.config import AuthenticationSettings

# dkimpy's resolver shape: (name: bytes, timeout=seconds) -> the TXT record's bytes, or None.
DnsFunc = Callable[..., bytes | None]

HEAD_LIMIT = 64 * 1024  # bytes of header block read; a reply's are a few KB
MAX_HEADER_LINES = 1000  # dkimpy joins folded lines by repeated copying
FIELD_LIMIT = 4096  # a longer Authentication-Results is no MTA's: ignored
MAX_SIGNATURES = 3  # aligned DKIM signatures tried, each one DNS lookup
# dkimpy's relaxed body canonicalisation is quadratic in a run of blanks; RFC 5322
# 2.1.1 caps a line at 998 characters, so a longer run is no real mail.
MAX_BLANK_RUN = 998
DNS_TIMEOUT = 5.0  # seconds per key lookup
VERIFY_BUDGET = 8.0  # seconds of key lookups for one message, all signatures together

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FIELD_BREAK = re.compile(rb"\r?\n(?![ \t])")  # a line break that does not fold
_FOLD = re.compile(rb"\r?\n")
_BLANKS = re.compile(rb"[\t ]+")
_LEADING_ID = re.compile(r"\s*([^\s;(]+)")


@dataclass(frozen=True)
class Verdict:
    """Whether the reply's sender is authenticated, and the evidence or its absence, in words."""

    passed: bool
    reason: str


@dataclass(frozen=True)
class _Result:
    authserv_id: str
    method: str
    result: str
    properties: dict[str, str]  # "header.d" -> "example.com"


def _quiet_logger() -> logging.Logger:
    # dkimpy logs signature fields at DEBUG, and a z= tag can copy the To header,
    # token and all (SPEC 9). Its own logger, outside the logging tree, stays silent.
    logger = logging.Logger("hitl_mail.authentication.dkimpy", logging.CRITICAL + 1)
    logger.addHandler(logging.NullHandler())
    return logger


_QUIET = _quiet_logger()


def system_dns(name: bytes, timeout: float = DNS_TIMEOUT) -> bytes | None:
    """A TXT record from the system's resolver (dnspython, through dkimpy's own lookup)."""
    txt: bytes | None = get_txt(name, timeout=timeout)
    return txt


def check(
    raw: bytes,
    from_address: str,
    settings: AuthenticationSettings,
    dnsfunc: DnsFunc = system_dns,
) -> Verdict:
    """The verdict on `raw`'s From domain under `settings.require` (pure but for `dnsfunc`)."""
    if settings.require == "none":
        return Verdict(True, "no authentication required")
    domain = from_address.rpartition("@")[2].strip().lower()
    if not domain:
        return Verdict(False, "no From domain to authenticate")
    trusted = _Trusted(authentication_results(raw), settings.trusted_authserv_ids)
    if trusted.unreadable:
        return Verdict(False, f"an Authentication-Results of {trusted.unreadable} is unreadable")
    if settings.require == "dmarc" and (dmarc := trusted.first("dmarc")):
        return _dmarc(dmarc, domain)
    for result in trusted.first("dkim"):
        signer = result.properties.get("header.d") or _domain_of(result.properties)
        if result.result == "pass" and _aligned(signer, domain):
            return Verdict(True, f"dkim=pass for {signer} from {result.authserv_id}")
    if settings.verify_dkim:
        verified = verified_signer(raw, domain, dnsfunc)
        if verified is not None:
            return Verdict(True, f"DKIM signature of {verified} verified")
    return Verdict(False, _missing(settings, domain))


def _missing(settings: AuthenticationSettings, domain: str) -> str:
    what = "dmarc=pass or aligned dkim=pass" if settings.require == "dmarc" else "aligned dkim=pass"
    ids = ", ".join(settings.trusted_authserv_ids)
    missing = [f"no {what} for {domain} from {ids}"] if ids else []
    if settings.verify_dkim:
        missing.append(f"no DKIM signature aligned with {domain} verified")
    return "; ".join(missing)


def _dmarc(results: Sequence[_Result], domain: str) -> Verdict:
    for result in results:
        header_from = result.properties.get("header.from", "").lower()
        if result.result == "pass" and header_from == domain:
            return Verdict(True, f"dmarc=pass for {domain} from {result.authserv_id}")
    first = results[0]
    header_from = first.properties.get("header.from", "?")
    return Verdict(
        False,
        f"dmarc={first.result} for {header_from} (From is {domain}) from {first.authserv_id}",
    )


def _aligned(signer: str, domain: str) -> bool:
    signer = signer.strip().lower().rstrip(".")
    return "." in signer and (domain == signer or domain.endswith("." + signer))


def _domain_of(properties: dict[str, str]) -> str:
    return properties.get("header.i", "").rpartition("@")[2]


class _Trusted:
    """The results in Authentication-Results headers of trusted hosts, top to bottom."""

    def __init__(self, values: Sequence[str], trusted_ids: Sequence[str]) -> None:
        self.headers: list[list[_Result]] = []
        self.unreadable = ""
        for value in values:
            leading = _LEADING_ID.match(value)
            authserv_id = leading[1].lower() if leading else ""
            if authserv_id not in trusted_ids:
                continue  # cheap: only a trusted host's header is worth parsing
            results = _parse(value) if len(value) <= FIELD_LIMIT else None
            if results is None:
                self.unreadable = self.unreadable or authserv_id
                continue
            self.headers.append(results)

    def first(self, method: str) -> list[_Result]:
        """The `method` results of the topmost trusted header that has any."""
        for results in self.headers:
            found = [r for r in results if r.method == method]
            if found:
                return found
        return []


def _parse(value: str) -> list[_Result] | None:
    try:
        header = authres.parse_value(value)
    except Exception:  # authres.AuthResError, and RecursionError on nested comments
        return None
    return [
        _Result(
            header.authserv_id,
            str(result.method).lower(),
            str(result.result).lower(),
            {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties or ()},
        )
        for result in header.results
    ]


def authentication_results(raw: bytes) -> list[str]:
    """The unfolded values of the message's Authentication-Results headers, top to bottom."""
    return [value for name, value in _header_fields(raw) if name == b"authentication-results"]


def _header_fields(raw: bytes) -> list[tuple[bytes, str]]:
    if raw.startswith((b"\r\n", b"\n")):
        return []
    head = raw[:HEAD_LIMIT]
    end = _HEAD_END.search(head)
    fields = []
    for field in _FIELD_BREAK.split(head[: end.start()] if end else head):
        name, colon, value = field.partition(b":")
        if colon:
            unfolded = _FOLD.sub(b"", value).decode("utf-8", "replace").strip()
            fields.append((name.strip().lower(), unfolded))
    return fields


def verified_signer(raw: bytes, domain: str, dnsfunc: DnsFunc = system_dns) -> str | None:
    """The `d=` of a DKIM signature aligned with `domain` that verifies, or None."""
    if not _verifiable(raw):
        return None
    try:
        verifier = dkim.DKIM(raw, logger=_QUIET, minkey=1024, timeout=DNS_TIMEOUT)
    except Exception:  # dkim.MessageFormatError, or worse on a hostile message
        return None
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    aligned = [(i, s) for i, v in enumerate(signatures) if (s := _aligned_signer(v, domain))]
    deadline = time.monotonic() + VERIFY_BUDGET
    for index, signer in aligned[:MAX_SIGNATURES]:
        # Each lookup gets what is left of the budget: a slow name server holds
        # the answering stage's worker thread for VERIFY_BUDGET at most.
        verifier.timeout = min(DNS_TIMEOUT, deadline - time.monotonic())
        if verifier.timeout <= 0:
            break
        try:
            if verifier.verify(idx=index, dnsfunc=dnsfunc):
                return signer
        except Exception:  # dkim.DKIMException, a resolver's error
            continue
    return None


def _aligned_signer(signature: bytes, domain: str) -> str | None:
    try:
        tags: dict[bytes, Any] = parse_tag_value(signature)
    except Exception:
        return None
    signer = bytes(tags.get(b"d", b"")).decode("ascii", "replace").lower()
    if b"l" in tags or not _aligned(signer, domain):
        return None
    return signer


def _verifiable(raw: bytes) -> bool:
    """Small and plain enough for dkimpy to verify in bounded time."""
    end = _HEAD_END.search(raw, 0, HEAD_LIMIT)
    if end is None or raw.count(b"\n", 0, end.start()) > MAX_HEADER_LINES:
        return False
    return all(len(run) <= MAX_BLANK_RUN for run in _BLANKS.findall(raw, end.end()))
