"""One Celery task per action type. Each loads its run, runs it under the guard, persists.

Payload contract: ``args=[run_id]`` (an integer), JSON only. A delivery of a run that another
worker holds, or that is already done, acks and does nothing.
"""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from gathering_tasks import runtime
from gathering_tasks.app import app
from gathering_tasks.db.repo import Claim, RunContext
from gathering_tasks.errors import NotAvailable, PermanentFailure, TaskTimedOut
from gathering_tasks.handlers import get_handler
from gathering_tasks.publish import ACTION_TASKS, publish_claims
from gathering_tasks.runs import ExecutionGuard, Executor, GuardConfig, Outcome, utcnow
from gathering_tasks.skills import executors as skill_calls

log = logging.getLogger(__name__)

__all__ = ["ACTION_TASKS", "call_api", "execute_pipeline", "run_task", "send_notification"]


def idempotency_key(run: RunContext) -> str:
    """The key every side effect of this run carries, stable across attempts."""
    return f"gathering-run-{run.run_id}"


def message_context(run: RunContext) -> dict[str, object]:
    """What a notification's ``${...}`` placeholders can name."""
    return {
        "run_id": run.run_id,
        "action": run.action_name,
        "slot": run.scheduled_for.isoformat(),
        "attempt": run.attempt,
        "trigger": run.trigger,
    }


def task_allowed(name: str) -> bool:
    """May ``run_task`` call ``name``? Registered handlers, or allowlisted Celery tasks."""
    if get_handler(name) is not None:
        return True
    return name in runtime.settings().run_task_allowlist


def _accepts_context(fn: Any) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def execute_run_task(run: RunContext) -> Mapping[str, Any] | None:
    """Call the configured handler (or allowlisted Celery task) in this worker."""
    name = str(run.config["task"])
    args = list(run.config.get("args", []))
    kwargs = dict(run.config.get("kwargs", {}))
    if not task_allowed(name):
        raise PermanentFailure(f"task {name!r} is not registered or not in the allowlist")
    fn = get_handler(name)
    if fn is None:
        if name not in app.tasks:
            raise PermanentFailure(f"task {name!r} is allowlisted but not registered")
        fn = app.tasks[name]
    elif _accepts_context(fn):
        slot = run.scheduled_for.isoformat()
        kwargs.update(run_id=run.run_id, action=run.action_name, slot=slot)
    value = fn(*args, **kwargs)
    return value if isinstance(value, Mapping) else {"value": value}


def execute_pipeline_run(run: RunContext) -> Mapping[str, Any] | None:
    raise NotAvailable(
        f"pipeline execution is not available in this release (pipeline "
        f"{run.config.get('pipeline')!r}); the run is failed, not faked"
    )


EXECUTORS: dict[str, Executor] = {
    "run_task": execute_run_task,
    "execute_pipeline": execute_pipeline_run,
    "call_api": lambda run: skill_calls.call_api(run.config, idempotency_key(run)),
    "send_notification": lambda run: skill_calls.send_notification(
        run.config, idempotency_key(run), context=message_context(run)
    ),
}


def _timed(executor: Executor) -> Executor:
    def run(ctx: RunContext) -> Mapping[str, Any] | None:
        try:
            return executor(ctx)
        except SoftTimeLimitExceeded as exc:
            raise TaskTimedOut(f"run exceeded its time limit ({ctx.timeout_s}s)") from exc

    return run


def _publish(claim: Claim, delay_s: float) -> None:
    publish_claims(
        app, [claim], default_queue=runtime.settings().default_queue, countdown_s=delay_s
    )


def guard() -> ExecutionGuard:
    settings = runtime.settings()
    config = GuardConfig(
        key_prefix=settings.key_prefix,
        lease_ttl_s=settings.run_lease_ttl_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        max_result_bytes=settings.max_result_bytes,
    )
    return ExecutionGuard(
        runtime.repository(), runtime.redis_client(), config, publish_retry=_publish
    )


def _execute(task: Task, action_type: str, run_id: int) -> Outcome:
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        raise PermanentFailure(f"payload must be an integer run id, got {type(run_id).__name__}")
    worker = task.request.hostname or socket.gethostname()
    return guard().execute(
        run_id, _timed(EXECUTORS[action_type]), worker=worker, task_id=task.request.id
    )


def _run_task(self: Task, run_id: int) -> str:
    """Run a registered handler or allowlisted Celery task for run ``run_id``."""
    return _execute(self, "run_task", run_id)


def _execute_pipeline(self: Task, run_id: int) -> str:
    """Start the pipeline of run ``run_id``."""
    return _execute(self, "execute_pipeline", run_id)


def _send_notification(self: Task, run_id: int) -> str:
    """Send the notification of run ``run_id`` through its channel(s)."""
    return _execute(self, "send_notification", run_id)


def _call_api(self: Task, run_id: int) -> str:
    """Make the HTTP call of run ``run_id`` through the guarded client."""
    return _execute(self, "call_api", run_id)


def _trigger_action(_self: Task, action_name: str) -> int:
    """Entry point for other services: run ``action_name`` now (trigger ``api``)."""
    if not isinstance(action_name, str):
        raise PermanentFailure("payload must be an action name (string)")
    claim = runtime.repository().trigger_now(action_name, now=utcnow(), trigger="api")
    _publish(claim, 0.0)
    log.info("action triggered by another service", extra={"run_id": claim.run_id})
    return claim.run_id


# Registered without decorator syntax: Celery is untyped, and the task objects are Any.
run_task: Any = app.task(name=ACTION_TASKS["run_task"], bind=True)(_run_task)
execute_pipeline: Any = app.task(name=ACTION_TASKS["execute_pipeline"], bind=True)(
    _execute_pipeline
)
send_notification: Any = app.task(name=ACTION_TASKS["send_notification"], bind=True)(
    _send_notification
)
call_api: Any = app.task(name=ACTION_TASKS["call_api"], bind=True)(_call_api)
trigger_action: Any = app.task(name="gathering.trigger_action", bind=True)(_trigger_action)
