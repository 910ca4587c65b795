"""Decide who must answer a request: routing rules in order, then the default assignee."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from hitl_mail.config import RoutingSettings, RuleMatch, is_email_address


class RoutingError(Exception):
    """Nobody valid to ask: the message says which rule or key produced what."""


@dataclass(frozen=True)
class Assignment:
    address: str
    rule: str | None  # the rule's name, None for the default assignee
    via: str  # "assign_from_input:<key>", "assign_to_email" or "default_assignee"


def route(
    settings: RoutingSettings, *, method_name: str, flow_class: str, state: Any
) -> Assignment:
    """The first matching rule that yields an address wins; else `default_assignee`.

    Within a rule, `assign_from_input` (a key, or a dotted path, into the flow
    state) beats `assign_to_email` when the state has it. A present but
    invalid address is an error, never a silent fallback to someone else.
    """
    skipped: list[str] = []
    for rule in settings.rules:
        if not matches(rule.match, method_name, flow_class):
            continue
        if rule.assign_from_input is not None:
            value = lookup(state, rule.assign_from_input)
            if value is not None and value != "":
                return Assignment(
                    _valid(value, f"rule {rule.name!r}: state {rule.assign_from_input!r}"),
                    rule.name,
                    f"assign_from_input:{rule.assign_from_input}",
                )
            skipped.append(f"rule {rule.name!r}: state has no {rule.assign_from_input!r}")
        if rule.assign_to_email is not None:
            return Assignment(rule.assign_to_email, rule.name, "assign_to_email")
    if settings.default_assignee:
        return Assignment(settings.default_assignee, None, "default_assignee")
    why = "; ".join(skipped) or "no routing rule matched"
    raise RoutingError(
        f"no assignee for {flow_class}.{method_name}: {why}, and no default_assignee"
    )


def lookup(state: Any, path: str) -> Any:
    """`a.b.c` into nested mappings, attributes (pydantic state) or list indices."""
    current = state
    for part in path.split("."):
        if isinstance(current, Mapping):
            current = current.get(part)
        elif isinstance(current, list | tuple) and part.isdigit():
            index = int(part)
            current = current[index] if index < len(current) else None
        else:
            current = getattr(current, part, None)
        if current is None:
            return None
    return current


def matches(match: RuleMatch, method_name: str, flow_class: str) -> bool:
    """Every key the rule sets must fit (fnmatch, case-sensitive)."""
    if match.method_name is not None and not fnmatchcase(method_name, match.method_name):
        return False
    return match.flow_class is None or fnmatchcase(flow_class, match.flow_class)


def _valid(value: Any, where: str) -> str:
    if not isinstance(value, str) or not is_email_address(value.strip()):
        raise RoutingError(f"{where} is {value!r}, which is not an email address")
    return value.strip()
