"""The distributed pipeline executor: what a worker does for a pipeline run and for a node.

Every node is a ledger record executed under the guard (lease, heartbeat, fenced outcome,
retries, cancellation); this module only does the node's own work:

* ``trigger`` passes the run's input data; ``parallel`` and ``join`` pass their inputs on;
* ``condition`` evaluates a JMESPath expression over the node's input (never ``eval``);
* ``action`` resolves its templates, validates the result with the action type's own check,
  and calls the same skill a scheduled action would, with the node's idempotency key;
* ``map`` resolves its list; its children (one record per item) run the action;
* ``delay`` does nothing when it runs: its record was published with a countdown.

The record that starts a pipeline (an ``execute_pipeline`` action run) does not wait for it:
it is marked ``waiting`` and the pipeline's end writes its final status.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gathering_tasks.clock import utcnow
from gathering_tasks.db.ledger import Record
from gathering_tasks.db.pipelines import NodeContext, PipelineStore
from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.guard import Detached
from gathering_tasks.pipelines import evaluate
from gathering_tasks.pipelines.definition import NodeSpec, PipelineSpec
from gathering_tasks.pipelines.planner import node_input, split_record_id
from gathering_tasks.pipelines.templates import TemplateError

Skill = Callable[[Record, threading.Event], Mapping[str, Any] | None]


def start_pipeline(
    store: PipelineStore, record: Record, abort: threading.Event
) -> Mapping[str, Any] | Detached:
    """``execute_pipeline``: start (once) the pipeline run of this record, and hand on."""
    config = record.config
    started = store.start_run(
        str(config["pipeline"]),
        data=dict(config.get("inputs") or {}),
        dedupe_key=f"action:{record.id}",
        action_run_id=record.id,
        now=utcnow(),
    )
    result = {"pipeline_run_id": started.run_id}
    if started.status == "running":
        return Detached(result=result, followups=tuple(started.dispatches))
    # A redelivery after the run already ended: report how it ended.
    if started.status != "succeeded":
        raise PermanentFailure(f"pipeline run {started.run_id} {started.status}: {started.error}")
    return {**result, "outputs": started.outputs}


def execute_node(
    store: PipelineStore,
    record: Record,
    abort: threading.Event,
    *,
    skills: Mapping[str, Skill],
    task_allowed: Callable[[str], bool],
) -> Mapping[str, Any] | None:
    """Run one node (or one map item) of a pipeline run.

    Its context (the spec, the states its input is built from, the run's data) comes with
    the record, read when the ledger started it; the input it is given is already recorded
    there. A run that ends while the node works has it told to stop (the guard aborts it).
    """
    definition = record.definition
    context = record.context if isinstance(record.context, NodeContext) else None
    if context is None:
        context = store.node_context(record)
    if context is None:
        raise PermanentFailure(f"record {record.id} is not a node of a pipeline run")
    record_id = record_node_id(record)
    node_id, _index = split_record_id(record_id)
    spec = context.spec
    node = spec.node(node_id)
    # Only a node with a circuit breaker pays for reading its health.
    circuit = (definition["node"].get("config") or {}).get("circuit")
    open_until = (
        store.circuit_open_until(int(definition["pipeline_id"]), node_id, utcnow())
        if circuit
        else None
    )
    if open_until is not None:
        raise PermanentFailure(
            f"node {node_id!r}: circuit open after repeated failures, until "
            f"{open_until.isoformat()}"
        )
    document = node_input(spec, record_id, context.states, context.trigger_data)
    step = _Step(spec, node, record, record_id, document)
    try:
        return _compute(step, skills, task_allowed)
    except (TemplateError, InvalidInput) as exc:
        raise PermanentFailure(f"node {record_id!r}: {exc}") from exc


@dataclass(frozen=True)
class _Step:
    """One node record about to compute: its node, and the input document it was given."""

    spec: PipelineSpec
    node: NodeSpec
    record: Record
    record_id: str
    document: Mapping[str, Any]


def _compute(
    step: _Step, skills: Mapping[str, Skill], task_allowed: Callable[[str], bool]
) -> Mapping[str, Any] | None:
    node, document, record = step.node, step.document, step.record
    _node_id, index = split_record_id(step.record_id)
    if node.type == "condition":
        return dict(evaluate.condition_output(node, document))
    if node.type == "map" and index is None:
        return dict(evaluate.map_output(node, document))
    if node.type in ("action", "map"):
        action_type, config = evaluate.action_call(
            step.spec, step.record_id, document, task_allowed
        )
        # The same skill a scheduled action of that type calls, with this node's record.
        call = Record(
            id=record.id,
            kind=action_type,
            attempt=record.attempt,
            definition={**record.definition, "config": config},
            idempotency_key=record.idempotency_key,
            trigger=record.trigger,
        )
        return skills[action_type](call, threading.Event())
    value = evaluate.passed_on(node, document)
    return value if isinstance(value, Mapping) else {"value": value}


def record_node_id(record: Record) -> str:
    """The node record's id within its run: the node's id, or ``map[3]`` for a map item."""
    return str(record.node_id or record.definition["node"]["id"])
