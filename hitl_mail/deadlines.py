"""Work out what happens to a request if nobody answers: its timers, from the configuration.

Settings come from three places, the more specific winning field by field:
`[auto_response]` (global), then the `auto_response` of the routing rule that
assigned the request, then the first `[[auto_response.rules]]` whose `match`
fits the method (a per-method-pattern setting). Timeouts count from the
moment the request is stored (SPEC 7). A default outcome that is not one of
the request's `emit` is a configuration error recorded on the request; it
never reaches the deadline to fail there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hitl_mail.config import Config, TimeoutPolicy
from hitl_mail.models import Timer, TimerKind
from hitl_mail.routing import matches

_FIELDS = ("enabled", "timeout", "default_outcome", "reminders", "escalate_after", "escalate_to")


@dataclass(frozen=True)
class Plan:
    deadline: datetime | None = None  # when the auto-response fires
    auto_outcome: str | None = None
    reminders: tuple[datetime, ...] = ()
    escalate_at: datetime | None = None
    sla: timedelta | None = None
    problems: list[str] = field(default_factory=list)

    def timers(self, request_id: str) -> list[Timer]:
        rows = [
            Timer(request_id=request_id, kind=TimerKind.REMINDER, due_at=at)
            for at in self.reminders
        ]
        if self.escalate_at is not None:
            rows.append(
                Timer(request_id=request_id, kind=TimerKind.ESCALATE, due_at=self.escalate_at)
            )
        if self.deadline is not None:
            rows.append(Timer(request_id=request_id, kind=TimerKind.AUTO, due_at=self.deadline))
        return rows


def effective_policy(
    config: Config, rule_name: str | None, method_name: str, flow_class: str
) -> dict[str, Any]:
    """The merged settings for one request: global, then its routing rule, then a method pattern."""
    auto = config.auto_response
    merged = {name: getattr(auto, name) for name in _FIELDS}
    rule = next((r for r in config.routing.rules if r.name == rule_name), None)
    layers: list[TimeoutPolicy | None] = [rule.auto_response if rule else None]
    layers.append(next((r for r in auto.rules if matches(r.match, method_name, flow_class)), None))
    for layer in layers:
        if layer is not None:
            merged.update(
                {name: getattr(layer, name) for name in _FIELDS if getattr(layer, name) is not None}
            )
    return merged


def plan(
    config: Config,
    *,
    rule_name: str | None,
    method_name: str,
    flow_class: str,
    emit: list[str] | None,
    created_at: datetime,
) -> Plan:
    policy = effective_policy(config, rule_name, method_name, flow_class)
    problems: list[str] = []
    rule = next((r for r in config.routing.rules if r.name == rule_name), None)
    sla = rule.sla if rule else None
    deadline, outcome = _auto(policy, emit, created_at, problems)
    escalate_at = _escalation(policy, created_at, problems)
    horizon = deadline or escalate_at
    reminders = (
        tuple(created_at + (horizon - created_at) * f for f in sorted(policy["reminders"] or ()))
        if horizon
        else ()
    )
    return Plan(deadline, outcome, reminders, escalate_at, sla, problems)


def _auto(
    policy: dict[str, Any], emit: list[str] | None, created_at: datetime, problems: list[str]
) -> tuple[datetime | None, str | None]:
    if not policy["enabled"]:
        return None, None
    outcome = policy["default_outcome"]
    if not outcome:
        problems.append("auto_response is enabled but no default_outcome applies to this request")
        return None, None
    if emit and outcome not in emit:
        problems.append(
            f"auto_response default_outcome {outcome!r} is not one of this request's emit {emit}"
        )
        return None, None
    if policy["timeout"] is None:
        problems.append("auto_response is enabled but no timeout applies to this request")
        return None, None
    return created_at + policy["timeout"], outcome


def _escalation(
    policy: dict[str, Any], created_at: datetime, problems: list[str]
) -> datetime | None:
    after, to = policy["escalate_after"], policy["escalate_to"]
    if after is None and to is None:
        return None
    if after is None or to is None:
        problems.append("escalation needs both escalate_after and escalate_to")
        return None
    escalate_at: datetime = created_at + after
    return escalate_at
