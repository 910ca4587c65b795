"""The From header names exactly one mailbox, read from the raw bytes, or the reply has no sender.

SPEC 9: only the addr-spec of the one From mailbox is compared with the token's
address, never a display name or a comment. Each refusal below is a way a
lenient reader has been led to take an attacker's display name for the sender.
"""

from __future__ import annotations

import pytest

from hitl_mail.senders import BadSender, mailbox, sender_of

pytestmark = pytest.mark.sqlite_only


def message(*header_lines: bytes, body: bytes = b"approved\r\n") -> bytes:
    return b"".join(line + b"\r\n" for line in header_lines) + b"\r\n" + body


@pytest.mark.parametrize(
    ("field", "address"),
    [
        pytest.param(b"jane@example.org", "jane@example.org", id="bare"),
        pytest.param(b"<jane@example.org>", "jane@example.org", id="angle-only"),
        pytest.param(b"Jane Doe <Jane.Doe@Example.ORG>", "Jane.Doe@example.org", id="name-addr"),
        pytest.param(b'"Doe, Jane" <jane@example.org>', "jane@example.org", id="quoted-comma"),
        pytest.param(
            b'"jane@example.org" <jane@example.org>', "jane@example.org", id="quoted-self"
        ),
        pytest.param(b"John Q. Public <jq@example.org>", "jq@example.org", id="obs-phrase"),
        pytest.param(b"jane@example.org (Jane Doe)", "jane@example.org", id="trailing-comment"),
        pytest.param(b"(a (nested) comment) jane@example.org", "jane@example.org", id="comment"),
        pytest.param(
            b"=?utf-8?q?Jane_D=C3=B6e?= <jane@example.org>", "jane@example.org", id="2047"
        ),
        pytest.param(b"Jane\r\n <jane@example.org>", "jane@example.org", id="folded"),
        pytest.param("José <José@Example.org>".encode(), "José@example.org", id="utf-8"),
        pytest.param(b'"jane"@example.org', "jane@example.org", id="needless-quotes"),
        pytest.param(b'"jane doe"@example.org', '"jane doe"@example.org', id="quoted-local"),
    ],
)
def test_each_form_a_mail_client_writes_gives_its_addr_spec(field: bytes, address: str) -> None:
    assert mailbox(field) == address


@pytest.mark.parametrize(
    "field",
    [
        pytest.param(b"boss@corp.com <mallory@x.example>", id="address-as-display-name"),
        pytest.param(b"boss@corp.com, mallory@x.example", id="two-mailboxes"),
        pytest.param(b"Boss <boss@corp.com>, <mallory@x.example>", id="two-name-addrs"),
        pytest.param(b"Team: boss@corp.com;", id="group"),
        pytest.param(b"undisclosed-recipients:;", id="empty-group"),
        pytest.param(b"<@corp.com:mallory@x.example>", id="route"),
        pytest.param(b"mallory@[192.0.2.1]", id="domain-literal"),
        pytest.param(b"Boss <boss@corp.com> <mallory@x.example>", id="two-angle-addrs"),
        pytest.param(b"<mallory@x.example> boss@corp.com", id="text-after-angle-addr"),
        pytest.param(b"Boss <boss@corp.com", id="unclosed-angle"),
        pytest.param(b'"Boss <boss@corp.com> <mallory@x.example>', id="unclosed-quote"),
        pytest.param(b"(boss@corp.com mallory@x.example", id="unclosed-comment"),
        pytest.param(b"mallory(boss@corp.com)@x.example", id="comment-inside-address"),
        pytest.param(b"mallory @ x.example", id="space-inside-address"),
        pytest.param(b"mallory@x..example", id="empty-label"),
        pytest.param(b"Jane", id="no-address"),
        pytest.param(b"", id="empty"),
        pytest.param(b"mallory@x.example\x00boss@corp.com", id="nul"),
        pytest.param(b"boss@corp.com\rmallory@x.example", id="bare-cr"),
        pytest.param(b"\xff\xfe <mallory@x.example>", id="not-utf-8"),
        pytest.param(b"Boss \\<boss@corp.com> <m@x.example>", id="backslash-outside-quotes"),
        pytest.param(b"(" * 20 + b"x" + b")" * 20 + b" m@x.example", id="deep-comments"),
        pytest.param(b"x" * 65 + b"@x.example", id="long-local-part"),
        pytest.param(b"A" * 3000 + b" <mallory@x.example>", id="overlong-field"),
    ],
)
def test_a_from_that_is_not_exactly_one_plain_mailbox_is_refused(field: bytes) -> None:
    with pytest.raises(BadSender):
        mailbox(field)


@pytest.mark.parametrize(
    "field",
    [
        b"=?utf-8?q?Boss_=3Cboss=40corp=2Ecom=3E?= <mallory@attacker.example>",
        b'"boss@corp.com" <mallory@attacker.example>',
        b"(boss@corp.com) mallory@attacker.example",
        b"mallory@attacker.example (boss@corp.com)",
        b'"Boss <boss@corp.com>" <mallory@attacker.example>',
    ],
)
def test_an_address_in_a_display_name_or_comment_is_never_the_sender(field: bytes) -> None:
    assert mailbox(field) == "mallory@attacker.example"


def test_a_quoted_local_part_holding_an_at_sign_stays_on_the_attackers_domain() -> None:
    assert mailbox(b'"boss@corp.com"@attacker.example') == '"boss@corp.com"@attacker.example'


@pytest.mark.parametrize(
    "field",
    [
        "boss@cоrp.com",  # Cyrillic о
        "boss@corp.co\u200bm",  # a zero-width space
        "boss@\u212aorp.com",  # KELVIN SIGN, which str.lower() turns into an ASCII k
    ],
)
def test_a_look_alike_domain_is_kept_as_written_and_never_equals_the_real_one(field: str) -> None:
    address = mailbox(field.encode())

    assert address == field
    assert address not in {"boss@corp.com", "boss@korp.com"}


def test_only_ascii_letters_of_the_domain_are_lowercased() -> None:
    assert mailbox("jane@BÜCHER.Example".encode()) == "jane@bÜcher.example"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(message(b"From: boss@corp.com", b"From: mallory@x.example"), id="second-from"),
        pytest.param(
            message(b"From: boss@corp.com", b"from : mallory@x.example"), id="obs-from-spelling"
        ),
        pytest.param(
            message(b"Subject: hi\rFrom: boss@corp.com", b"From: mallory@x.example"),
            id="bare-cr-hides-a-from",
        ),
        pytest.param(
            message(b"From: mallory@x.example", b"Subject: a\x00b"), id="nul-in-the-header"
        ),
        pytest.param(
            message(b"From: mallory@x.example", b"From boss@corp.com"), id="not-a-header-line"
        ),
        pytest.param(message(b"Subject: no sender"), id="no-from"),
        pytest.param(b"\r\nFrom: boss@corp.com\r\n", id="empty-header-section"),
    ],
)
def test_a_header_section_without_exactly_one_readable_from_is_refused(raw: bytes) -> None:
    with pytest.raises(BadSender):
        sender_of(raw)


def test_the_from_of_the_header_section_counts_and_a_from_in_the_body_does_not() -> None:
    raw = message(
        b"Subject: Re: approve?",
        b"From: Jane Doe",
        b" <jane@example.org>",
        b"X-Long: folded",
        b"\tover two lines",
        body=b"From: boss@corp.com\r\n",
    )

    assert sender_of(raw) == "jane@example.org"


def test_the_reason_of_a_refusal_never_repeats_the_header() -> None:
    with pytest.raises(BadSender) as refused:
        mailbox(b"boss@corp.com <mallory@x.example>")

    assert "corp" not in str(refused.value)
    assert "mallory" not in str(refused.value)
