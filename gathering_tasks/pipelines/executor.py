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
from datetime import UTC, datetime
from typing import Any

import jmespath
from gathering_tasks.pipelines.planner import node_input
from gathering_tasks.pipelines.templates import TemplateError
from gathering_tasks.pipelines.templates import resolve as resolve_templates
from pydantic import ValidationError

from gathering_tasks.db.ledger import Record
from gathering_tasks.db.pipelines import PipelineStore
from gathering_tasks.errors import ExecutionAborted, InvalidInput, PermanentFailure
from gathering_tasks.guard import Detached
from gathering_tasks.kinds import kind, resolve
from gathering_tasks.policy import bounded_result

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
        now=datetime.now(UTC),
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
    max_input_bytes: int = 16 * 1024,
) -> Mapping[str, Any] | None:
    """Run one node (or one map item) of a pipeline run."""
    definition = record.definition
    run_id = _run_id(record)
    spec, states, trigger_data, status = store.run_context(run_id)
    if status != "running":
        raise ExecutionAborted(f"pipeline run {run_id} is {status}")
    node = definition["node"]
    open_until = store.circuit_open_until(
        int(definition["pipeline_id"]), str(node["id"]), datetime.now(UTC)
    )
    if open_until is not None:
        raise PermanentFailure(
            f"node {node['id']!r}: circuit open after repeated failures, until "
            f"{open_until.isoformat()}"
        )
    document = node_input(spec, record_node_id(record), states, trigger_data)
    given = {"inputs": document.get("inputs", {}), "index": definition.get("index")}
    store.record_input(record.id, record.attempt, bounded_result(given, max_input_bytes) or {})
    return _RUNNERS[str(node["type"])](record, document, abort, skills)


def record_node_id(record: Record) -> str:
    """The node record's id within its run: the node's id, or ``map[3]`` for a map item."""
    return str(record.node_id or record.definition["node"]["id"])


def _run_id(record: Record) -> int:
    if record.pipeline_run_id is None:
        raise PermanentFailure(f"record {record.id} is not a node of a pipeline run")
    return record.pipeline_run_id


def _pass_inputs(
    _record: Record, document: dict[str, Any], _abort: threading.Event, _skills: Any
) -> dict[str, Any]:
    return {"inputs": document.get("inputs", {})}


def _trigger(
    _record: Record, document: dict[str, Any], _abort: threading.Event, _skills: Any
) -> dict[str, Any]:
    return dict(document.get("trigger") or {})


def _condition(
    record: Record, document: dict[str, Any], _abort: threading.Event, _skills: Any
) -> dict[str, Any]:
    expression = str(record.definition["node"]["config"]["expression"])
    value = jmespath.search(expression, document)
    return {"result": bool(value), "value": value}


def _delay(
    record: Record, _document: dict[str, Any], _abort: threading.Event, _skills: Any
) -> dict[str, Any]:
    return {"delayed_s": float(record.definition["node"]["config"]["seconds"])}


def _map(
    record: Record, document: dict[str, Any], _abort: threading.Event, skills: Mapping[str, Skill]
) -> Mapping[str, Any] | None:
    config = record.definition["node"]["config"]
    if record.definition.get("index") is not None:
        # One item of the map: its action, with {{ item }} and {{ index }}.
        document = {**document, "item": record.definition.get("item")}
        document["index"] = record.definition.get("index")
        return _run_action(record, config["action"], document, skills)
    items = _resolved(record, config["source"], document, "config.source")
    if not isinstance(items, list):
        raise PermanentFailure(
            f"node {record.definition['node']['id']!r}: config.source resolved to "
            f"{type(items).__name__}, not a list"
        )
    limit = int(config.get("max_items") or len(items))
    if len(items) > limit:
        raise PermanentFailure(
            f"node {record.definition['node']['id']!r}: {len(items)} items, more than "
            f"max_items={limit}"
        )
    return {"items": items}


def _action(
    record: Record, document: dict[str, Any], _abort: threading.Event, skills: Mapping[str, Skill]
) -> Mapping[str, Any] | None:
    return _run_action(record, record.definition["node"]["config"], document, skills)


def _run_action(
    record: Record,
    action: Mapping[str, Any],
    document: dict[str, Any],
    skills: Mapping[str, Skill],
) -> Mapping[str, Any] | None:
    action_type = str(action["action_type"])
    config = _resolved(record, action.get("config", {}), document, "config.config")
    if not isinstance(config, dict):
        raise PermanentFailure(f"node {record_node_id(record)!r}: config must resolve to an object")
    try:
        resolve(str(kind(action_type).config_check))(config, lambda _name: True)
    except (InvalidInput, ValidationError) as exc:
        raise PermanentFailure(
            f"node {record_node_id(record)!r}: resolved config is invalid: {exc}"
        ) from exc
    # The same skill a scheduled action of that type calls, with this node's record.
    step = Record(
        id=record.id,
        kind=action_type,
        attempt=record.attempt,
        definition={**record.definition, "config": config},
        idempotency_key=record.idempotency_key,
        trigger=record.trigger,
    )
    return skills[action_type](step, threading.Event())


def _resolved(record: Record, value: Any, document: dict[str, Any], where: str) -> Any:
    try:
        return resolve_templates(value, document)
    except TemplateError as exc:
        raise PermanentFailure(f"node {record_node_id(record)!r}: {where}: {exc}") from exc


_RUNNERS: dict[str, Callable[..., Mapping[str, Any] | None]] = {
    "trigger": _trigger,
    "action": _action,
    "condition": _condition,
    "parallel": _pass_inputs,
    "join": _pass_inputs,
    "map": _map,
    "delay": _delay,
}
