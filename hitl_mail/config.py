"""Load the TOML configuration file into one frozen, validated `Config`.

Every problem is reported with its key path (`inbound.port: ...`), unknown keys
included (with a "did you mean" when one is close). Values written as
`"env:NAME"` are read from the environment; durations (`"90s"`, `"24h"`) and
sizes (`"10MB"`, `"10MiB"`) are strings turned into typed values here, once.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from datetime import timedelta
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hitl_mail.i18n import languages
from hitl_mail.models import WebhookEvent

DEFAULT_CONFIG_NAME = "hitl-mail.toml"
CONFIG_ENV = "HITL_MAIL_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_AUTHSERV_ID = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]+$")  # RFC 8601 2.5: a value, as atoms
_EMAIL = re.compile(
    r"^[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"
)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists each with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_duration(value: object) -> timedelta:
    """`"90s"`, `"30m"`, `"24h"`, `"7d"`, `"500ms"` (or a number of seconds) → timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        number, unit = match.groups()
        return timedelta(seconds=float(number) * _DURATION_UNITS[unit.lower()])
    raise ValueError(f'{value!r} is not a duration; write e.g. "90s", "30m", "24h" or "7d"')


def parse_size(value: object) -> int:
    """`"10MB"` (powers of 1000) or `"10MiB"` (powers of 1024) → bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        number, unit = match.groups()
        return int(float(number) * _SIZE_UNITS[unit or "B"])
    raise ValueError(f'{value!r} is not a size; write e.g. "10MB" or "10MiB"')


def is_email_address(value: str) -> bool:
    """A bare addr-spec such as `owner@example.com` (no display name)."""
    return bool(_EMAIL.match(value))


def _email(value: object) -> str:
    if not isinstance(value, str) or not is_email_address(value.strip()):
        raise ValueError(f"{value!r} is not an email address")
    return value.strip()


def _mailbox(value: object) -> str:
    """A From-style mailbox: `"Reviews <reviews@example.com>"` or a bare address."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an email address")
    _, addr = parseaddr(value)
    if not is_email_address(addr):
        raise ValueError(f"{value!r} is not an email address")
    return value.strip()


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`"127.0.0.1"`, `"::1"` or `"10.0.0.0/8"` → a network (an address is a network of one)."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(
            f'{value!r} is not an IP address or network; write e.g. "127.0.0.1" or "10.0.0.0/8"'
        ) from None


def _language(value: object) -> str:
    """A language emails are written in: "en", or a catalogue shipped in hitl_mail/locale."""
    known = languages()
    if isinstance(value, str) and value.strip() in known:
        return value.strip()
    raise ValueError(
        f"{value!r} is not a language emails are written in; use one of {sorted(known)}"
    )


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Language = Annotated[str, BeforeValidator(_language)]
IPNetwork = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network)]
Size = Annotated[int, BeforeValidator(parse_size)]
EmailAddress = Annotated[str, BeforeValidator(_email)]
Mailbox = Annotated[str, BeforeValidator(_mailbox)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MIN_SECRET_CHARS = 32
MIN_SECRET_DISTINCT = 8  # 32 random hex digits have 14 on average, and fewer than 8 ~never
# deploy/env.example's value, and what people type when a key is asked for.
_PLACEHOLDER_SECRETS = {"change-me-to-a-long-random-string", "changeme", "secret", "test"}
_PLACEHOLDER_WORDS = (
    "changeme",
    "change-me",
    "change_me",
    "replace-me",
    "replaceme",
    "placeholder",
)
_SECRET_HOWTO = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _secret(value: str) -> str:
    """A signing key that is long and random-looking; the reason otherwise, never the key."""
    lowered = value.strip().lower()
    if lowered in _PLACEHOLDER_SECRETS or any(w in lowered for w in _PLACEHOLDER_WORDS):
        raise ValueError(f"is a placeholder, not a secret; {_SECRET_HOWTO}")
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(
            f"is {len(value)} characters; use at least {MIN_SECRET_CHARS} random ones: "
            + _SECRET_HOWTO
        )
    if len(set(value)) < MIN_SECRET_DISTINCT or (value + value).find(value, 1) < len(value):
        raise ValueError(
            f"is not random (too few distinct characters, or repeats); {_SECRET_HOWTO}"
        )
    return value


SecretKey = Annotated[str, AfterValidator(_secret)]


class DaemonSettings(_Section):
    database_url: str = "sqlite:///hitl-mail.db"
    # Signs reply tokens: whoever knows it can answer any request (check-config refuses weak ones).
    secret_key: SecretKey
    old_secret_keys: tuple[SecretKey, ...] = ()
    poll_interval: Duration = timedelta(milliseconds=250)
    resume_workers: int = Field(default=2, ge=1, le=64)
    resume_priority: Literal["idle", "low"] = "idle"
    shutdown_timeout: Duration = timedelta(seconds=15)


def _authserv_id(value: object) -> str:
    """An authserv-id as RFC 8601 2.5 writes it (in practice a host name), lowercased."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _AUTHSERV_ID.match(text):
        raise ValueError(
            f"{value!r} is not an authserv-id; write a host name such as mx.example.com"
        )
    return text


class AuthenticationSettings(_Section):
    """`[inbound.authentication]`: what proves a reply's From domain (SPEC 9, authentication.py)."""

    require: Literal["none", "dmarc", "dkim"] = "none"
    # Hosts whose Authentication-Results headers (RFC 8601) are believed: your MTA's
    # authserv-id, usually its host name. Headers naming any other host are ignored.
    trusted_authserv_ids: tuple[Annotated[str, BeforeValidator(_authserv_id)], ...] = ()
    # Check DKIM signatures here (dkimpy, DNS lookups) instead of, or beside, the MTA.
    verify_dkim: bool = False

    @model_validator(mode="after")
    def _has_evidence(self) -> AuthenticationSettings:
        if self.require != "none" and not self.trusted_authserv_ids and not self.verify_dkim:
            raise ValueError(
                f'trusted_authserv_ids is empty, so require = "{self.require}" could never '
                "pass: name your MTA's authserv-id (its host name, as written in the "
                "Authentication-Results it adds), or set verify_dkim = true"
            )
        return self


class InboundSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    authentication: AuthenticationSettings = AuthenticationSettings()
    # Match a reply with no token in its recipient through In-Reply-To/References even
    # when its sender is not authenticated (SPEC 9). Off: anyone who saw the thread's
    # Message-ID could then answer with a forged From.
    thread_fallback: bool = False
    reply_domain: str
    # 15 + separator + 48-character token = 64, the local-part limit of RFC 5321 4.5.3.1.1.
    local_part: str = Field(default="reply", pattern=r"^[a-z0-9]{1,15}$")
    separator: Literal["+", "-"] = "+"
    # Longest a stored reply may take to read (parsing.py); a slower one is refused as malformed.
    parse_timeout: Duration = Field(
        default=timedelta(seconds=5), gt=timedelta(0), le=timedelta(minutes=10)
    )
    # A reply is a few KB; 1 MB leaves room for an HTML reply quoting the notification.
    max_message_size: Size = Field(default=1000**2, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False
    # After these, a token is refused at RCPT (550) instead of earning an explanation mail.
    closed_grace: Duration = timedelta(days=7)
    expired_grace: Duration = timedelta(days=7)
    raw_retention: Duration = timedelta(days=7)
    max_recipients: int = Field(default=5, ge=1, le=100)
    # Stored and not yet processed, per request; more get a temporary 452 at RCPT.
    max_pending_replies_per_request: int = Field(default=20, ge=1, le=1000)
    max_connections: int = Field(default=100, ge=1, le=10_000)
    max_connections_per_ip: int = Field(default=10, ge=1, le=10_000)
    max_rcpt_failures_per_ip: int = Field(default=10, ge=1, le=10_000)
    rcpt_failure_window: Duration = Field(default=timedelta(minutes=10), gt=timedelta(0))
    idle_timeout: Duration = Field(default=timedelta(seconds=30), gt=timedelta(0))
    data_timeout: Duration = Field(default=timedelta(minutes=2), gt=timedelta(0))
    # Exempt from the per-IP limits (never from max_connections): the MTA in front.
    trusted_relays: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    @property
    def takes_bare_address(self) -> bool:
        """`reply@reply_domain`, with no token, is accepted only where a thread match may place it."""
        return self.thread_fallback or self.authentication.require != "none"

    @model_validator(mode="after")
    def _tls_pair(self) -> InboundSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.require_starttls and self.tls_cert is None:
            raise ValueError("require_starttls needs tls_cert and tls_key")
        return self


class OutboundSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    from_address: Mailbox
    username: str | None = None
    password: str | None = None
    # Unset: STARTTLS whenever the relay offers it (opportunistic, certificate not checked);
    # true: required and verified; false: never (refused with a username: no login in clear).
    starttls: bool | None = None
    use_tls: bool = False
    # STARTTLS (or use_tls) required and the relay's certificate verified, login or not.
    require_tls: bool = False
    timeout: Duration = timedelta(seconds=30)
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_initial: Duration = timedelta(seconds=5)
    retry_max: Duration = timedelta(minutes=30)

    @model_validator(mode="after")
    def _tls_choice(self) -> OutboundSettings:
        if self.starttls and self.use_tls:
            raise ValueError(
                "choose starttls (upgrade on connect) or use_tls (implicit TLS), not both"
            )
        if self.starttls is False and not self.use_tls and (self.username or self.require_tls):
            why = "require_tls is set" if self.require_tls else "the login would cross in clear"
            raise ValueError(f"starttls = false turns TLS off, but {why}")
        return self

    @property
    def tls_required(self) -> bool:
        """TLS, verified, before anything is sent: asked for, or needed to protect the login."""
        return self.use_tls or bool(self.starttls) or self.require_tls or bool(self.username)

    @property
    def from_addr_spec(self) -> str:
        return parseaddr(self.from_address)[1].lower()

    @property
    def domain(self) -> str:
        return Address(addr_spec=self.from_addr_spec).domain


class TokenSettings(_Section):
    max_age: Duration = timedelta(days=7)


class LLMConfig(_Section):
    model: str = "gpt-4o-mini"
    api_base: str | None = None
    api_key: str | None = None
    timeout: Duration = timedelta(seconds=30)
    retries: int = Field(default=2, ge=0, le=10)
    # Replies decided by the LLM at once; exact answers never wait for these.
    concurrency: int = Field(default=4, ge=1, le=64)


class RuleMatch(_Section):
    method_name: str | None = None
    flow_class: str | None = None


def _fraction(value: object) -> float:
    """`"50%"` or `0.5` → 0.5: a point between a request's creation and its deadline."""
    number = value
    if isinstance(value, str) and value.strip().endswith("%"):
        number = float(value.strip()[:-1]) / 100
    if isinstance(number, int | float) and not isinstance(number, bool) and 0 < number < 1:
        return float(number)
    raise ValueError(f'{value!r} is not a fraction of the deadline; write e.g. "50%" or 0.5')


Fraction = Annotated[float, BeforeValidator(_fraction)]


class TimeoutPolicy(_Section):
    """What happens when nobody answers. In overrides, an unset field keeps the wider setting."""

    enabled: bool | None = None
    timeout: Duration | None = None
    default_outcome: str | None = None
    reminders: tuple[Fraction, ...] | None = None
    escalate_after: Duration | None = None
    escalate_to: EmailAddress | None = None


class RoutingRule(_Section):
    name: str
    match: RuleMatch = RuleMatch()
    assign_to_email: EmailAddress | None = None
    assign_from_input: str | None = None
    auto_response: TimeoutPolicy | None = None
    sla: Duration | None = None
    # How subjects name the flow and step; default from the names, "Review: approve budget".
    label: str | None = Field(default=None, min_length=1, max_length=80)
    language: Language | None = None  # of the emails this rule's requests send

    @model_validator(mode="after")
    def _has_target(self) -> RoutingRule:
        if self.assign_to_email is None and self.assign_from_input is None:
            raise ValueError("a rule needs assign_to_email or assign_from_input")
        return self


class AutoResponseRule(TimeoutPolicy):
    """A per-method-pattern override: the most specific setting, it wins over rule and global."""

    match: RuleMatch


class AutoResponseSettings(TimeoutPolicy):
    enabled: bool | None = False
    timeout: Duration | None = timedelta(hours=24)
    reminders: tuple[Fraction, ...] | None = ()
    rules: tuple[AutoResponseRule, ...] = ()

    @model_validator(mode="after")
    def _outcome_when_enabled(self) -> AutoResponseSettings:
        if self.enabled and not self.default_outcome:
            raise ValueError("enabled auto_response needs default_outcome")
        if (self.escalate_after is None) != (self.escalate_to is None):
            raise ValueError("escalate_after and escalate_to must be set together")
        return self


class RoutingSettings(_Section):
    default_assignee: EmailAddress | None = None
    rules: tuple[RoutingRule, ...] = ()
    # The emails' language: an assignee's own (`languages`), else the rule's, else this.
    language: Language = "en"
    languages: dict[EmailAddress, Language] = Field(default_factory=dict)

    @field_validator("languages")
    @classmethod
    def _by_lowercase_address(cls, languages: dict[str, str]) -> dict[str, str]:
        return {address.lower(): language for address, language in languages.items()}

    def language_for(self, rule_name: str | None, assignee: str | None) -> str:
        """The language a request's emails are written in."""
        if assignee and (own := self.languages.get(assignee.lower())):
            return own
        rule = next((r for r in self.rules if r.name == rule_name), None)
        return (rule.language if rule else None) or self.language

    def label_for(self, rule_name: str | None) -> str | None:
        """The routing rule's `label`, if it has one."""
        rule = next((r for r in self.rules if r.name == rule_name), None)
        return rule.label if rule else None


class FlowSettings(_Section):
    import_paths: tuple[str, ...] = (".",)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class HealthSettings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=9125, ge=0, le=65535)


API_KEY_HASH = "sha256:"
_PUBLIC_URL = re.compile(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$")


def _api_key(value: object) -> str:
    """An operator API key, kept only as `sha256:<hex>` (a value already written so stays as is)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an API key")
    key = value.strip()
    if key.startswith(API_KEY_HASH):
        if not re.fullmatch(r"[0-9a-f]{64}", key[len(API_KEY_HASH) :]):
            raise ValueError("a hashed key is sha256: and 64 lowercase hex digits")
        return key
    if len(key) < 16:
        raise ValueError("an API key must be at least 16 characters (e.g. openssl rand -hex 32)")
    return hash_api_key(key)


def hash_api_key(key: str) -> str:
    """How `[http].api_keys` are held in memory, and may be written in the file."""
    return API_KEY_HASH + hashlib.sha256(key.encode()).hexdigest()


def _public_url(value: object) -> str:
    text = str(value).strip() if isinstance(value, str) else ""
    if not _PUBLIC_URL.match(text):
        raise ValueError(
            f'{value!r} is not a base URL; write e.g. "https://hitl.example.com" '
            "(no query, fragment or user:password)"
        )
    return text.rstrip("/")


class HttpSettings(_Section):
    """`[http]`: the API, callback URLs, the bridge and health on one ASGI server (SPEC 8)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=0, le=65535)
    # Where clients reach this server (behind a reverse proxy): the base of callback_url.
    public_url: Annotated[str, BeforeValidator(_public_url)] | None = None
    api_keys: tuple[Annotated[str, BeforeValidator(_api_key)], ...] = ()
    max_body: Size = Field(default=64 * 1000, gt=0, le=10 * 1000**2)


class BridgeSettings(_Section):
    """`[bridge]`: crewAI's hosted HITL webhooks in, answers out to their callback_url."""

    enabled: bool = False
    path: str = Field(default="/bridge/crewai", pattern=r"^/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")
    signing_secret: str | None = None
    max_skew: Duration = Field(default=timedelta(minutes=5), gt=timedelta(0))
    max_body: Size = Field(default=1000**2, gt=0, le=50 * 1000**2)

    @model_validator(mode="after")
    def _secret_when_enabled(self) -> BridgeSettings:
        if self.enabled and not self.signing_secret:
            raise ValueError(
                'enabled bridge needs signing_secret (e.g. "env:CREWAI_WEBHOOK_SECRET")'
            )
        reserved = ("/api", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
        if any(self.path == r or self.path.startswith(r + "/") for r in reserved):
            raise ValueError(f"path {self.path!r} is taken by hitl-mail's own endpoints")
        return self


def _webhook_event(value: object) -> WebhookEvent:
    try:
        return WebhookEvent(str(value))
    except ValueError:
        names = ", ".join(event.value for event in WebhookEvent)
        raise ValueError(f"{value!r} is not a webhook event; choose from {names}") from None


def _http_url(value: object) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return str(value)


class WebhookSettings(_Section):
    """One `[[webhooks]]` entry: every event it names, signed with its secret, POSTed to its URL."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: Annotated[str, BeforeValidator(_http_url)]
    secret: SecretKey  # long and random, as the daemon's own key: a guessable one forges events
    events: tuple[Annotated[WebhookEvent, BeforeValidator(_webhook_event)], ...] | None = None
    timeout: Duration = Field(default=timedelta(seconds=10), gt=timedelta(0))
    # SPEC 8: the first retry within 10 s, retries for at least an hour.
    retry_initial: Duration = Field(
        default=timedelta(seconds=5), gt=timedelta(0), le=timedelta(seconds=10)
    )
    retry_max: Duration = Field(default=timedelta(minutes=10), gt=timedelta(0))
    retry_for: Duration = Field(default=timedelta(hours=1), gt=timedelta(0))

    def wants(self, event: str) -> bool:
        return self.events is None or event in self.events


class Config(_Section):
    """Everything the daemon and `MailProvider` need, validated once."""

    daemon: DaemonSettings
    inbound: InboundSettings
    outbound: OutboundSettings
    tokens: TokenSettings = TokenSettings()
    llm: LLMConfig = LLMConfig()
    routing: RoutingSettings = RoutingSettings()
    auto_response: AutoResponseSettings = AutoResponseSettings()
    flows: FlowSettings = FlowSettings()
    logging: LoggingSettings = LoggingSettings()
    health: HealthSettings = HealthSettings()
    webhooks: tuple[WebhookSettings, ...] = ()
    http: HttpSettings = HttpSettings()
    bridge: BridgeSettings = BridgeSettings()
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("webhooks")
    @classmethod
    def _unique_webhook_names(
        cls, webhooks: tuple[WebhookSettings, ...]
    ) -> tuple[WebhookSettings, ...]:
        names = [hook.name for hook in webhooks]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"the name {twice[0]!r} is used twice; webhook names must be unique")
        return webhooks

    @model_validator(mode="after")
    def _bridge_needs_http(self) -> Config:
        if self.bridge.enabled and not self.http.enabled:
            raise ValueError(
                "bridge.enabled: the bridge is served by [http]; set http.enabled = true"
            )
        return self

    @property
    def secret_keys(self) -> tuple[str, ...]:
        """The signing key first, then older keys still accepted (rotation)."""
        return (self.daemon.secret_key, *self.daemon.old_secret_keys)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """`--config`, else `$HITL_MAIL_CONFIG`, else `./hitl-mail.toml`."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, resolve and validate; raise `ConfigError` listing every problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return config_from_dict(raw, base_dir=path.resolve().parent, source=path)


def config_from_dict(
    raw: dict[str, Any], *, base_dir: Path | None = None, source: Path | None = None
) -> Config:
    """Validate an already-parsed mapping (the demo and tests build configs this way)."""
    problems: list[str] = []
    resolved = _resolve_env(raw, (), problems)
    try:
        config = Config.model_validate({**resolved, "source": source})
    except ValidationError as exc:
        # A key whose env: variable is unset is already reported; its None is no news.
        unset = {problem.partition(":")[0] for problem in problems}
        problems.extend(p for p in _describe(exc) if p.partition(":")[0] not in unset)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return _anchor_paths(config, base_dir) if base_dir else config


def _resolve_env(value: Any, path: tuple[str | int, ...], problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve_env(v, (*path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v, (*path, i), problems) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            problems.append(f"{_dotted(path)}: environment variable {name} is not set")
            return None
        return os.environ[name]
    return value


def _dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = tuple(
            p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        where = _dotted(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key{_suggestion(loc)}")
        elif error["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
    return problems


def _suggestion(loc: tuple[str | int, ...]) -> str:
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field else None
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _anchor_paths(config: Config, base_dir: Path) -> Config:
    """Relative SQLite files and import paths are relative to the config file.

    The daemon and every flow process that uses `MailProvider` read the same
    file from different working directories; anchoring keeps them on one
    database.
    """
    url = config.daemon.database_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and ":memory:" not in url:
        url = prefix + str(base_dir / url[len(prefix) :])
    paths = tuple(str(base_dir / p) for p in config.flows.import_paths)
    return config.model_copy(
        update={
            "daemon": config.daemon.model_copy(update={"database_url": url}),
            "flows": config.flows.model_copy(update={"import_paths": paths}),
        }
    )
