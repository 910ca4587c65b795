"""Callback URLs both ways: the signed one we hand out, and a bridged request's answer POST.

`POST {public_url}/api/requests/{id}/callback?token=…` answers request `id`
over HTTP (api.py). The token is the whole credential: itsdangerous signs the
request id and the time it was issued, with a salt of its own (a reply token
can never pass for a callback token, nor the reverse), under the daemon's
`secret_key` (old keys still verify, as for reply tokens). It expires after
`[tokens].max_age`, like the reply address in the notification.

The id is in the path as well as in the token, so a token for one request
sent to another's URL is told apart (403) from a token that is no token at
all (401).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from sqlmodel import Session

from hitl_mail import webhooks
from hitl_mail.config import Config
from hitl_mail.models import FeedbackRequest, HttpOutboxRow

SALT = "hitl-mail.callback-token"
PATH = "/api/requests/{request_id}/callback"


class BadCallbackToken(Exception):
    """Not a callback token of ours (malformed, or signed by no key we have)."""


class ExpiredCallbackToken(Exception):
    """A genuine callback token, older than `[tokens].max_age`."""


class OtherRequestToken(Exception):
    """A genuine callback token, for another request than the URL names."""


@dataclass(frozen=True)
class CallbackTokens:
    """Callback tokens under the daemon's keys: the first signs, all verify."""

    keys: Sequence[str]
    max_age: timedelta

    @classmethod
    def of(cls, config: Config) -> CallbackTokens:
        return cls(config.secret_keys, config.tokens.max_age)

    def _serializer(self, issued_at: datetime | None = None) -> URLSafeTimedSerializer:
        signer: type[TimestampSigner] = TimestampSigner
        if issued_at is not None:
            stamp = int(issued_at.timestamp())
            signer = type("IssuedAt", (TimestampSigner,), {"get_timestamp": lambda _: stamp})
        # itsdangerous signs with the last key of the list and tries them all.
        return URLSafeTimedSerializer(
            list(reversed(self.keys)),
            salt=SALT,
            signer=signer,
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def mint(self, request_id: str, issued_at: datetime | None = None) -> str:
        """A token for `request_id`, issued now (or at `issued_at`, for tests of expiry)."""
        return str(self._serializer(issued_at).dumps(request_id))

    def verify(self, token: str, request_id: str) -> None:
        """Return if `token` answers `request_id`; raise one of this module's exceptions if not.

        The signature is checked before the age, so a forgery is never reported
        as merely expired; a genuine token for another request is reported as
        such only once its signature is known to be ours.
        """
        serializer = self._serializer()
        try:
            named = serializer.loads(token, max_age=int(self.max_age.total_seconds()))
        except SignatureExpired as exc:
            # The signature held (itsdangerous checks it before the age).
            if exc.payload is None or serializer.load_payload(exc.payload) != request_id:
                raise OtherRequestToken() from None
            raise ExpiredCallbackToken() from None
        except BadSignature:
            raise BadCallbackToken() from None
        if named != request_id:
            raise OtherRequestToken()


def callback_path(request_id: str) -> str:
    return PATH.format(request_id=quote(request_id, safe=""))


def callback_url(config: Config, request_id: str) -> str | None:
    """Where an answer to `request_id` may be POSTed; None without `[http].public_url`."""
    base = config.http.public_url
    if not config.http.enabled or not base:
        return None
    token = CallbackTokens.of(config).mint(request_id)
    return f"{base}{callback_path(request_id)}?token={token}"


# -- the other direction: a bridged request's answer, POSTed to the hosted platform ----

BRIDGED_PREFIX = "crewai-hosted:"  # the flow_class of a request the bridge stored


def is_bridged(flow_class: str | None) -> bool:
    """A request from crewAI's hosted platform: answered by a POST, never resumed here."""
    return bool(flow_class) and str(flow_class).startswith(BRIDGED_PREFIX)


def bridged_answer(request: FeedbackRequest) -> HttpOutboxRow | None:
    """The POST that answers a bridged request on the hosted platform; None for other requests.

    `{"feedback": "<first line>", "source": "email"}` as the hosted callback
    expects (SPEC 8); an auto-response has no line, so its outcome is the feedback.
    """
    return _answer_row(
        request.id, request.flow_class, request.context, request.feedback, request.outcome
    )


def _answer_row(
    request_id: str,
    flow_class: str | None,
    context: Mapping[str, Any] | None,
    feedback: str | None,
    outcome: str | None,
) -> HttpOutboxRow | None:
    url = ((context or {}).get("bridge") or {}).get("callback_url")
    if not is_bridged(flow_class) or not url:
        return None
    body = {"feedback": feedback or outcome or "", "source": "email"}
    return webhooks.callback_row(url, body, request_id)


_requests = FeedbackRequest.__table__  # type: ignore[attr-defined]
_BRIDGED = sa.select(
    _requests.c.id,
    _requests.c.flow_class,
    _requests.c.context,
    _requests.c.feedback,
    _requests.c.outcome,
).where(
    _requests.c.id == sa.bindparam("rid"),
    _requests.c.flow_class.startswith(BRIDGED_PREFIX, autoescape=True),
)


def bridged_answer_rows(session: Session, request_id: str) -> list[HttpOutboxRow]:
    """`bridged_answer` of the request as this transaction sees it; [] unless it is bridged.

    One primary-key read that finds nothing for a local flow's request, so
    every answer can ask it in its own transaction.
    """
    found = session.connection().execute(_BRIDGED, {"rid": request_id}).mappings().first()
    if found is None:
        return []
    row = _answer_row(
        found["id"], found["flow_class"], found["context"], found["feedback"], found["outcome"]
    )
    return [] if row is None else [row]
