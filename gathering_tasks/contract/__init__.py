"""The published contract of the ``gathering.*`` tasks: one JSON Schema per task's payload.

Each ``<task name>.schema.json`` beside this module describes a message's ``{"args": [...],
"kwargs": {...}}``; the tasks check every message against it before doing anything, so a
message that does not match fails with :class:`~gathering_tasks.errors.InvalidPayload` (one
clear line in the worker log, FAILURE in Flower) and never reaches the database or crashes a
worker. The reference page is ``docs/contract.md``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from gathering_tasks.errors import InvalidPayload
from gathering_tasks.kinds import KINDS

TRIGGER_ACTION = "gathering.trigger_action"
RUN_PIPELINE = "gathering.run_pipeline"
# The queue every worker consumes; other services publish there (``queue="gathering"``).
DEFAULT_QUEUE = "gathering"
TASK_NAMES: tuple[str, ...] = (
    *(kind.task_name for kind in KINDS.values()),
    TRIGGER_ACTION,
    RUN_PIPELINE,
)


@functools.cache
def schema(task_name: str) -> dict[str, Any]:
    """The JSON Schema of ``task_name``'s payload. KeyError for a task outside the contract."""
    if task_name not in TASK_NAMES:
        raise KeyError(task_name)
    text = resources.files(__name__).joinpath(f"{task_name}.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator(task_name: str) -> Draft202012Validator:
    return Draft202012Validator(schema(task_name))


def check_payload(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidPayload` naming where ``args``/``kwargs`` break the contract.

    The message never echoes the offending value: a payload may carry data that must not
    reach logs or Flower.
    """
    payload = {"args": list(args), "kwargs": dict(kwargs)}
    error = best_match(_validator(task_name).iter_errors(payload))
    if error is not None:
        raise InvalidPayload(
            f"{_explain(error)} (see docs/contract.md)", field=f"{task_name} {_where(error)}"
        )


def _where(error: ValidationError) -> str:
    path = list(error.absolute_path)
    if not path:
        return "payload"
    head, *rest = path
    return str(head) + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest
    )


_EXPLAIN: dict[str, Callable[[Any], str]] = {
    "type": lambda v: f"must be of type {' or '.join(v) if isinstance(v, list) else v}",
    "minItems": lambda v: f"needs at least {v} item(s)",
    "items": lambda _v: "has too many items",
    "minLength": lambda v: f"must be at least {v} character(s)",
    "maxLength": lambda v: f"must be at most {v} characters",
    "pattern": lambda _v: "must be a name of letters, digits, '_', '.', ':' or '-'",
    "minimum": lambda v: f"must be at least {v}",
    "required": lambda v: f"must have {', '.join(v)}",
}


def _explain(error: ValidationError) -> str:
    if error.validator == "additionalProperties":
        properties = error.schema.get("properties") if isinstance(error.schema, dict) else None
        allowed = sorted(properties or {})
        return "has an unknown field; allowed: " + (", ".join(allowed) or "none")
    explain = _EXPLAIN.get(str(error.validator))
    if explain is None:
        return f"does not match the contract ({error.validator})"
    return explain(error.validator_value)
