"""What a node computes from its input document, where that needs no I/O; and the resolved,
checked action call of an action node or a map child (its execution is the kind's executor).

``document`` is :func:`gathering_tasks.pipelines.planner.node_input`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jmespath
from pydantic import ValidationError

from gathering_tasks.errors import InvalidInput
from gathering_tasks.kinds import kind, resolve
from gathering_tasks.pipelines import templates
from gathering_tasks.pipelines.definition import NodeSpec, PipelineSpec
from gathering_tasks.pipelines.planner import split_record_id
from gathering_tasks.pipelines.templates import TemplateError


def truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, "", [] and {} are false; everything else (0 too) true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


def condition_output(node: NodeSpec, document: Mapping[str, Any]) -> dict[str, bool]:
    """A condition's output: ``{"result": bool}``, its expression searched over ``document``."""
    return {"result": truthy(jmespath.search(node.config["expression"], dict(document)))}


def map_output(node: NodeSpec, document: Mapping[str, Any]) -> dict[str, list[Any]]:
    """A map record's output: ``{"items": [...]}``, the list its source names.

    :class:`TemplateError` when the source does not resolve, is not a list, or is longer
    than the map's ``max_items``.
    """
    source = node.config["source"]
    items = templates.resolve(source, document, "config.source")
    if not isinstance(items, list):
        raise TemplateError("config.source", f"{source}: is {type(items).__name__}, not a list")
    limit = int(node.config["max_items"])
    if len(items) > limit:
        raise TemplateError(
            "config.source", f"{source}: has {len(items)} items; the limit is {limit} (max_items)"
        )
    return {"items": items}


def passed_on(node: NodeSpec, document: Mapping[str, Any]) -> Any:
    """The output of a node that only passes data on: a trigger passes the run's input
    data; parallel, join and delay pass their predecessors' outputs (``inputs``)."""
    if node.type == "trigger":
        return document["trigger"]
    if node.type in ("parallel", "join", "delay"):
        return dict(document["inputs"])
    raise ValueError(f"node {node.id!r} ({node.type}) does not only pass data on")


def action_call(
    spec: PipelineSpec,
    record_id: str,
    document: Mapping[str, Any],
    task_allowed: Callable[[str], bool],
) -> tuple[str, dict[str, Any]]:
    """The action type and resolved, checked config of an action node or a map child.

    :class:`TemplateError` when a template does not resolve; :class:`InvalidInput` naming
    the field when the resolved config fails the kind's check.
    """
    node_id, index = split_record_id(record_id)
    node = spec.node(node_id)
    call = node.config["action"] if index is not None else node.config
    where = "config.action.config" if index is not None else "config.config"
    config = templates.resolve(call["config"], document, where)
    action_type = str(call["action_type"])
    check = resolve(str(kind(action_type).config_check))
    try:
        check(config, task_allowed)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = ".".join(str(part) for part in error["loc"])
        raise InvalidInput(error["msg"], field=f"{where}.{loc}" if loc else where) from exc
    except InvalidInput as exc:
        inner = (exc.field or "").removeprefix("config").removeprefix(".")
        raise InvalidInput(exc.reason, field=f"{where}.{inner}" if inner else where) from exc
    return action_type, config
