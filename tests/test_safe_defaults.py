"""Safe by default: weak signing keys are refused, the database is private, mail goes over TLS.

A signing key is refused when it is a known placeholder or could be guessed;
the SQLite file and its WAL are created 0600 whatever the umask; outbound
mail takes STARTTLS whenever the relay offers it, and a login (or
`[outbound].require_tls`) never crosses without verified TLS. The relay is a
real aiosmtpd server with STARTTLS and AUTH on loopback.
"""

from __future__ import annotations

import os
import secrets
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import QUIET_ENV, free_port, self_signed, until

from hitl_mail.config import ConfigError, OutboundSettings, config_from_dict
from hitl_mail.outbound import PermanentFailure, SmtpSender, TemporaryFailure
from hitl_mail.store import Store

ROOT = Path(__file__).parent.parent
EXAMPLE_ENV = ROOT / "deploy" / "env.example"
STRONG = secrets.token_urlsafe(32)
MESSAGE = b"From: reviews@example.com\r\nTo: owner@example.com\r\nSubject: x\r\n\r\nhello\r\n"


def _minimal(**daemon: Any) -> dict[str, Any]:
    return {
        "daemon": {"secret_key": STRONG, **daemon},
        "inbound": {"reply_domain": "reply.example.com"},
        "outbound": {"from_address": "Reviews <reviews@example.com>"},
    }


def _placeholder_in_env_example() -> str:
    for line in EXAMPLE_ENV.read_text(encoding="utf-8").splitlines():
        if line.startswith("HITL_MAIL_SECRET="):
            return line.partition("=")[2]
    raise AssertionError("deploy/env.example sets no HITL_MAIL_SECRET")


# -- signing keys ---------------------------------------------------------------------------


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("key", "why"),
    [
        (_placeholder_in_env_example(), "placeholder"),
        ("changeme", "placeholder"),
        ("secret", "placeholder"),
        ("test", "placeholder"),
        ("CHANGEME-please-0123456789abcdef0123", "placeholder"),
        ("Xq3-vT9", "at least 32"),
        ("k8#pW2!zR5@mN7$cL4%hJ6^fD9&sA1*", "at least 32"),  # 31 characters
        ("ab" * 20, "not random"),
        ("0123456789abcdef" * 3, "not random"),  # 16 distinct, but a repeat
    ],
    ids=[
        "env-example",
        "changeme",
        "secret",
        "test",
        "placeholder-word",
        "short",
        "31-chars",
        "few-distinct",
        "repeating",
    ],
)
def test_a_weak_or_placeholder_secret_key_is_refused_by_name_without_echoing_it(
    key: str, why: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_minimal(secret_key=key))

    [problem] = refused.value.problems
    assert problem.startswith("daemon.secret_key: ")
    assert why in problem
    if len(key) > len("secret"):  # shorter words occur in the advice itself
        assert key not in problem


@pytest.mark.sqlite_only
def test_a_weak_old_secret_key_is_refused_too_since_tokens_it_signed_still_answer() -> None:
    with pytest.raises(ConfigError, match=r"daemon\.old_secret_keys\[1\]: is a placeholder"):
        config_from_dict(_minimal(old_secret_keys=[secrets.token_hex(16), "changeme"]))


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "key",
    [secrets.token_urlsafe(32), secrets.token_hex(16), secrets.token_hex(32)],
    ids=["urlsafe-32", "hex-32-chars", "hex-64-chars"],
)
def test_a_generated_secret_key_is_accepted(key: str) -> None:
    assert config_from_dict(_minimal(secret_key=key)).daemon.secret_key == key


@pytest.mark.sqlite_only
def test_check_config_says_why_the_example_placeholder_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "hitl-mail.toml"
    config.write_text(
        '[daemon]\nsecret_key = "env:HITL_MAIL_SECRET"\n'
        '[inbound]\nreply_domain = "reply.example.com"\n'
        '[outbound]\nfrom_address = "reviews@example.com"\n',
        encoding="utf-8",
    )
    env = {**os.environ, **QUIET_ENV, "HITL_MAIL_SECRET": _placeholder_in_env_example()}

    out = subprocess.run(
        [sys.executable, "-m", "hitl_mail.cli", "check-config", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 2
    assert "daemon.secret_key: is a placeholder" in out.stderr
    assert "secrets.token_urlsafe(32)" in out.stderr  # how to make a good one
    assert _placeholder_in_env_example() not in out.stderr + out.stdout


# -- the SQLite file ------------------------------------------------------------------------


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.iterdir())}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The umask most shells and service managers outside systemd's defaults give: 022."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.sqlite_only
@pytest.mark.usefixtures("open_umask")
def test_the_daemon_creates_its_sqlite_file_and_wal_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hitl.db'}")
    try:
        store.migrate()
        assert _modes(tmp_path) == {"hitl.db": 0o600, "hitl.db-shm": 0o600, "hitl.db-wal": 0o600}
    finally:
        store.close()


@pytest.mark.sqlite_only
def test_a_flow_process_that_creates_the_sqlite_file_creates_it_private_too(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hitl-mail.toml"
    config.write_text(
        f'[daemon]\nsecret_key = "{STRONG}"\ndatabase_url = "sqlite:///flows.db"\n'
        '[inbound]\nreply_domain = "reply.example.com"\n'
        '[outbound]\nfrom_address = "reviews@example.com"\n',
        encoding="utf-8",
    )
    code = (
        "import os; os.umask(0o022)\n"
        "from hitl_mail.provider import MailProvider\n"
        f"config, store = MailProvider({str(config)!r})._resources()\n"
        "store.close()\n"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert _modes(tmp_path)["flows.db"] == 0o600


@pytest.mark.sqlite_only
@pytest.mark.usefixtures("open_umask")
def test_an_existing_sqlite_file_keeps_the_permissions_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "hitl.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    store = Store(f"sqlite:///{path}")
    store.migrate()
    store.close()
    assert _modes(tmp_path)["hitl.db"] == 0o640


# -- outbound TLS ---------------------------------------------------------------------------


@dataclass
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1: the relay's, and (when a test says) trusted."""
    folder = tmp_path_factory.mktemp("relay-cert")
    return Certificate(*self_signed(folder, "relay.test", ip="127.0.0.1"))


@dataclass
class TlsRelay:
    """A real SMTP relay on loopback; it records each session's TLS, login and message."""

    port: int
    tls: ssl.SSLContext | None
    received: list[tuple[bool, str | None]] = field(default_factory=list)  # (over TLS, login)
    logins_in_clear: int = 0
    controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data.decode() if isinstance(session.auth_data, bytes) else None
        self.received.append((session.ssl is not None, login))
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if session.ssl is None:
            self.logins_in_clear += 1
        ok = isinstance(data, LoginPassword) and data.password == b"relay-password"
        return AuthResult(success=ok, auth_data=data.login if ok else None)

    def start(self) -> None:
        self.controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            tls_context=self.tls,
            authenticator=self.authenticate,
            auth_require_tls=False,  # a client that logs in over clear text is counted, not stopped
        )
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()


@pytest.fixture(params=["with-starttls", "plain-only"])
def relay(request: pytest.FixtureRequest, certificate: Certificate) -> Iterator[TlsRelay]:
    tls = certificate.server_context() if request.param == "with-starttls" else None
    relay = TlsRelay(free_port(), tls)
    relay.start()
    yield relay
    relay.stop()


def settings(relay: TlsRelay, **values: Any) -> OutboundSettings:
    return OutboundSettings(
        host="127.0.0.1", port=relay.port, from_address="reviews@example.com", **values
    )


async def send(outbound: OutboundSettings) -> Exception | None:
    sender = SmtpSender(outbound)
    try:
        await sender.send(MESSAGE, "owner@example.com")
    except (TemporaryFailure, PermanentFailure) as exc:
        return exc
    finally:
        await sender.close()
    return None


@pytest.mark.sqlite_only
async def test_by_default_mail_takes_starttls_when_the_relay_offers_it_and_goes_plain_otherwise(
    relay: TlsRelay,
) -> None:
    assert await send(settings(relay)) is None

    await until(lambda: relay.received, "the relay to receive the message")
    assert relay.received == [(relay.tls is not None, None)]


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "values",
    [{"username": "hitl", "password": "relay-password"}, {"require_tls": True}],
    ids=["with-a-login", "require-tls"],
)
async def test_a_login_or_require_tls_never_sends_over_a_relay_without_verified_tls(
    relay: TlsRelay, values: dict[str, Any]
) -> None:
    refused = await send(settings(relay, **values))  # plain-only, or a certificate we don't trust

    assert isinstance(refused, TemporaryFailure)  # retried: the relay may be fixed
    assert relay.received == []
    assert relay.logins_in_clear == 0


@pytest.mark.sqlite_only
async def test_a_login_goes_over_verified_starttls_to_a_relay_whose_certificate_is_trusted(
    certificate: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))  # the system's trust store, here
    relay = TlsRelay(free_port(), certificate.server_context())
    relay.start()
    try:
        outbound = settings(relay, username="hitl", password="relay-password")
        assert await send(outbound) is None
        await until(lambda: relay.received, "the relay to receive the message")
    finally:
        relay.stop()
    assert relay.received == [(True, "hitl")]
    assert relay.logins_in_clear == 0


@pytest.mark.sqlite_only
def test_turning_starttls_off_is_refused_when_a_login_or_require_tls_needs_it() -> None:
    base = {"from_address": "reviews@example.com", "starttls": False}
    for extra in ({"username": "hitl", "password": "x"}, {"require_tls": True}):
        with pytest.raises(ConfigError, match=r"outbound: starttls = false turns TLS off"):
            config_from_dict({**_minimal(), "outbound": {**base, **extra}})
    assert config_from_dict({**_minimal(), "outbound": base}).outbound.starttls is False
