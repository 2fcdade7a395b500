"""Unit tests of :func:`gathering_tasks.pipelines.definition.parse_pipeline`.

The rule under test: a definition is checked as a whole before anything runs, and every
problem is reported at once, each naming its node.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from gathering_tasks.errors import InvalidInput
from gathering_tasks.pipelines.definition import (
    EdgeSpec,
    NodeError,
    PipelineInvalid,
    PipelineSpec,
    RetrySpec,
    parse_pipeline,
)

URL = "https://api.example.com/v1/items"


def trigger(node_id: str = "start") -> dict[str, Any]:
    return {"id": node_id, "type": "trigger"}


def call_api(node_id: str, url: str = URL, **extra: Any) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "action",
        "config": {"action_type": "call_api", "config": {"url": url}},
        **extra,
    }


def node(node_id: str, node_type: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": node_id, "type": node_type}
    if config is not None:
        data["config"] = config
    return data


def edge(source: str, target: str, branch: str | None = None) -> dict[str, Any]:
    data = {"from": source, "to": target}
    if branch is not None:
        data["branch"] = branch
    return data


def chain(*nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A pipeline of ``nodes`` joined one after the other."""
    edges = [edge(a["id"], b["id"]) for a, b in itertools.pairwise(nodes)]
    return {"nodes": list(nodes), "edges": edges, **extra}


def errors_of(data: Any, **kwargs: Any) -> list[NodeError]:
    with pytest.raises(PipelineInvalid) as caught:
        parse_pipeline(data, **kwargs)
    return caught.value.errors


def the_error(data: Any, **kwargs: Any) -> NodeError:
    errors = errors_of(data, **kwargs)
    assert len(errors) == 1, errors
    return errors[0]


FULL: dict[str, Any] = {
    "nodes": [
        trigger(),
        call_api("fetch", name="Fetch the items", timeout_s=30, retry={"max_attempts": 3}),
        node("check", "condition", {"expression": "length(nodes.fetch.output.body.items) > `0`"}),
        node(
            "each",
            "map",
            {
                "source": "{{ nodes.fetch.output.body.items }}",
                "action": {
                    "action_type": "run_task",
                    "config": {"task": "demo.add", "args": ["{{ item.value }}", "{{ index }}"]},
                },
                "max_items": 50,
            },
        ),
        node("wait", "delay", {"seconds": 5}),
        node("both", "join", {"policy": "any"}),
        node(
            "tell",
            "action",
            {
                "action_type": "send_notification",
                "config": {
                    "channel": "webhook",
                    "url": "https://hooks.example.com/x",
                    "secret_env": "HOOK_KEY",
                    "title": "Done",
                    "text": "finished",
                },
            },
        ),
    ],
    "edges": [
        edge("start", "fetch"),
        edge("fetch", "check"),
        edge("check", "each", "true"),
        edge("check", "wait", "false"),
        edge("each", "both"),
        edge("wait", "both"),
        edge("both", "tell"),
    ],
    "timeout_s": 600,
    "retry": {"max_attempts": 2, "backoff_s": 1.5},
}


# --------------------------------------------------------------------------------------------
# A valid pipeline


def test_a_valid_pipeline_is_parsed_into_its_spec() -> None:
    # Given a pipeline using every node type but parallel
    # When it is parsed
    spec = parse_pipeline(FULL)
    # Then its nodes, edges and settings are there, configs normalised
    assert [n.id for n in spec.nodes] == ["start", "fetch", "check", "each", "wait", "both", "tell"]
    assert spec.edges[2] == EdgeSpec("check", "each", "true")
    assert spec.timeout_s == 600
    assert spec.retry == RetrySpec(max_attempts=2, backoff_s=1.5)
    fetch = spec.node("fetch")
    assert (fetch.name, fetch.timeout_s, fetch.retry) == ("Fetch the items", 30, RetrySpec(3))
    assert spec.node("wait").config == {"seconds": 5.0}
    assert spec.node("both").config == {"policy": "any"}
    assert spec.node("each").config["max_items"] == 50


def test_the_spec_answers_graph_questions() -> None:
    # Given the parsed pipeline
    spec = parse_pipeline(FULL)
    # Then predecessors, successors, roots, edges and order follow its edges
    assert spec.roots() == ("start",)
    assert spec.predecessors("both") == ("each", "wait")
    assert spec.successors("check") == ("each", "wait")
    assert spec.edges_into("wait") == (EdgeSpec("check", "wait", "false"),)
    assert spec.ancestors("both") == {"start", "fetch", "check", "each", "wait"}
    order = spec.topological_order()
    assert all(order.index(e.source) < order.index(e.target) for e in spec.edges)


def test_retry_falls_back_from_node_to_pipeline_to_default() -> None:
    spec = parse_pipeline(FULL)
    assert spec.retry_for("fetch").max_attempts == 3
    assert spec.retry_for("tell").max_attempts == 2
    bare = parse_pipeline(chain(trigger(), call_api("fetch")))
    assert bare.retry_for("fetch") == RetrySpec()


def test_defaults_are_filled_in() -> None:
    # Given a join without a policy and a map without max_items
    data = chain(
        trigger(),
        call_api("fetch"),
        node(
            "each",
            "map",
            {
                "source": "{{ nodes.fetch.output.items }}",
                "action": {
                    "action_type": "run_task",
                    "config": {"task": "t", "args": ["{{ item }}"]},
                },
            },
        ),
        node("all", "join"),
    )
    # When parsed with a map limit of 20
    spec = parse_pipeline(data, max_map_items=20)
    # Then the defaults are explicit
    assert spec.node("all").config == {"policy": "all"}
    assert spec.node("each").config["max_items"] == 20


def test_to_json_round_trips_unchanged() -> None:
    # Given a parsed pipeline
    spec = parse_pipeline(FULL)
    # When its normalised form is parsed again (also through JSON text)
    again = parse_pipeline(spec.to_json())
    from_text = parse_pipeline(json.dumps(spec.to_json()))
    # Then nothing changed
    assert again == spec
    assert from_text == spec
    assert again.to_json() == spec.to_json()


def test_to_json_is_a_copy() -> None:
    spec = parse_pipeline(FULL)
    spec.to_json()["nodes"][1]["config"]["config"]["url"] = "https://elsewhere.example.com"
    assert spec.node("fetch").config["config"]["url"] == URL


YAML_PIPELINE = """
nodes:
  - id: start
    type: trigger
  - id: fetch
    type: action
    config:
      action_type: call_api
      config: {url: "https://api.example.com/v1/items"}
  - id: check
    type: condition
    config: {expression: "nodes.fetch.output.ok"}
  - id: tell
    type: action
    config:
      action_type: run_task
      config: {task: demo.add, args: ["{{ nodes.fetch.output.count }}"]}
edges:
  - {from: start, to: fetch}
  - {from: fetch, to: check}
  - {from: check, to: tell, branch: true}
"""


def test_yaml_text_is_accepted() -> None:
    # Given a YAML definition, with a bare YAML boolean as a branch
    # When it is parsed
    spec = parse_pipeline(YAML_PIPELINE)
    # Then it is the same pipeline as its JSON form, the branch normalised
    assert spec.edges[-1] == EdgeSpec("check", "tell", "true")
    assert parse_pipeline(json.dumps(spec.to_json())) == spec


def test_yaml_aliases_are_refused() -> None:
    # Given YAML using an alias (the way a short text expands into a huge document)
    text = "base: &b {id: start, type: trigger}\nnodes: [*b]\n"
    # Then it is refused, saying why
    error = the_error(text)
    assert "aliases" in error.message


@pytest.mark.parametrize("text", ["nodes: [", "{not json", "- just\n- a list"])
def test_text_that_is_not_a_pipeline_is_refused(text: str) -> None:
    error = the_error(text)
    assert error.node is None
    assert "JSON or YAML" in error.message or "must be an object" in error.message


def test_a_templated_config_is_not_checked_as_a_config() -> None:
    # Given a call_api action whose url comes from upstream (not a URL until resolved)
    data = chain(
        trigger(), call_api("fetch"), call_api("again", url="{{ nodes.fetch.output.next }}")
    )
    # Then it is accepted: its typed check happens when it is resolved
    spec = parse_pipeline(data)
    assert spec.node("again").config["config"]["url"] == "{{ nodes.fetch.output.next }}"


def test_the_run_task_allowlist_is_consulted() -> None:
    data = chain(
        trigger(), node("run", "action", {"action_type": "run_task", "config": {"task": "x"}})
    )
    assert parse_pipeline(data, task_allowed=lambda name: name == "x")
    error = the_error(data, task_allowed=lambda _name: False)
    assert (error.node, error.field) == ("run", "config.config.task")
    assert "allowlist" in error.message


def test_parallel_fans_out_and_a_trigger_may_be_one_of_several() -> None:
    data = {
        "nodes": [
            trigger("a"),
            trigger("b"),
            node("fan", "parallel"),
            call_api("x"),
            call_api("y"),
        ],
        "edges": [edge("a", "fan"), edge("b", "fan"), edge("fan", "x"), edge("fan", "y")],
    }
    spec = parse_pipeline(data)
    assert spec.roots() == ("a", "b")
    assert spec.successors("fan") == ("x", "y")


# --------------------------------------------------------------------------------------------
# Every kind of error, each naming its node


def _with(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> dict[str, Any]:
    return {"nodes": nodes, "edges": edges}


CASES: list[tuple[str, dict[str, Any], str | None, str, str]] = [
    # (case, definition, node, field, part of the message)
    ("empty", {"nodes": [], "edges": []}, None, "nodes", "empty"),
    ("no nodes key", {"edges": []}, None, "nodes", "empty"),
    ("nodes not a list", {"nodes": {"id": "a"}}, None, "nodes", "must be a list"),
    ("unknown top key", {**chain(trigger()), "owner": "me"}, None, "owner", "unknown key"),
    ("bad run timeout", chain(trigger(), timeout_s=0), None, "timeout_s", "greater than or equal"),
    (
        "bad run retry",
        chain(trigger(), retry={"max_attempts": 0}),
        None,
        "retry.max_attempts",
        "greater than or equal to 1",
    ),
    (
        "duplicate id",
        _with([trigger(), call_api("x"), call_api("x")], [edge("start", "x")]),
        "x",
        "id",
        "duplicate id (nodes 1 and 2)",
    ),
    ("id with brackets", chain(trigger(), call_api("x[0]")), None, "nodes.1.id", "letters"),
    ("id too long", chain(trigger(), call_api("x" * 201)), None, "nodes.1.id", "1-200"),
    ("node not an object", _with([trigger(), "x"], []), None, "nodes.1", "must be an object"),
    ("unknown type", chain(trigger(), node("x", "loop")), "x", "type", "unknown type 'loop'"),
    (
        "unknown node key",
        chain(trigger(), {**call_api("x"), "when": 1}),
        "x",
        "when",
        "unknown key",
    ),
    (
        "bad node timeout",
        chain(trigger(), call_api("x", timeout_s=-1)),
        "x",
        "timeout_s",
        "greater than or equal to 1",
    ),
    (
        "bad node retry",
        chain(trigger(), call_api("x", retry={"jitter": 2})),
        "x",
        "retry.jitter",
        "less than or equal to 1",
    ),
    (
        "NaN backoff",
        chain(trigger(), call_api("x", retry={"backoff_s": float("nan")})),
        "x",
        "retry.backoff_s",
        "finite",
    ),
    (
        "dangling target",
        _with([trigger()], [edge("start", "ghost")]),
        "start",
        "edges.0.to",
        "unknown node 'ghost'",
    ),
    (
        "dangling source",
        _with([trigger(), call_api("x")], [edge("start", "x"), edge("ghost", "x")]),
        None,
        "edges.1.from",
        "unknown node 'ghost'",
    ),
    ("edge without to", _with([trigger()], [{"from": "start"}]), "start", "edges.0.to", "required"),
    (
        "duplicate edge",
        _with([trigger(), call_api("x")], [edge("start", "x"), edge("start", "x")]),
        "start",
        "edges.1",
        "duplicate edge start -> x",
    ),
    (
        "branch on a plain edge",
        _with([trigger(), call_api("x")], [edge("start", "x", "true")]),
        "start",
        "edges.0.branch",
        "only edges leaving a condition",
    ),
    (
        "condition edge without branch",
        chain(trigger(), node("c", "condition", {"expression": "trigger.go"}), call_api("x")),
        "c",
        "edges.1.branch",
        'needs "true" or "false"',
    ),
    (
        "bad branch value",
        _with(
            [trigger(), node("c", "condition", {"expression": "trigger.go"}), call_api("x")],
            [edge("start", "c"), edge("c", "x", "maybe")],
        ),
        "c",
        "edges.1.branch",
        'must be "true" or "false", not \'maybe\'',
    ),
    (
        "non-trigger root",
        _with([trigger(), call_api("x"), call_api("y")], [edge("start", "x")]),
        "y",
        "",
        "not a trigger",
    ),
    (
        "trigger with an incoming edge",
        _with([trigger(), call_api("x"), trigger("t2")], [edge("start", "x"), edge("x", "t2")]),
        "t2",
        "",
        "cannot have incoming edges",
    ),
    (
        "trigger with config",
        chain(trigger() | {"config": {"every": 1}}),
        "start",
        "config.every",
        "unknown key",
    ),
    (
        "parallel with config",
        chain(trigger(), node("p", "parallel", {"n": 2})),
        "p",
        "config.n",
        "unknown key",
    ),
    (
        "delay zero",
        chain(trigger(), node("d", "delay", {"seconds": 0})),
        "d",
        "config.seconds",
        "greater than 0",
    ),
    (
        "delay too long",
        chain(trigger(), node("d", "delay", {"seconds": 86401})),
        "d",
        "config.seconds",
        "86400",
    ),
    (
        "delay as text",
        chain(trigger(), node("d", "delay", {"seconds": "5"})),
        "d",
        "config.seconds",
        "number",
    ),
    ("delay missing", chain(trigger(), node("d", "delay")), "d", "config.seconds", "required"),
    (
        "join policy",
        chain(trigger(), node("j", "join", {"policy": "most"})),
        "j",
        "config.policy",
        "'all'",
    ),
    (
        "join n without n_of",
        chain(trigger(), node("j", "join", {"n": 1})),
        "j",
        "config.n",
        "only used with policy 'n_of'",
    ),
    (
        "n_of without n",
        chain(trigger(), node("j", "join", {"policy": "n_of"})),
        "j",
        "config.n",
        "required",
    ),
    (
        "n_of zero",
        chain(trigger(), node("j", "join", {"policy": "n_of", "n": 0})),
        "j",
        "config.n",
        "greater than or equal to 1",
    ),
    (
        "n_of above in-degree",
        chain(trigger(), node("j", "join", {"policy": "n_of", "n": 2})),
        "j",
        "config.n",
        "is 2, but the join has 1 incoming edges",
    ),
    (
        "condition syntax",
        chain(trigger(), node("c", "condition", {"expression": "a.."})),
        "c",
        "config.expression",
        "JMESPath",
    ),
    (
        "condition missing",
        chain(trigger(), node("c", "condition", {})),
        "c",
        "config.expression",
        "required",
    ),
    (
        "unknown action type",
        chain(trigger(), node("x", "action", {"action_type": "send_fax", "config": {}})),
        "x",
        "config.action_type",
        "unknown action type 'send_fax'",
    ),
    (
        "nested pipeline",
        chain(
            trigger(),
            node("x", "action", {"action_type": "execute_pipeline", "config": {"pipeline": "p"}}),
        ),
        "x",
        "config.action_type",
        "no nested pipelines",
    ),
    (
        "action config checked",
        chain(trigger(), call_api("fetch", url="ftp://x.example.com")),
        "fetch",
        "config.config.url",
        "scheme",
    ),
    (
        "action config key",
        chain(
            trigger(),
            node("x", "action", {"action_type": "run_task", "config": {"tsk": "t", "task": "t"}}),
        ),
        "x",
        "config.config.tsk",
        "unknown key",
    ),
    (
        "NUL in a config",
        chain(
            trigger(), node("x", "action", {"action_type": "run_task", "config": {"task": "t\x00"}})
        ),
        "x",
        "config.config.task",
        "NUL",
    ),
    (
        "template syntax",
        chain(trigger(), call_api("x", url="https://e.example.com/{{ trigger.id")),
        "x",
        "config.config.url",
        "unbalanced braces",
    ),
    (
        "template bad character",
        chain(trigger(), call_api("x", url="{{ trigger['id'] }}")),
        "x",
        "config.config.url",
        "is not a name",
    ),
    (
        "template unknown node",
        chain(trigger(), call_api("x", url="{{ nodes.ghost.output.url }}")),
        "x",
        "config.config.url",
        "unknown node 'ghost'",
    ),
    (
        "template not upstream",
        _with(
            [trigger(), call_api("a"), call_api("b", url="{{ nodes.a.output.url }}")],
            [edge("start", "a"), edge("start", "b")],
        ),
        "b",
        "config.config.url",
        "node 'a' is not upstream of 'b'",
    ),
    (
        "template reads itself",
        chain(trigger(), call_api("x", url="{{ nodes.x.output.url }}")),
        "x",
        "config.config.url",
        "not upstream",
    ),
    (
        "template unknown name",
        chain(trigger(), call_api("x", url="{{ env.HOME }}")),
        "x",
        "config.config.url",
        "unknown name 'env'",
    ),
    (
        "item outside a map",
        chain(trigger(), call_api("x", url="{{ item.url }}")),
        "x",
        "config.config.url",
        "only in a map",
    ),
    (
        "node field",
        chain(trigger(), call_api("a"), call_api("x", url="{{ nodes.a.result }}")),
        "x",
        "config.config.url",
        "'output' and 'status'",
    ),
    (
        "map without source",
        chain(
            trigger(),
            node("m", "map", {"action": {"action_type": "run_task", "config": {"task": "t"}}}),
        ),
        "m",
        "config.source",
        "required",
    ),
    (
        "map source not a template",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "[1, 2]",
                    "action": {"action_type": "run_task", "config": {"task": "t"}},
                },
            ),
        ),
        "m",
        "config.source",
        "exactly one template",
    ),
    (
        "map source not a node",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "{{ trigger.items }}",
                    "action": {"action_type": "run_task", "config": {"task": "t"}},
                },
            ),
        ),
        "m",
        "config.source",
        "upstream node's output",
    ),
    (
        "map source not upstream",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "{{ nodes.m.output.items }}",
                    "action": {"action_type": "run_task", "config": {"task": "t"}},
                },
            ),
        ),
        "m",
        "config.source",
        "not upstream",
    ),
    (
        "map over the limit",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "{{ nodes.start.output }}",
                    "max_items": 1001,
                    "action": {"action_type": "run_task", "config": {"task": "t"}},
                },
            ),
        ),
        "m",
        "config.max_items",
        "at most 1000",
    ),
    (
        "map action checked",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "{{ nodes.start.output }}",
                    "action": {"action_type": "run_task", "config": {}},
                },
            ),
        ),
        "m",
        "config.action.config.task",
        "required",
    ),
    (
        "map action nested pipeline",
        chain(
            trigger(),
            node(
                "m",
                "map",
                {
                    "source": "{{ nodes.start.output }}",
                    "action": {"action_type": "execute_pipeline"},
                },
            ),
        ),
        "m",
        "config.action.action_type",
        "no nested pipelines",
    ),
]


@pytest.mark.parametrize(
    ("data", "node_id", "field", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_kind_of_error_is_reported_naming_its_node(
    data: dict[str, Any], node_id: str | None, field: str, message: str
) -> None:
    # Given a definition with one problem
    # When it is parsed
    error = the_error(data)
    # Then that problem is the one reported, on its node and field
    assert (error.node, error.field) == (node_id, field)
    assert message in error.message


def test_a_cycle_is_reported_with_its_nodes() -> None:
    # Given a -> b -> c -> a behind a trigger
    data = _with(
        [trigger(), call_api("a"), call_api("b"), call_api("c")],
        [edge("start", "a"), edge("a", "b"), edge("b", "c"), edge("c", "a")],
    )
    # Then the cycle is named, node by node
    error = the_error(data)
    assert error.node == "a"
    assert error.message == "is on a cycle: a -> b -> c -> a"


def test_a_self_loop_is_a_cycle() -> None:
    data = _with([trigger(), call_api("a")], [edge("start", "a"), edge("a", "a")])
    error = the_error(data)
    assert (error.node, error.message) == ("a", "is on a cycle: a -> a")


def test_an_island_cycle_is_unreachable_and_a_cycle() -> None:
    # Given a cycle that no trigger leads to
    data = _with(
        [trigger(), call_api("x"), call_api("a"), call_api("b")],
        [edge("start", "x"), edge("a", "b"), edge("b", "a")],
    )
    # Then both nodes are unreachable and the cycle is named
    messages = {(e.node, e.message) for e in errors_of(data)}
    assert ("a", "is unreachable: no path leads to it from a trigger") in messages
    assert ("b", "is unreachable: no path leads to it from a trigger") in messages
    assert ("a", "is on a cycle: a -> b -> a") in messages


def test_a_pipeline_without_a_trigger_is_refused() -> None:
    data = chain(call_api("a"), call_api("b"))
    messages = {(e.node, e.message) for e in errors_of(data)}
    assert (None, "the pipeline needs at least one trigger node") in messages
    assert ("a", "has no incoming edge but is not a trigger") in messages


def test_too_many_nodes_is_refused_without_looking_further() -> None:
    data = chain(trigger(), *(call_api(f"n{i}", url="ftp://bad") for i in range(5)))
    error = the_error(data, max_nodes=4)
    assert (error.node, error.field) == (None, "nodes")
    assert "has 6 nodes; the limit is 4" in error.message


def test_every_error_is_reported_at_once() -> None:
    # Given a definition with problems in several nodes and edges
    data = {
        "nodes": [
            trigger(),
            call_api("fetch", url="ftp://x.example.com"),
            node("wait", "delay", {"seconds": -1}),
            node("c", "condition", {"expression": "a.."}),
            call_api("fetch"),
        ],
        "edges": [edge("start", "fetch"), edge("fetch", "wait"), edge("wait", "ghost")],
    }
    # When it is parsed
    with pytest.raises(PipelineInvalid) as caught:
        parse_pipeline(data)
    # Then every problem is listed, one line each, naming the node
    found = {(e.node, e.field) for e in caught.value.errors}
    assert found == {
        ("fetch", "config.config.url"),
        ("wait", "config.seconds"),
        ("c", "config.expression"),
        ("fetch", "id"),
        ("wait", "edges.2.to"),
        ("c", ""),
    }
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.errors)
    assert "node 'fetch': config.config.url: request refused" in lines[0]
    assert isinstance(caught.value, InvalidInput)


def test_the_spec_rejects_a_cycle_built_by_hand() -> None:
    # Given a spec built without parse_pipeline, edges forming a cycle
    spec = parse_pipeline(chain(trigger(), call_api("a")))
    looped = PipelineSpec(spec.nodes, (*spec.edges, EdgeSpec("a", "start")))
    # Then asking for an order says so
    with pytest.raises(ValueError, match="cycle"):
        looped.topological_order()
