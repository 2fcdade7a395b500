"""What a worker does for each kind of record, and how each action type's config is checked.

The registry (``gathering_tasks.kinds``) names these functions. Executors take the record
(its ``definition`` snapshot says what to do) and the abort event, which is set when the
record is cancelled or taken over; long work should watch it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gathering_tasks import runtime
from gathering_tasks.app import app
from gathering_tasks.db.ledger import Record
from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.guard import Detached
from gathering_tasks.handlers import get_handler
from gathering_tasks.pipelines import executor as pipelines
from gathering_tasks.skills import executors as skill_calls
from gathering_tasks.skills.http_spec import parse_call_api_config
from gathering_tasks.skills.notification_config import parse_notification_config

TaskAllowed = Callable[[str], bool]


def task_allowed(name: str) -> bool:
    """May ``run_task`` call ``name``? Registered handlers, or allowlisted Celery tasks."""
    if get_handler(name) is not None:
        return True
    return name in runtime.settings().run_task_allowlist


# -- config schemas and checks (at the door; InvalidInput names the field) -----------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunTaskConfig(_Strict):
    """``run_task``: call a registered handler or Celery task by name."""

    task: str = Field(min_length=1, max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ExecutePipelineConfig(_Strict):
    """``execute_pipeline``: start a run of the named pipeline with these inputs."""

    pipeline: str = Field(min_length=1, max_length=200)
    inputs: dict[str, Any] = Field(default_factory=dict)


def check_run_task(config: Mapping[str, Any], allowed: TaskAllowed) -> None:
    parsed = RunTaskConfig.model_validate(config)
    if not allowed(parsed.task):
        raise InvalidInput(
            f"task {parsed.task!r} is not registered or not in the run_task allowlist",
            field="config.task",
        )


def check_pipeline(config: Mapping[str, Any], _allowed: TaskAllowed) -> None:
    ExecutePipelineConfig.model_validate(config)


def check_call_api(config: Mapping[str, Any], _allowed: TaskAllowed) -> None:
    parse_call_api_config(config)


def check_notification(config: Mapping[str, Any], _allowed: TaskAllowed) -> None:
    parse_notification_config(config)


# -- executors -----------------------------------------------------------------------------


def message_context(record: Record) -> dict[str, object]:
    """What a notification's ``${...}`` placeholders can name."""
    return {
        "run_id": record.id,
        "action": record.name,
        "slot": record.scheduled_for.isoformat() if record.scheduled_for else None,
        "attempt": record.attempt,
        "trigger": record.trigger,
    }


def _accepts_context(fn: Any) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def execute_run_task(record: Record, _abort: threading.Event) -> Mapping[str, Any] | None:
    """Call the configured handler (or allowlisted Celery task) in this worker."""
    config = record.config
    name = str(config["task"])
    args = list(config.get("args", []))
    kwargs = dict(config.get("kwargs", {}))
    if not task_allowed(name):
        raise PermanentFailure(f"task {name!r} is not registered or not in the allowlist")
    fn = get_handler(name)
    if fn is None:
        if name not in app.tasks:
            raise PermanentFailure(f"task {name!r} is allowlisted but not registered")
        fn = app.tasks[name]
    elif _accepts_context(fn):
        kwargs.update(message_context(record))
    value = fn(*args, **kwargs)
    return value if isinstance(value, Mapping) else {"value": value}


def execute_pipeline(record: Record, abort: threading.Event) -> Mapping[str, Any] | Detached:
    """Start the pipeline run of this record; the record waits for its end."""
    return pipelines.start_pipeline(runtime.repository().pipelines, record, abort)


def execute_node(record: Record, abort: threading.Event) -> Mapping[str, Any] | None:
    """One node of a pipeline run, through the same skills as scheduled actions."""
    return pipelines.execute_node(
        runtime.repository().pipelines,
        record,
        abort,
        skills=NODE_SKILLS,
        task_allowed=task_allowed,
    )


def execute_call_api(record: Record, _abort: threading.Event) -> Mapping[str, Any] | None:
    return skill_calls.call_api(record.config, record.idempotency_key)


def execute_notification(record: Record, _abort: threading.Event) -> Mapping[str, Any] | None:
    return skill_calls.send_notification(
        record.config, record.idempotency_key, context=message_context(record)
    )


NODE_SKILLS: dict[str, pipelines.Skill] = {
    "run_task": execute_run_task,
    "call_api": execute_call_api,
    "send_notification": execute_notification,
}
