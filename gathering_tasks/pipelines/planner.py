"""What a pipeline run does next, decided from its spec and the states of its node records.

Pure: the executor loads the run's records, calls :func:`advance`, and persists the answer
(records to create, nodes to record as skipped, the run's final status) in one transaction.

Records and their ids:

* one record per node, with the node's id;
* a ``map`` node's own record resolves the list and succeeds with ``{"items": [...]}``; then
  one child record per item, ``f"{map_id}[{index}]"`` (:func:`child_id`), runs the action.
  The map is done when all its children are final; its successors see
  ``{"items": [...], "results": [child outputs in index order]}``; a failed child fails it.

Edges are *live* (their source succeeded, and for a condition the branch it took, from its
output ``{"result": bool}``), *dead* (their source was skipped, or it is a condition's branch
not taken) or *open* (their source is not final yet). A node runs once its inputs are
complete and at least one incoming edge is live; a node whose incoming edges are all dead is
skipped, and so on downstream in the same answer. ``cancelled`` is final but neither success
nor failure: it keeps its successors waiting and the run open; cancelling the run is the
caller's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gathering_tasks.pipelines.definition import EdgeSpec, PipelineSpec

Status = Literal[
    "pending", "running", "retrying", "succeeded", "failed", "timed_out", "cancelled", "skipped"
]
DONE = frozenset({"succeeded", "skipped"})
FAILED = frozenset({"failed", "timed_out"})
FINAL = DONE | FAILED | {"cancelled"}


@dataclass(frozen=True)
class NodeState:
    """The state of one record: its ledger status and, once succeeded, its output."""

    status: str
    output: Any = None


@dataclass(frozen=True)
class Ready:
    """A record to create now: a node, or (``index`` set) one child of a map."""

    record_id: str
    node_id: str
    index: int | None = None
    item: Any = None


@dataclass(frozen=True)
class Advance:
    """The next step of a run.

    ``ready``: records to create. ``skip``: nodes to record as skipped. ``final``: the run's
    outcome once decided; "succeeded" already counts the skips of this answer as recorded.
    ``failed_nodes``: ids of the records that failed (map children as ``map[index]``).
    """

    ready: tuple[Ready, ...] = ()
    skip: tuple[str, ...] = ()
    final: Literal["succeeded", "failed"] | None = None
    failed_nodes: tuple[str, ...] = ()


def child_id(map_id: str, index: int) -> str:
    """The record id of child ``index`` of map ``map_id``."""
    return f"{map_id}[{index}]"


def split_record_id(record_id: str) -> tuple[str, int | None]:
    """``"m[3]"`` -> ``("m", 3)``; ``"fetch"`` -> ``("fetch", None)``. Node ids have no ``[``."""
    node_id, bracket, rest = record_id.partition("[")
    if not bracket:
        return record_id, None
    if not rest.endswith("]") or not rest[:-1].isdigit():
        raise ValueError(f"not a record id: {record_id!r}")
    return node_id, int(rest[:-1])


@dataclass(frozen=True)
class _View:
    """A node as its successors see it; a map's status and output count its children."""

    status: str | None  # None: no record yet
    output: Any = None


_ABSENT = _View(None)


def map_items(map_id: str, state: NodeState) -> list[Any]:
    """The items a succeeded map record fans out over."""
    output = state.output
    items = output.get("items") if isinstance(output, Mapping) else None
    if not isinstance(items, list):
        raise ValueError(f"map record {map_id!r} succeeded without an 'items' list")
    return items


def _map_view(map_id: str, state: NodeState, states: Mapping[str, NodeState]) -> _View:
    items = map_items(map_id, state)
    children = [states.get(child_id(map_id, i)) for i in range(len(items))]
    statuses = {child.status if child else None for child in children}
    if not statuses <= FINAL:
        return _View("running")
    if statuses & FAILED:
        return _View("failed")
    if "cancelled" in statuses:
        return _View("cancelled")
    results = [child.output for child in children if child is not None]
    return _View("succeeded", {"items": items, "results": results})


def _view(spec: PipelineSpec, node_id: str, states: Mapping[str, NodeState]) -> _View:
    state = states.get(node_id)
    if state is None:
        return _ABSENT
    if state.status == "succeeded" and spec.node(node_id).type == "map":
        return _map_view(node_id, state, states)
    return _View(state.status, state.output)


def _failed_records(spec: PipelineSpec, states: Mapping[str, NodeState]) -> tuple[str, ...]:
    failed: list[str] = []
    for node in spec.nodes:
        state = states.get(node.id)
        if state is None:
            continue
        if state.status in FAILED:
            failed.append(node.id)
        elif state.status == "succeeded" and node.type == "map":
            children = (child_id(node.id, i) for i in range(len(map_items(node.id, state))))
            failed.extend(c for c in children if c in states and states[c].status in FAILED)
    return tuple(failed)


def _branch_taken(output: Any) -> bool:
    return isinstance(output, Mapping) and output.get("result") is True


class _Walk:
    """One pass over the nodes in topological order; skips found on the way count at once."""

    def __init__(self, spec: PipelineSpec, states: Mapping[str, NodeState]) -> None:
        self.spec = spec
        self.states = states
        self.views: dict[str, _View] = {}
        self.ready: list[Ready] = []
        self.skip: list[str] = []

    def run(self) -> Advance:
        for node_id in self.spec.topological_order():
            self.visit(node_id)
        done = all(view.status in DONE for view in self.views.values())
        return Advance(tuple(self.ready), tuple(self.skip), "succeeded" if done else None)

    def visit(self, node_id: str) -> None:
        view = _view(self.spec, node_id, self.states)
        if view.status is None:
            decision = self.decide(node_id)
            if decision == "ready":
                self.ready.append(Ready(node_id, node_id))
            elif decision == "skip":
                self.skip.append(node_id)
                view = _View("skipped")
        elif view.status == "running" and self.spec.node(node_id).type == "map":
            self.fan_out(node_id)
        self.views[node_id] = view

    def fan_out(self, map_id: str) -> None:
        state = self.states[map_id]
        if state.status != "succeeded":
            return
        for index, item in enumerate(map_items(map_id, state)):
            record_id = child_id(map_id, index)
            if record_id not in self.states:
                self.ready.append(Ready(record_id, map_id, index, item))

    def edge(self, edge: EdgeSpec) -> Literal["live", "dead", "open"]:
        source = self.views[edge.source]
        if source.status == "skipped":
            return "dead"
        if source.status != "succeeded":
            return "open"
        if edge.branch is None or _branch_taken(source.output) == (edge.branch == "true"):
            return "live"
        return "dead"

    def decide(self, node_id: str) -> Literal["ready", "skip"] | None:
        incoming = self.spec.edges_into(node_id)
        if not incoming:
            return "ready"  # a trigger
        tally = {"live": 0, "dead": 0, "open": 0}
        for edge in incoming:
            tally[self.edge(edge)] += 1
        needed = _needed(self.spec, node_id)
        if needed is None:  # every input: wait for all, run if any is live
            if tally["open"]:
                return None
            return "ready" if tally["live"] else "skip"
        if tally["live"] >= needed:
            return "ready"
        if tally["live"] + tally["open"] < needed:
            return "skip"  # can no longer fire
        return None


def _needed(spec: PipelineSpec, node_id: str) -> int | None:
    """How many live inputs fire the node without waiting for the rest (None: wait for all)."""
    node = spec.node(node_id)
    if node.type != "join":
        return None
    policy = node.config.get("policy", "all")
    if policy == "any":
        return 1
    if policy == "n_of":
        return int(node.config["n"])
    return None


def advance(spec: PipelineSpec, states: Mapping[str, NodeState]) -> Advance:
    """What to do next in a run whose records are in ``states`` (keyed by record id).

    Idempotent: once the ready records exist (as pending) and the skips are recorded, the
    same call answers nothing new. Linear in nodes, edges and map children.
    """
    failed = _failed_records(spec, states)
    if failed:
        return Advance(final="failed", failed_nodes=failed)
    return _Walk(spec, states).run()


def node_input(
    spec: PipelineSpec, record_id: str, states: Mapping[str, NodeState], trigger_data: Any
) -> dict[str, Any]:
    """The document a record's templates and condition read (see ``templates``).

    ``nodes`` holds every upstream node that has a record (``output`` and ``status``, maps as
    their successors see them); ``inputs`` the outputs of the direct predecessors that
    succeeded; a map child also gets ``item`` and ``index``.
    """
    node_id, index = split_record_id(record_id)
    nodes = {}
    for upstream in spec.topological_order():
        if upstream in spec.ancestors(node_id):
            view = _view(spec, upstream, states)
            if view.status is not None:
                nodes[upstream] = {"output": view.output, "status": view.status}
    inputs = {
        pred: nodes[pred]["output"]
        for pred in spec.predecessors(node_id)
        if pred in nodes and nodes[pred]["status"] == "succeeded"
    }
    document: dict[str, Any] = {"trigger": trigger_data, "nodes": nodes, "inputs": inputs}
    if index is not None:
        document["item"] = map_items(node_id, states[node_id])[index]
        document["index"] = index
    return document


def given_input(
    spec: PipelineSpec, record_id: str, states: Mapping[str, NodeState]
) -> dict[str, Any]:
    """What a record attempt is given, for its history: its direct predecessors' outputs
    (those that succeeded) and, for a map child, its index."""
    node_id, index = split_record_id(record_id)
    inputs = {}
    for pred in spec.predecessors(node_id):
        view = _view(spec, pred, states)
        if view.status == "succeeded":
            inputs[pred] = view.output
    return {"inputs": inputs, "index": index}


def sink_outputs(spec: PipelineSpec, states: Mapping[str, NodeState]) -> dict[str, Any]:
    """The run's outputs: those of the nodes without successors that succeeded."""
    sinks = (node.id for node in spec.nodes if not spec.successors(node.id))
    views = {node_id: _view(spec, node_id, states) for node_id in sinks}
    return {node_id: view.output for node_id, view in views.items() if view.status == "succeeded"}
