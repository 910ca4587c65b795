"""Reply tokens: signed, bound to an address, case-proof, expiring, rotatable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from hitl_mail.tokens import (
    TOKEN_LENGTH,
    BadToken,
    ExpiredToken,
    ReplyAddressing,
    mint,
    new_request_id,
    read,
    redact,
    redacted,
    verify,
)

KEYS = ("the-current-secret-key-0123456789",)
OLD_KEY = "the-previous-secret-key-987654321"
NEW_KEY = "the-rotated-in-secret-key-abcdefg"
ALICE = "alice@example.com"
BOB = "bob@example.com"
WEEK = timedelta(days=7)
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def request_id() -> str:
    return new_request_id()


@pytest.fixture
def token(request_id: str) -> str:
    return mint(request_id, ALICE, KEYS, now=NOW)


@pytest.fixture
def addressing() -> ReplyAddressing:
    return ReplyAddressing("reply.example.com")


def _with_char_changed(token: str, position: int) -> str:
    current = token[position]
    replacement = BASE32[(BASE32.index(current) + 1) % len(BASE32)]
    return token[:position] + replacement + token[position + 1 :]


# Round trip


def test_a_minted_token_verifies_to_its_request_id(request_id: str, token: str) -> None:
    parts = verify(token, ALICE, KEYS, WEEK, now=NOW)
    assert parts.request_id == request_id
    assert parts.issued_at == NOW


def test_request_ids_and_tokens_use_only_lowercase_base32(request_id: str, token: str) -> None:
    assert len(request_id) == 16
    assert len(token) == TOKEN_LENGTH
    assert set(request_id) <= set(BASE32)
    assert set(token) <= set(BASE32)


def test_read_gives_the_request_id_and_issue_time_without_a_key(
    request_id: str, token: str
) -> None:
    parts = read(token)
    assert (parts.request_id, parts.issued_at) == (request_id, NOW)


def test_minting_for_something_that_is_not_a_request_id_is_refused() -> None:
    with pytest.raises(ValueError, match="not a request id"):
        mint("not-a-request-id", ALICE, KEYS)


@pytest.mark.parametrize("change_case", [str.upper, str.lower, str.swapcase, str.title])
def test_a_token_survives_any_change_of_letter_case(
    request_id: str, token: str, change_case: Callable[[str], str]
) -> None:
    changed = change_case(token)
    assert verify(changed, ALICE, KEYS, WEEK, now=NOW).request_id == request_id


# Tampering


@pytest.mark.parametrize("position", range(TOKEN_LENGTH))
def test_changing_any_one_character_breaks_the_token(token: str, position: int) -> None:
    tampered = _with_char_changed(token, position)
    assert tampered != token
    with pytest.raises(BadToken):
        verify(tampered, ALICE, KEYS, WEEK, now=NOW)


@pytest.mark.parametrize(
    "text",
    ["", "short", "1" * TOKEN_LENGTH, "0" * TOKEN_LENGTH, "a" * (TOKEN_LENGTH + 8)],
)
def test_text_that_is_not_a_token_is_bad(text: str) -> None:
    with pytest.raises(BadToken):
        verify(text, ALICE, KEYS, WEEK)


def test_a_token_signed_with_another_key_is_bad(request_id: str) -> None:
    foreign = mint(request_id, ALICE, ("someone-elses-secret-key-0000000",), now=NOW)
    with pytest.raises(BadToken):
        verify(foreign, ALICE, KEYS, WEEK, now=NOW)


# Expiry


def test_a_token_older_than_max_age_has_expired(request_id: str) -> None:
    old = mint(request_id, ALICE, KEYS, now=NOW - timedelta(days=8))
    with pytest.raises(ExpiredToken) as caught:
        verify(old, ALICE, KEYS, WEEK, now=NOW)
    assert caught.value.parts.request_id == request_id


def test_a_token_just_within_max_age_still_verifies(request_id: str) -> None:
    recent = mint(request_id, ALICE, KEYS, now=NOW - WEEK + timedelta(minutes=1))
    assert verify(recent, ALICE, KEYS, WEEK, now=NOW).request_id == request_id


def test_without_max_age_an_old_token_still_verifies(request_id: str) -> None:
    old = mint(request_id, ALICE, KEYS, now=NOW - timedelta(days=400))
    assert verify(old, ALICE, KEYS, None, now=NOW).request_id == request_id


@pytest.mark.parametrize("position", [0, 12, TOKEN_LENGTH - 1])
def test_a_forged_token_that_is_also_old_is_bad_not_expired(request_id: str, position: int) -> None:
    old = mint(request_id, ALICE, KEYS, now=NOW - timedelta(days=8))
    forged = _with_char_changed(old, position)
    with pytest.raises(BadToken):
        verify(forged, ALICE, KEYS, WEEK, now=NOW)


# Binding to the address


def test_a_token_minted_for_one_address_fails_for_another(token: str) -> None:
    with pytest.raises(BadToken):
        verify(token, BOB, KEYS, WEEK, now=NOW)


@pytest.mark.parametrize(
    "address", ["Alice@Example.COM", "ALICE@EXAMPLE.COM", " alice@example.com "]
)
def test_the_address_is_compared_without_regard_to_case(
    request_id: str, token: str, address: str
) -> None:
    assert verify(token, address, KEYS, WEEK, now=NOW).request_id == request_id


def test_a_token_minted_for_a_mixed_case_address_verifies_in_lowercase(request_id: str) -> None:
    token = mint(request_id, "Alice@Example.com", KEYS, now=NOW)
    assert verify(token, ALICE, KEYS, WEEK, now=NOW).request_id == request_id


# Key rotation


def test_after_rotation_tokens_signed_with_the_old_key_still_verify(request_id: str) -> None:
    old_token = mint(request_id, ALICE, (OLD_KEY,), now=NOW)
    rotated = (NEW_KEY, OLD_KEY)
    assert verify(old_token, ALICE, rotated, WEEK, now=NOW).request_id == request_id


def test_after_rotation_new_tokens_are_signed_with_the_new_key(request_id: str) -> None:
    new_token = mint(request_id, ALICE, (NEW_KEY, OLD_KEY), now=NOW)
    assert verify(new_token, ALICE, (NEW_KEY,), WEEK, now=NOW).request_id == request_id
    with pytest.raises(BadToken):
        verify(new_token, ALICE, (OLD_KEY,), WEEK, now=NOW)


def test_once_the_old_key_is_removed_its_tokens_fail(request_id: str) -> None:
    old_token = mint(request_id, ALICE, (OLD_KEY,), now=NOW)
    with pytest.raises(BadToken):
        verify(old_token, ALICE, (NEW_KEY,), WEEK, now=NOW)


# Tokens in addresses


def test_the_reply_address_fits_the_64_octet_local_part_of_rfc_5321(
    addressing: ReplyAddressing, token: str
) -> None:
    address = addressing.address(token)
    local, _, domain = address.rpartition("@")
    assert domain == "reply.example.com"
    assert len(local.encode("ascii")) <= 64
    assert local == f"reply+{token}"
    assert local.count("+") == 1
    assert "+" not in token
    assert "-" not in token


def test_the_longest_configurable_local_part_still_fits(token: str) -> None:
    addressing = ReplyAddressing("reply.example.com", local_part="a" * 15, separator="-")
    local = addressing.address(token).rpartition("@")[0]
    assert len(local.encode("ascii")) <= 64


@pytest.mark.parametrize("change_case", [str.upper, str.lower, str.swapcase, str.title])
def test_the_token_is_found_whatever_the_case_of_the_whole_address(
    addressing: ReplyAddressing, request_id: str, token: str, change_case: Callable[[str], str]
) -> None:
    recipient = change_case(addressing.address(token))
    found = addressing.token_in(recipient)
    assert found == token
    assert verify(found, ALICE, KEYS, WEEK, now=NOW).request_id == request_id


@pytest.mark.parametrize(
    "recipient", ["reply@reply.example.com", "REPLY@Reply.Example.Com", '"reply"@reply.example.com']
)
def test_the_bare_reply_address_carries_no_token(
    addressing: ReplyAddressing, recipient: str
) -> None:
    assert addressing.token_in(recipient) is None


@pytest.mark.parametrize(
    "recipient",
    [
        "reply+garbage@reply.example.com",
        "reply+@reply.example.com",
        "postmaster@reply.example.com",
        "replyx@reply.example.com",
    ],
)
def test_an_address_of_ours_without_a_valid_looking_token_is_bad(
    addressing: ReplyAddressing, recipient: str
) -> None:
    with pytest.raises(BadToken):
        addressing.token_in(recipient)


def test_a_token_with_the_wrong_separator_is_bad(addressing: ReplyAddressing, token: str) -> None:
    with pytest.raises(BadToken):
        addressing.token_in(f"reply-{token}@reply.example.com")


@pytest.mark.parametrize(
    ("recipient", "ours"),
    [
        ("reply+x@reply.example.com", True),
        ("reply+x@REPLY.Example.COM", True),
        ("someone@reply.example.com", True),
        ("reply+x@example.com", False),
        ("reply+x@reply.example.com.evil.test", False),
        ("reply+x@notreply.example.com", False),
    ],
)
def test_is_ours_compares_the_domain_without_regard_to_case(
    addressing: ReplyAddressing, recipient: str, ours: bool
) -> None:
    assert addressing.is_ours(recipient) is ours


def test_a_dash_separator_works_end_to_end(request_id: str, token: str) -> None:
    addressing = ReplyAddressing("reply.example.com", separator="-")
    address = addressing.address(token)
    assert address == f"reply-{token}@reply.example.com"
    found = addressing.token_in(address.upper())
    assert found == token
    assert verify(found, ALICE, KEYS, WEEK, now=NOW).request_id == request_id
    with pytest.raises(BadToken):
        addressing.token_in(f"reply+{token}@reply.example.com")


# Redaction (SPEC 9: a token may be shown as its first 6 characters)


@pytest.mark.sqlite_only
def test_redact_cuts_every_token_to_its_first_six_characters_wherever_it_sits(token: str) -> None:
    text = (
        f"for reply+{token}@reply.example.com, <hitl.{token.upper()}.x@example.com>, "
        f"quoted: {token}, and glued on: x{token}0"
    )
    shown = redact(text)
    assert token not in shown.lower()
    assert shown.count(token[:6] + "…") == 2
    assert shown.count(token[:6].upper() + "…") == 1
    assert f"reply+{token[:6]}…@reply.example.com" in shown
    assert redact("request abcd2345efgh6723 answered by ann@example.com") == (
        "request abcd2345efgh6723 answered by ann@example.com"
    )


@pytest.mark.sqlite_only
def test_redact_cuts_the_token_parameter_of_a_url() -> None:
    signed = "InJlcTEi.Z1abcd.q9v8K-7xYzAbCdEfGhIjKlMnOpQrStUvWxYz0123456789_"
    url = f"https://hitl.example.com/api/requests/req1/callback?token={signed}&x=1"
    assert redact(f'"POST {url} HTTP/1.1" 200') == (
        '"POST https://hitl.example.com/api/requests/req1/callback?token=InJlcT…&x=1 HTTP/1.1" 200'
    )
    assert redact("?token=short") == "?token=short"


@pytest.mark.sqlite_only
def test_redacted_reaches_every_string_of_an_audit_detail(token: str) -> None:
    detail = {"to": [f"reply+{token}@r.example.com"], f"k{token}": {"why": token}, "n": 3}
    assert token not in repr(redacted(detail)).lower()
    assert redacted(detail)["n"] == 3
    assert redacted(None) is None
