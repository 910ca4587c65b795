"""Sender authentication decided from raw headers (authentication.py), and its configuration.

DKIM tests sign with a key generated for the test module and serve its
public key to the verifier through the resolver function dkimpy takes, as
DNS would (dkim_keys.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import dkim
import pytest
from dkim_keys import Keys

from hitl_mail import authentication
from hitl_mail.authentication import Verdict
from hitl_mail.config import AuthenticationSettings, Config, ConfigError, config_from_dict

pytestmark = pytest.mark.sqlite_only

MX = "mx.example.com"
DMARC = AuthenticationSettings(require="dmarc", trusted_authserv_ids=(MX,))
DKIM_HEADERS = AuthenticationSettings(require="dkim", trusted_authserv_ids=(MX,))
DKIM_HERE = AuthenticationSettings(require="dkim", verify_dkim=True)
REPLY = (
    b"From: Boss <boss@corp.example>\r\n"
    b"To: reply+abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnop@reply.example.com\r\n"
    b"Subject: Re: [Review] Approve?\r\n"
    b"Message-ID: <1@corp.example>\r\n"
    b"\r\n"
    b"Approved\r\n"
)


def with_results(*values: str) -> bytes:
    """REPLY with Authentication-Results headers on top, in the order an MTA prepends them."""
    return b"".join(f"Authentication-Results: {v}\r\n".encode() for v in values) + REPLY


def check(
    raw: bytes,
    settings: AuthenticationSettings,
    dnsfunc: authentication.DnsFunc = authentication.system_dns,
) -> Verdict:
    return authentication.check(raw, "boss@corp.example", settings, dnsfunc)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


# -- Authentication-Results of trusted hosts ------------------------------------------------


def test_require_none_passes_everything_without_reading_a_header() -> None:
    assert check(REPLY, AuthenticationSettings()).passed


def test_a_trusted_dmarc_pass_for_the_from_domain_passes() -> None:
    verdict = check(
        with_results(f"{MX}; dmarc=pass (p=reject dis=none) header.from=corp.example"), DMARC
    )
    assert verdict == Verdict(True, f"dmarc=pass for corp.example from {MX}")


@pytest.mark.parametrize(
    "results",
    [
        pytest.param(
            [f"{MX}; dmarc=fail (p=reject dis=reject) header.from=corp.example"], id="fail"
        ),
        pytest.param([f"{MX}; dmarc=none header.from=corp.example"], id="none"),
        pytest.param([], id="missing"),
        pytest.param(["mx.attacker.example; dmarc=pass header.from=corp.example"], id="other-host"),
        pytest.param(
            [f"{MX}.attacker.example; dmarc=pass header.from=corp.example"], id="suffixed"
        ),
        pytest.param([f"{MX}; dmarc=pass header.from=attacker.example"], id="other-domain"),
        pytest.param([f"{MX}; dmarc=pass header.from=example"], id="parent-domain"),
        pytest.param([f"{MX}; spf=pass smtp.mailfrom=corp.example"], id="spf-only"),
        pytest.param([f"{MX}; dkim=pass header.d=attacker.example"], id="unaligned-dkim"),
    ],
)
def test_without_a_trusted_pass_for_the_from_domain_dmarc_fails(results: list[str]) -> None:
    verdict = check(with_results(*results), DMARC)
    assert not verdict.passed
    assert verdict.reason


def test_the_topmost_trusted_verdict_wins_over_a_pass_the_sender_wrote_below_it() -> None:
    forged_below = with_results(
        f"{MX}; dmarc=fail (p=reject) header.from=corp.example",
        f"{MX}; dmarc=pass header.from=corp.example",
    )
    verdict = check(forged_below, DMARC)
    assert verdict == Verdict(
        False, f"dmarc=fail for corp.example (From is corp.example) from {MX}"
    )


def test_a_trusted_header_that_cannot_be_read_fails_rather_than_let_a_lower_one_decide() -> None:
    raw = with_results(f"{MX}; dmarc=pass (unclosed", f"{MX}; dmarc=pass header.from=corp.example")
    verdict = check(raw, DMARC)
    assert verdict == Verdict(False, f"an Authentication-Results of {MX} is unreadable")


def test_results_of_untrusted_hosts_are_skipped_before_the_trusted_one() -> None:
    raw = with_results(
        "relay.elsewhere.example; dmarc=fail header.from=corp.example",
        f"{MX} 1; dmarc=pass header.from=CORP.example",
    )
    assert check(raw, DMARC).passed


def test_trusted_ids_and_headers_are_compared_without_regard_to_case_or_folding() -> None:
    folded = "MX.Example.COM;\r\n\tdmarc=pass\r\n header.from=corp.example"
    assert check(with_results(folded), DMARC).passed


@pytest.mark.parametrize(
    ("signer", "passed"),
    [
        ("corp.example", True),
        ("CORP.example", True),
        ("example", False),  # a top-level domain vouches for nobody
        ("mail.corp.example", False),  # a subdomain cannot sign for its parent
        ("xcorp.example", False),
    ],
)
def test_a_trusted_dkim_pass_counts_when_its_domain_aligns_with_from(
    signer: str, passed: bool
) -> None:
    raw = with_results(f"{MX}; dkim=pass (2048-bit key) header.d={signer} header.s=s1")
    assert check(raw, DKIM_HEADERS).passed is passed


def test_a_dkim_pass_of_a_parent_domain_aligns_with_a_subdomain_sender() -> None:
    raw = with_results(f"{MX}; dkim=pass header.d=corp.example")
    verdict = authentication.check(raw, "boss@eu.corp.example", DKIM_HEADERS)
    assert verdict.passed


def test_an_older_mta_s_header_i_identity_aligns_too() -> None:
    assert check(with_results(f"{MX}; dkim=pass header.i=@corp.example"), DKIM_HEADERS).passed


def test_under_dmarc_an_aligned_dkim_pass_counts_only_without_a_trusted_dmarc_verdict() -> None:
    dkim_only = with_results(f"{MX}; dkim=pass header.d=corp.example")
    overruled = with_results(
        f"{MX}; dmarc=fail (p=reject) header.from=corp.example",
        f"{MX}; dkim=pass header.d=corp.example",
    )
    assert check(dkim_only, DMARC).passed
    assert not check(overruled, DMARC).passed


def test_a_dkim_fail_or_a_dmarc_pass_is_no_dkim_pass() -> None:
    raw = with_results(
        f"{MX}; dkim=fail header.d=corp.example; dmarc=pass header.from=corp.example"
    )
    assert not check(raw, DKIM_HEADERS).passed


def test_a_sender_without_a_domain_is_never_authenticated() -> None:
    raw = with_results(f"{MX}; dmarc=pass header.from=corp.example")
    assert not authentication.check(raw, "", DMARC).passed


# -- DKIM verified here -------------------------------------------------------------------


def test_a_signature_verified_here_passes(keys: Keys) -> None:
    verdict = check(keys.sign(REPLY), DKIM_HERE, dnsfunc=keys.dns)
    assert verdict == Verdict(True, "DKIM signature of corp.example verified")
    assert keys.lookups[-1] == b"s1._domainkey.corp.example."


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda raw: raw.replace(b"Approved", b"Rejected"), id="body"),
        pytest.param(lambda raw: raw.replace(b"Boss <boss@", b"Bob <boss@"), id="from-header"),
        pytest.param(
            lambda raw: raw.replace(b"\r\n\r\n", b"\r\nFrom: mallory@corp.example\r\n\r\n", 1),
            id="second-from",
        ),
    ],
)
def test_a_signed_reply_changed_after_signing_fails(
    keys: Keys, tamper: Callable[[bytes], bytes]
) -> None:
    assert not check(tamper(keys.sign(REPLY)), DKIM_HERE, dnsfunc=keys.dns).passed


def test_a_signature_by_another_domain_is_not_even_looked_up(keys: Keys) -> None:
    other = Keys(domain="attacker.example")
    lookups = len(other.lookups)
    verdict = check(other.sign(REPLY), DKIM_HERE, dnsfunc=other.dns)
    assert verdict == Verdict(False, "no DKIM signature aligned with corp.example verified")
    assert len(other.lookups) == lookups


def test_a_signature_whose_key_is_not_published_fails(keys: Keys) -> None:
    assert not check(keys.sign(REPLY), DKIM_HERE, dnsfunc=lambda name, timeout=5: None).passed


def test_a_signature_covering_only_part_of_the_body_is_refused(keys: Keys) -> None:
    signed = keys.sign(REPLY, length=True)  # l=: anything may be added below the signed text
    assert b" l=" in signed or b";l=" in signed or b"\tl=" in signed
    assert not check(signed, DKIM_HERE, dnsfunc=keys.dns).passed


def test_a_resolver_that_fails_is_a_failed_check_not_a_crash(keys: Keys) -> None:
    def broken(name: bytes, timeout: float = 5.0) -> bytes | None:
        raise dkim.DnsTimeoutError("resolver timed out")

    assert not check(keys.sign(REPLY), DKIM_HERE, dnsfunc=broken).passed


def test_slow_key_lookups_share_one_time_budget_per_message(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authentication, "VERIFY_BUDGET", 0.6)
    signed = REPLY
    for selector in ("a", "b", "c"):
        signed = keys.sign(signed, selector=selector)
    asked: list[float] = []

    def slow(name: bytes, timeout: float = 5.0) -> bytes | None:
        asked.append(timeout)
        time.sleep(timeout)  # a name server that never answers
        return None

    started = time.perf_counter()
    assert not check(signed, DKIM_HERE, dnsfunc=slow).passed
    assert time.perf_counter() - started < 1.5
    assert 1 <= len(asked) <= 3
    assert sum(asked) <= 0.6


def test_under_dmarc_a_signature_verified_here_counts_as_an_aligned_dkim_pass(keys: Keys) -> None:
    settings = AuthenticationSettings(require="dmarc", verify_dkim=True)
    assert check(keys.sign(REPLY), settings, dnsfunc=keys.dns).passed


# -- hostile input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(with_results(f"{MX}; dmarc=pass " + "(" * 5000 + ")" * 5000), id="nested"),
        pytest.param(with_results(f"{MX}; dmarc=pass header.from=" + "a" * 100_000), id="long"),
        pytest.param(with_results(*[f"{MX}; dkim=fail header.d=x.example"] * 2000), id="many"),
        pytest.param(b"\r\n" + REPLY, id="no-headers"),
        pytest.param(b"Authentication-Results" + b"x" * 200_000, id="no-end"),
    ],
)
def test_hostile_authentication_results_fail_quickly(raw: bytes) -> None:
    started = time.perf_counter()
    verdict = check(raw, DMARC)
    assert not verdict.passed
    assert time.perf_counter() - started < 2.0


def test_a_body_that_would_make_dkimpy_quadratic_is_not_verified(keys: Keys) -> None:
    # dkimpy's relaxed canonicalisation takes time quadratic in a run of blanks.
    signed = keys.sign(REPLY.replace(b"Approved\r\n", b"Approved " + b" " * 200_000 + b"\r\n"))
    started = time.perf_counter()
    assert not check(signed, DKIM_HERE, dnsfunc=keys.dns).passed
    assert time.perf_counter() - started < 2.0


# -- configuration --------------------------------------------------------------------------


def configured(**authentication_keys: object) -> Config:
    return config_from_dict(
        {
            "daemon": {"secret_key": "a-long-enough-secret-key-for-tests"},
            "inbound": {"reply_domain": "reply.example.com", "authentication": authentication_keys},
            "outbound": {"from_address": "reviews@example.com"},
        }
    )


@pytest.mark.parametrize("require", ["dmarc", "dkim"])
def test_requiring_authentication_with_nothing_to_read_it_from_is_a_config_error(
    require: str,
) -> None:
    with pytest.raises(ConfigError) as error:
        configured(require=require)
    [problem] = error.value.problems
    assert problem.startswith("inbound.authentication: trusted_authserv_ids is empty")
    assert "verify_dkim" in problem


def test_an_authserv_id_that_is_no_host_name_is_a_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError) as error:
        configured(require="dmarc", trusted_authserv_ids=["mx.example.com", "two words"])
    assert error.value.problems == [
        "inbound.authentication.trusted_authserv_ids[1]: 'two words' is not an authserv-id; "
        "write a host name such as mx.example.com"
    ]


def test_authentication_is_off_and_the_thread_fallback_closed_by_default() -> None:
    config = configured()
    assert config.inbound.authentication.require == "none"
    assert config.inbound.thread_fallback is False
    ids = configured(require="dmarc", trusted_authserv_ids=[" MX.Example.com "])
    assert ids.inbound.authentication.trusted_authserv_ids == ("mx.example.com",)
