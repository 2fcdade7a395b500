"""Unit tests of :mod:`gathering_tasks.pipelines.planner`: what a run does next.

States are given as the ledger would hold them; the planner only reads them.
"""

from __future__ import annotations

from typing import Any

import pytest

from gathering_tasks.pipelines.definition import PipelineSpec, parse_pipeline
from gathering_tasks.pipelines.planner import (
    Advance,
    NodeState,
    Ready,
    advance,
    child_id,
    node_input,
    sink_outputs,
    split_record_id,
)

States = dict[str, NodeState]


def act(node_id: str) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "action",
        "config": {"action_type": "run_task", "config": {"task": "demo.add"}},
    }


def cond(node_id: str) -> dict[str, Any]:
    return {"id": node_id, "type": "condition", "config": {"expression": "trigger.go"}}


def join(node_id: str, policy: str = "all", n: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"policy": policy}
    if n is not None:
        config["n"] = n
    return {"id": node_id, "type": "join", "config": config}


def mapped(node_id: str, source: str) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "map",
        "config": {
            "source": f"{{{{ nodes.{source}.output.items }}}}",
            "action": {"action_type": "run_task", "config": {"task": "t", "args": ["{{ item }}"]}},
        },
    }


START = {"id": "start", "type": "trigger"}


def pipeline(nodes: list[dict[str, Any]], edges: list[tuple[str, ...]]) -> PipelineSpec:
    """A spec from nodes and ``(from, to)`` or ``(from, to, branch)`` edges."""
    return parse_pipeline(
        {
            "nodes": nodes,
            "edges": [
                {"from": e[0], "to": e[1], **({"branch": e[2]} if len(e) > 2 else {})}
                for e in edges
            ],
        }
    )


def ok(output: Any = None) -> NodeState:
    return NodeState("succeeded", output)


def ready_ids(step: Advance) -> list[str]:
    return [r.record_id for r in step.ready]


def record(states: States, step: Advance, outputs: dict[str, Any] | None = None) -> States:
    """The states after creating ``step``'s records (succeeded, with ``outputs``) and skips."""
    outputs = outputs or {}
    new = dict(states)
    for ready in step.ready:
        new[ready.record_id] = ok(outputs.get(ready.record_id))
    for node_id in step.skip:
        new[node_id] = NodeState("skipped")
    return new


def drive(spec: PipelineSpec, outputs: dict[str, Any]) -> tuple[States, Advance]:
    """Run to the end, every record succeeding with ``outputs``."""
    states: States = {}
    for _ in range(len(spec.nodes) * 2 + 2):
        step = advance(spec, states)
        if step.final is not None and not step.ready:
            return record(states, step, outputs), step
        states = record(states, step, outputs)
    raise AssertionError("the run did not end")


# --------------------------------------------------------------------------------------------
# Chains and diamonds


CHAIN = pipeline([START, act("a"), act("b")], [("start", "a"), ("a", "b")])


def test_a_new_run_starts_with_its_triggers() -> None:
    # Given a chain and no records
    # When the run advances
    step = advance(CHAIN, {})
    # Then only the trigger is ready
    assert step == Advance(ready=(Ready("start", "start"),))


def test_a_chain_runs_one_node_after_the_other() -> None:
    # Given the trigger succeeded
    states = {"start": ok({"x": 1})}
    # Then the next node is ready, not the one after it
    assert ready_ids(advance(CHAIN, states)) == ["a"]
    # And while it runs (or retries) nothing else is ready
    for status in ("pending", "running", "retrying"):
        assert advance(CHAIN, {**states, "a": NodeState(status)}) == Advance()
    # And once every node succeeded the run has succeeded
    assert advance(CHAIN, {**states, "a": ok(), "b": ok()}).final == "succeeded"


def test_advance_is_idempotent() -> None:
    # Given a step whose records now exist as pending
    states = {"start": ok()}
    step = advance(CHAIN, states)
    pending = {**states, **{r.record_id: NodeState("pending") for r in step.ready}}
    # When the run advances again, twice
    # Then nothing new comes, and the same states give the same answer
    assert advance(CHAIN, pending) == Advance()
    assert advance(CHAIN, pending) == advance(CHAIN, pending)
    assert advance(CHAIN, states) == step


DIAMOND = pipeline(
    [START, act("left"), act("right"), act("end")],
    [("start", "left"), ("start", "right"), ("left", "end"), ("right", "end")],
)


def test_a_diamond_waits_for_both_predecessors() -> None:
    # Given both branches ready after the trigger
    assert ready_ids(advance(DIAMOND, {"start": ok()})) == ["left", "right"]
    # When one branch is done
    one = {"start": ok(), "left": ok(), "right": NodeState("running")}
    # Then the meeting node waits
    assert advance(DIAMOND, one).ready == ()
    # And runs when both are done
    assert ready_ids(advance(DIAMOND, {**one, "right": ok()})) == ["end"]


def test_a_failed_node_fails_the_run_at_once() -> None:
    # Given one branch failed and the other still runs
    states = {"start": ok(), "left": NodeState("timed_out"), "right": NodeState("running")}
    # Then the run is failed, the node named, and nothing more is started
    assert advance(DIAMOND, states) == Advance(final="failed", failed_nodes=("left",))


def test_a_cancelled_node_holds_the_run_open() -> None:
    # Cancelling the run is the caller's business; the planner neither continues nor fails.
    states = {"start": ok(), "left": NodeState("cancelled"), "right": ok()}
    assert advance(DIAMOND, states) == Advance()


# --------------------------------------------------------------------------------------------
# Conditions

BRANCHES = pipeline(
    [START, cond("check"), act("yes"), act("no"), act("after_no"), act("either"), act("tail")],
    [
        ("start", "check"),
        ("check", "yes", "true"),
        ("check", "no", "false"),
        ("no", "after_no"),
        ("yes", "either"),
        ("no", "either"),
        ("after_no", "tail"),
    ],
)


def test_a_true_condition_skips_the_false_branch_and_all_only_reached_through_it() -> None:
    # Given the condition came out true
    states = {"start": ok(), "check": ok({"result": True})}
    # When the run advances
    step = advance(BRANCHES, states)
    # Then the true branch is ready, and the false branch is skipped transitively
    assert ready_ids(step) == ["yes"]
    assert step.skip == ("no", "after_no", "tail")
    # And a node also reached through the live branch is not skipped: it runs after it
    states = record(states, step)
    assert ready_ids(advance(BRANCHES, states)) == ["either"]
    assert advance(BRANCHES, record(states, advance(BRANCHES, states))).final == "succeeded"


def test_a_false_condition_takes_the_false_branch() -> None:
    states = {"start": ok(), "check": ok({"result": False})}
    step = advance(BRANCHES, states)
    assert ready_ids(step) == ["no"]
    assert step.skip == ("yes",)
    # "either" waits for "no", its live input, though "yes" is already skipped
    assert "either" not in step.skip


def test_skipping_the_last_nodes_ends_the_run() -> None:
    # Given only the untaken branch remains
    states = {"start": ok(), "check": ok({"result": True}), "yes": ok(), "either": ok()}
    # Then the skips come with the final outcome (counted as recorded)
    step = advance(BRANCHES, states)
    assert step.skip == ("no", "after_no", "tail")
    assert step.final == "succeeded"


# --------------------------------------------------------------------------------------------
# Joins


def fan_in(policy: str, n: int | None = None) -> PipelineSpec:
    return pipeline(
        [START, act("a"), act("b"), act("c"), join("j", policy, n), act("after")],
        [
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
            ("a", "j"),
            ("b", "j"),
            ("c", "j"),
            ("j", "after"),
        ],
    )


def test_join_all_waits_for_every_input() -> None:
    spec = fan_in("all")
    two = {"start": ok(), "a": ok(), "b": ok(), "c": NodeState("running")}
    assert advance(spec, two).ready == ()
    assert ready_ids(advance(spec, {**two, "c": ok()})) == ["j"]


def test_join_any_fires_on_the_first_input_and_only_once() -> None:
    # Given one input succeeded and the others still run
    spec = fan_in("any")
    states = {"start": ok(), "a": NodeState("running"), "b": ok(), "c": NodeState("pending")}
    # Then the join fires without waiting
    assert ready_ids(advance(spec, states)) == ["j"]
    # And once it fired, the others finishing neither fire it again nor skip anything
    later = {**states, "j": ok(), "a": ok(), "c": ok()}
    assert ready_ids(advance(spec, later)) == ["after"]
    assert advance(spec, later).skip == ()


def test_join_n_of_fires_once_n_inputs_succeeded() -> None:
    spec = fan_in("n_of", 2)
    one = {"start": ok(), "a": ok(), "b": NodeState("running"), "c": NodeState("running")}
    assert advance(spec, one).ready == ()
    assert ready_ids(advance(spec, {**one, "c": ok()})) == ["j"]


def test_a_join_that_can_no_longer_fire_is_skipped() -> None:
    # Given a 2-of join behind a condition that only leads to one of its inputs
    spec = pipeline(
        [START, cond("check"), act("a"), act("b"), join("j", "n_of", 2), act("after")],
        [
            ("start", "check"),
            ("check", "a", "true"),
            ("check", "b", "false"),
            ("a", "j"),
            ("b", "j"),
            ("j", "after"),
        ],
    )
    states = {"start": ok(), "check": ok({"result": True})}
    # Then, once the untaken input is skipped, the join is skipped too, and what follows it
    step = advance(spec, states)
    assert step.skip == ("b", "j", "after")
    assert ready_ids(step) == ["a"]


def test_join_any_with_every_input_dead_is_skipped() -> None:
    spec = pipeline(
        [START, cond("check"), act("a"), act("b"), join("j", "any")],
        [
            ("start", "check"),
            ("check", "a", "true"),
            ("check", "b", "true"),
            ("a", "j"),
            ("b", "j"),
        ],
    )
    step = advance(spec, {"start": ok(), "check": ok({"result": False})})
    assert step.skip == ("a", "b", "j")
    assert step.final == "succeeded"


# --------------------------------------------------------------------------------------------
# Maps

MAP = pipeline(
    [START, act("fetch"), mapped("each", "fetch"), act("after")],
    [("start", "fetch"), ("fetch", "each"), ("each", "after")],
)
ITEMS = ["x", "y", "z"]


def test_record_ids_of_map_children() -> None:
    assert child_id("each", 3) == "each[3]"
    assert split_record_id("each[3]") == ("each", 3)
    assert split_record_id("each") == ("each", None)
    with pytest.raises(ValueError, match="not a record id"):
        split_record_id("each[x]")


def test_map_children_are_ready_once_the_map_record_succeeded() -> None:
    # Given the map is running its own record: no children yet
    states = {"start": ok(), "fetch": ok(), "each": NodeState("running")}
    assert advance(MAP, states) == Advance()
    # When the map record succeeds with its items
    states["each"] = ok({"items": ITEMS})
    step = advance(MAP, states)
    # Then one child per item is ready, with its index and item
    assert step.ready == (
        Ready("each[0]", "each", 0, "x"),
        Ready("each[1]", "each", 1, "y"),
        Ready("each[2]", "each", 2, "z"),
    )
    # And once they exist nothing is repeated
    created = {**states, **{r.record_id: NodeState("pending") for r in step.ready}}
    assert advance(MAP, created) == Advance()


def test_a_map_is_done_when_all_its_children_are() -> None:
    base = {"start": ok(), "fetch": ok(), "each": ok({"items": ITEMS})}
    two = {**base, "each[0]": ok(0), "each[1]": ok(1), "each[2]": NodeState("running")}
    # Given two of three children done: successors wait
    assert advance(MAP, two) == Advance()
    # When the last one succeeds
    done = {**two, "each[2]": ok(2)}
    # Then the successor is ready and reads the results in index order
    assert ready_ids(advance(MAP, done)) == ["after"]
    document = node_input(MAP, "after", done, {"go": True})
    assert document["nodes"]["each"] == {
        "status": "succeeded",
        "output": {"items": ITEMS, "results": [0, 1, 2]},
    }
    assert document["inputs"] == {"each": {"items": ITEMS, "results": [0, 1, 2]}}


def test_a_failed_child_fails_the_run() -> None:
    states = {
        "start": ok(),
        "fetch": ok(),
        "each": ok({"items": ITEMS}),
        "each[0]": ok(),
        "each[1]": NodeState("failed"),
        "each[2]": NodeState("running"),
    }
    assert advance(MAP, states) == Advance(final="failed", failed_nodes=("each[1]",))


def test_an_empty_map_is_done_at_once() -> None:
    states = {"start": ok(), "fetch": ok(), "each": ok({"items": []})}
    assert ready_ids(advance(MAP, states)) == ["after"]
    assert node_input(MAP, "after", states, {})["inputs"]["each"] == {"items": [], "results": []}


def test_a_map_child_reads_its_item_and_index() -> None:
    states = {"start": ok(), "fetch": ok({"items": ITEMS}), "each": ok({"items": ITEMS})}
    document = node_input(MAP, "each[1]", states, {"go": True})
    assert (document["item"], document["index"]) == ("y", 1)
    assert document["nodes"] == {
        "start": {"status": "succeeded", "output": None},
        "fetch": {"status": "succeeded", "output": {"items": ITEMS}},
    }
    assert document["inputs"] == {"fetch": {"items": ITEMS}}
    assert document["trigger"] == {"go": True}


def test_a_map_record_without_items_is_a_caller_bug() -> None:
    states = {"start": ok(), "fetch": ok(), "each": ok({"list": ITEMS})}
    with pytest.raises(ValueError, match="without an 'items' list"):
        advance(MAP, states)


# --------------------------------------------------------------------------------------------
# Delays, inputs, outputs, end states


def test_a_delay_is_an_ordinary_node() -> None:
    spec = pipeline(
        [START, {"id": "wait", "type": "delay", "config": {"seconds": 30}}, act("after")],
        [("start", "wait"), ("wait", "after")],
    )
    assert ready_ids(advance(spec, {"start": ok()})) == ["wait"]
    assert advance(spec, {"start": ok(), "wait": NodeState("running")}) == Advance()
    assert ready_ids(advance(spec, {"start": ok(), "wait": ok()})) == ["after"]


def test_node_input_holds_only_upstream_nodes() -> None:
    # Given a diamond with both branches done
    states = {"start": ok({"t": 1}), "left": ok("L"), "right": NodeState("running")}
    # Then a branch sees the trigger but not its sibling
    document = node_input(DIAMOND, "left", states, {"t": 1})
    assert document == {
        "trigger": {"t": 1},
        "nodes": {"start": {"output": {"t": 1}, "status": "succeeded"}},
        "inputs": {"start": {"t": 1}},
    }
    # And the meeting node sees every ancestor
    states["right"] = ok("R")
    document = node_input(DIAMOND, "end", states, {"t": 1})
    assert set(document["nodes"]) == {"start", "left", "right"}
    assert document["inputs"] == {"left": "L", "right": "R"}


def test_skipped_predecessors_are_not_inputs() -> None:
    states = {
        "start": ok(),
        "check": ok({"result": True}),
        "yes": ok("Y"),
        "no": NodeState("skipped"),
    }
    document = node_input(BRANCHES, "either", states, {})
    assert document["inputs"] == {"yes": "Y"}
    assert document["nodes"]["no"] == {"output": None, "status": "skipped"}


def test_sink_outputs_are_the_run_outputs() -> None:
    states, step = drive(
        BRANCHES,
        {"check": {"result": True}, "either": {"sum": 3}},
    )
    assert step.final == "succeeded"
    assert sink_outputs(BRANCHES, states) == {"either": {"sum": 3}}  # "tail" was skipped


def test_final_is_undecided_while_anything_is_open() -> None:
    assert advance(CHAIN, {"start": ok(), "a": ok(), "b": NodeState("retrying")}).final is None
    assert advance(CHAIN, {"start": ok(), "a": ok(), "b": ok()}).final == "succeeded"


# --------------------------------------------------------------------------------------------
# Size: linear, not exponential (no timing asserted)


def test_a_wide_fan_out_and_fan_in() -> None:
    # Given 200 parallel nodes between a fan-out and a join
    width = 200
    spec = pipeline(
        [
            START,
            {"id": "fan", "type": "parallel"},
            *(act(f"w{i}") for i in range(width)),
            join("j"),
        ],
        [("start", "fan")]
        + [("fan", f"w{i}") for i in range(width)]
        + [(f"w{i}", "j") for i in range(width)],
    )
    # When the run is driven to the end
    states, step = drive(spec, {"j": "joined"})
    # Then all 200 ran in one step and the join after them
    assert step.final == "succeeded"
    assert len(states) == width + 3
    assert ready_ids(advance(spec, {"start": ok(), "fan": ok()}))[-1] == f"w{width - 1}"
    assert node_input(spec, "j", states, {})["inputs"].keys() == {f"w{i}" for i in range(width)}


def test_a_map_of_500_items() -> None:
    items = list(range(500))
    states = {"start": ok(), "fetch": ok(), "each": ok({"items": items})}
    step = advance(MAP, states)
    assert len(step.ready) == 500
    done = {**states, **{r.record_id: ok(r.item * 2) for r in step.ready}}
    assert ready_ids(advance(MAP, done)) == ["after"]
    assert node_input(MAP, "after", done, {})["inputs"]["each"]["results"][-1] == 998


def test_a_long_chain_of_conditions_and_diamonds() -> None:
    # Given 60 diamonds in a row, each behind a condition (paths double at each: 2**60)
    nodes: list[dict[str, Any]] = [START]
    edges: list[tuple[str, ...]] = []
    last = "start"
    for i in range(60):
        nodes += [cond(f"c{i}"), act(f"l{i}"), act(f"r{i}"), act(f"m{i}")]
        edges += [
            (last, f"c{i}"),
            (f"c{i}", f"l{i}", "true"),
            (f"c{i}", f"r{i}", "false"),
            (f"l{i}", f"m{i}"),
            (f"r{i}", f"m{i}"),
        ]
        last = f"m{i}"
    spec = pipeline(nodes, edges)
    # When driven with every condition true
    states, step = drive(spec, {f"c{i}": {"result": True} for i in range(60)})
    # Then it ends, every right-hand node skipped
    assert step.final == "succeeded"
    assert all(states[f"r{i}"].status == "skipped" for i in range(60))
    assert all(states[f"m{i}"].status == "succeeded" for i in range(60))
