"""Routing: rules in order, state before fixed addresses, then the default assignee."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from hitl_mail.config import RoutingSettings, config_from_dict
from hitl_mail.routing import Assignment, RoutingError, lookup, route

FLOW = "billing.BudgetFlow"


def _settings(*rules: dict[str, Any], default: str | None = None) -> RoutingSettings:
    """Routing settings validated the way the configuration file is."""
    routing: dict[str, Any] = {"rules": list(rules)}
    if default is not None:
        routing["default_assignee"] = default
    config = config_from_dict(
        {
            "daemon": {"secret_key": "a-test-secret-of-more-than-16-chars"},
            "inbound": {"reply_domain": "reply.example.com"},
            "outbound": {"from_address": "reviews@example.com"},
            "routing": routing,
        }
    )
    return config.routing


def _to(
    settings: RoutingSettings,
    method_name: str,
    *,
    flow_class: str = FLOW,
    state: Any = None,
) -> str:
    return route(
        settings, method_name=method_name, flow_class=flow_class, state=state or {}
    ).address


class Manager(BaseModel):
    email: str | None = None


class BudgetState(BaseModel):
    manager_email: str | None = None
    manager: Manager = Manager()


APPROVALS = {
    "name": "Approvals to Finance",
    "match": {"method_name": "approve_*"},
    "assign_to_email": "finance@example.com",
    "assign_from_input": "manager_email",
}


# Matching


@pytest.mark.parametrize(
    ("method_name", "expected"),
    [
        ("approve_budget", "finance@example.com"),
        ("approve_", "finance@example.com"),
        ("review_x", "owner@example.com"),
        ("pre_approve_budget", "owner@example.com"),
        ("Approve_budget", "owner@example.com"),
    ],
)
def test_a_star_in_method_name_matches_any_characters(method_name: str, expected: str) -> None:
    settings = _settings(
        {
            "name": "Approvals",
            "match": {"method_name": "approve_*"},
            "assign_to_email": "finance@example.com",
        },
        default="owner@example.com",
    )
    assert _to(settings, method_name) == expected


@pytest.mark.parametrize(
    ("method_name", "expected"),
    [
        ("step1", "qa@example.com"),
        ("step9", "qa@example.com"),
        ("step", "owner@example.com"),
        ("step10", "owner@example.com"),
    ],
)
def test_a_question_mark_matches_exactly_one_character(method_name: str, expected: str) -> None:
    settings = _settings(
        {"name": "Steps", "match": {"method_name": "step?"}, "assign_to_email": "qa@example.com"},
        default="owner@example.com",
    )
    assert _to(settings, method_name) == expected


def test_flow_class_is_matched_as_a_glob_too() -> None:
    settings = _settings(
        {
            "name": "Billing",
            "match": {"flow_class": "billing.*"},
            "assign_to_email": "finance@example.com",
        },
        default="owner@example.com",
    )
    assert _to(settings, "review", flow_class="billing.BudgetFlow") == "finance@example.com"
    assert _to(settings, "review", flow_class="hr.HiringFlow") == "owner@example.com"


def test_a_rule_matching_on_both_keys_needs_both_to_match() -> None:
    settings = _settings(
        {
            "name": "Billing approvals",
            "match": {"method_name": "approve_*", "flow_class": "billing.*"},
            "assign_to_email": "finance@example.com",
        },
        default="owner@example.com",
    )
    assert _to(settings, "approve_budget", flow_class="billing.BudgetFlow") == "finance@example.com"
    assert _to(settings, "approve_budget", flow_class="hr.HiringFlow") == "owner@example.com"
    assert _to(settings, "review", flow_class="billing.BudgetFlow") == "owner@example.com"


def test_a_rule_with_an_empty_match_applies_to_every_request() -> None:
    settings = _settings({"name": "Everything", "assign_to_email": "triage@example.com"})
    assert _to(settings, "anything", flow_class="any.Flow") == "triage@example.com"


def test_the_first_matching_rule_wins() -> None:
    settings = _settings(
        {
            "name": "Specific",
            "match": {"method_name": "approve_budget"},
            "assign_to_email": "cfo@example.com",
        },
        {
            "name": "General",
            "match": {"method_name": "approve_*"},
            "assign_to_email": "finance@example.com",
        },
    )
    assignment = route(settings, method_name="approve_budget", flow_class=FLOW, state={})
    assert assignment == Assignment("cfo@example.com", "Specific", "assign_to_email")
    assert _to(settings, "approve_travel") == "finance@example.com"


def test_the_default_assignee_is_used_when_no_rule_matches() -> None:
    settings = _settings(APPROVALS, default="owner@example.com")
    assignment = route(settings, method_name="review", flow_class=FLOW, state={})
    assert assignment == Assignment("owner@example.com", None, "default_assignee")


# Addresses taken from the flow state


def test_an_address_in_the_state_wins_over_the_rules_fixed_address() -> None:
    settings = _settings(APPROVALS)
    assignment = route(
        settings,
        method_name="approve_budget",
        flow_class=FLOW,
        state={"manager_email": "manager@example.com"},
    )
    assert assignment == Assignment(
        "manager@example.com", "Approvals to Finance", "assign_from_input:manager_email"
    )


def test_a_dotted_path_reaches_into_nested_state() -> None:
    settings = _settings({**APPROVALS, "assign_from_input": "manager.email"})
    state = {"manager": {"email": "boss@example.com"}}
    assert _to(settings, "approve_budget", state=state) == "boss@example.com"


def test_a_dotted_path_reaches_into_a_pydantic_state_model() -> None:
    settings = _settings({**APPROVALS, "assign_from_input": "manager.email"})
    state = BudgetState(manager=Manager(email="boss@example.com"))
    assert _to(settings, "approve_budget", state=state) == "boss@example.com"


def test_a_flat_key_is_read_from_a_pydantic_state_model() -> None:
    settings = _settings(APPROVALS)
    state = BudgetState(manager_email="manager@example.com")
    assert _to(settings, "approve_budget", state=state) == "manager@example.com"


def test_an_address_from_the_state_is_stripped_of_surrounding_spaces() -> None:
    settings = _settings(APPROVALS)
    state = {"manager_email": "  manager@example.com\n"}
    assert _to(settings, "approve_budget", state=state) == "manager@example.com"


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"manager_email": None},
        {"manager_email": ""},
        BudgetState(),
    ],
)
def test_without_the_input_the_rules_fixed_address_is_used(state: Any) -> None:
    settings = _settings(APPROVALS, default="owner@example.com")
    assignment = route(settings, method_name="approve_budget", flow_class=FLOW, state=state)
    assert assignment == Assignment(
        "finance@example.com", "Approvals to Finance", "assign_to_email"
    )


def test_a_missing_nested_input_falls_back_to_the_rules_fixed_address() -> None:
    settings = _settings({**APPROVALS, "assign_from_input": "manager.email"})
    states: list[Any] = [{}, {"manager": {}}, {"manager": None}, BudgetState()]
    for state in states:
        assert _to(settings, "approve_budget", state=state) == "finance@example.com"


def test_a_rule_with_only_an_input_key_passes_on_when_the_state_lacks_it() -> None:
    settings = _settings(
        {
            "name": "Manager",
            "match": {"method_name": "approve_*"},
            "assign_from_input": "manager_email",
        },
        {
            "name": "Finance",
            "match": {"method_name": "approve_*"},
            "assign_to_email": "finance@example.com",
        },
        default="owner@example.com",
    )
    assignment = route(settings, method_name="approve_budget", flow_class=FLOW, state={})
    assert assignment == Assignment("finance@example.com", "Finance", "assign_to_email")


@pytest.mark.parametrize(
    "value", ["not-an-address", "Boss <boss@example.com>", 42, ["a@example.com"]]
)
def test_an_invalid_address_in_the_state_is_an_error_naming_the_rule_and_key(
    value: Any,
) -> None:
    settings = _settings(APPROVALS, default="owner@example.com")
    with pytest.raises(RoutingError) as caught:
        route(
            settings, method_name="approve_budget", flow_class=FLOW, state={"manager_email": value}
        )
    message = str(caught.value)
    assert "Approvals to Finance" in message
    assert "manager_email" in message
    assert repr(value) in message


# Nobody to ask


def test_no_matching_rule_and_no_default_is_an_error() -> None:
    settings = _settings(APPROVALS)
    with pytest.raises(RoutingError, match=r"billing\.BudgetFlow\.review: no routing rule matched"):
        route(settings, method_name="review", flow_class=FLOW, state={})


def test_no_rules_at_all_and_no_default_is_an_error() -> None:
    with pytest.raises(RoutingError, match="no default_assignee"):
        route(RoutingSettings(), method_name="review", flow_class=FLOW, state={})


def test_an_input_only_rule_without_its_input_and_no_default_says_what_was_missing() -> None:
    settings = _settings(
        {
            "name": "Manager",
            "match": {"method_name": "approve_*"},
            "assign_from_input": "manager_email",
        }
    )
    with pytest.raises(RoutingError, match="rule 'Manager': state has no 'manager_email'"):
        route(settings, method_name="approve_budget", flow_class=FLOW, state={})


# The settings themselves


def test_routing_settings_can_be_built_directly() -> None:
    settings = RoutingSettings.model_validate(
        {"default_assignee": "owner@example.com", "rules": [APPROVALS]}
    )
    assert _to(settings, "approve_budget") == "finance@example.com"
    assert _to(settings, "review") == "owner@example.com"


@pytest.mark.parametrize(
    ("state", "path", "expected"),
    [
        ({"a": {"b": {"c": 1}}}, "a.b.c", 1),
        ({"a": [{"b": "x"}, {"b": "y"}]}, "a.1.b", "y"),
        ({"a": [{"b": "x"}]}, "a.5.b", None),
        ({"a": {"b": None}}, "a.b.c", None),
        (BudgetState(manager=Manager(email="m@example.com")), "manager.email", "m@example.com"),
        (BudgetState(), "nothing.here", None),
    ],
)
def test_lookup_follows_dotted_paths_through_mappings_lists_and_models(
    state: Any, path: str, expected: Any
) -> None:
    assert lookup(state, path) == expected
