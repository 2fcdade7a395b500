"""Unit tests of :mod:`gathering_tasks.pipelines.evaluate`: what nodes compute without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from gathering_tasks.errors import InvalidInput
from gathering_tasks.pipelines.definition import parse_pipeline
from gathering_tasks.pipelines.evaluate import (
    action_call,
    condition_output,
    map_output,
    passed_on,
    truthy,
)
from gathering_tasks.pipelines.planner import NodeState, node_input
from gathering_tasks.pipelines.templates import TemplateError

SPEC = parse_pipeline(
    {
        "nodes": [
            {"id": "start", "type": "trigger"},
            {
                "id": "fetch",
                "type": "action",
                "config": {
                    "action_type": "call_api",
                    "config": {"url": "https://api.example.com/users/{{ trigger.user }}"},
                },
            },
            {
                "id": "big",
                "type": "condition",
                "config": {"expression": "length(nodes.fetch.output.body.items) > `1`"},
            },
            {
                "id": "each",
                "type": "map",
                "config": {
                    "source": "{{ nodes.fetch.output.body.items }}",
                    "max_items": 3,
                    "action": {
                        "action_type": "call_api",
                        "config": {
                            "url": "{{ item.href }}",
                            "headers": {"X-Index": "n{{ index }}"},
                        },
                    },
                },
            },
            {"id": "all", "type": "join"},
        ],
        "edges": [
            {"from": "start", "to": "fetch"},
            {"from": "fetch", "to": "big"},
            {"from": "big", "to": "each", "branch": "true"},
            {"from": "each", "to": "all"},
        ],
    }
)
ITEMS = [{"href": "https://api.example.com/a"}, {"href": "https://api.example.com/b"}]


def states(items: list[Any]) -> dict[str, NodeState]:
    return {
        "start": NodeState("succeeded", {"user": "ada"}),
        "fetch": NodeState("succeeded", {"body": {"items": items}}),
        "big": NodeState("succeeded", {"result": True}),
        "each": NodeState("succeeded", {"items": items}),
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), (False, False), ("", False), ([], False), ({}, False), (0, True), ("x", True)],
)
def test_truth_is_jmespath_truth(value: Any, expected: bool) -> None:
    assert truthy(value) is expected


def test_a_condition_searches_its_input_document() -> None:
    document = node_input(SPEC, "big", states(ITEMS), {"user": "ada"})
    assert condition_output(SPEC.node("big"), document) == {"result": True}
    document = node_input(SPEC, "big", states(ITEMS[:1]), {"user": "ada"})
    assert condition_output(SPEC.node("big"), document) == {"result": False}


def test_a_map_record_resolves_its_list() -> None:
    document = node_input(SPEC, "each", states(ITEMS), {})
    assert map_output(SPEC.node("each"), document) == {"items": ITEMS}


@pytest.mark.parametrize(
    ("items", "message"),
    [({"href": "x"}, "not a list"), ([1, 2, 3, 4], "has 4 items; the limit is 3")],
)
def test_a_map_source_that_is_not_a_short_list_fails(items: Any, message: str) -> None:
    document = node_input(SPEC, "each", states(items), {})
    with pytest.raises(TemplateError, match=message):
        map_output(SPEC.node("each"), document)


def test_an_action_call_is_resolved_then_checked() -> None:
    # Given the trigger data
    document = node_input(SPEC, "fetch", states(ITEMS), {"user": "ada"})
    # Then the action's config is resolved
    action_type, config = action_call(SPEC, "fetch", document, lambda _n: True)
    assert (action_type, config) == ("call_api", {"url": "https://api.example.com/users/ada"})


def test_a_map_child_calls_the_action_with_its_item() -> None:
    document = node_input(SPEC, "each[1]", states(ITEMS), {})
    action_type, config = action_call(SPEC, "each[1]", document, lambda _n: True)
    assert action_type == "call_api"
    assert config == {"url": "https://api.example.com/b", "headers": {"X-Index": "n1"}}


def test_a_resolved_config_that_fails_its_check_names_the_field() -> None:
    document = node_input(SPEC, "each[0]", states([{"href": "ftp://files.example.com"}]), {})
    with pytest.raises(InvalidInput) as caught:
        action_call(SPEC, "each[0]", document, lambda _n: True)
    assert caught.value.field == "config.action.config.url"


def test_structural_nodes_pass_data_on() -> None:
    assert passed_on(SPEC.node("start"), {"trigger": {"user": "ada"}}) == {"user": "ada"}
    done = {
        **states(ITEMS),
        "each[0]": NodeState("succeeded", 1),
        "each[1]": NodeState("succeeded", 2),
    }
    document = node_input(SPEC, "all", done, {})
    assert passed_on(SPEC.node("all"), document) == {"each": {"items": ITEMS, "results": [1, 2]}}
    with pytest.raises(ValueError, match="only pass data on"):
        passed_on(SPEC.node("fetch"), document)
