"""The Celery tasks: one per kind of work. Task names and payloads are a published contract."""

from __future__ import annotations

from gathering_tasks.tasks.actions import (
    TASKS,
    call_api,
    execute_pipeline,
    run_pipeline,
    run_task,
    send_notification,
    trigger_action,
)

__all__ = [
    "TASKS",
    "call_api",
    "execute_pipeline",
    "run_pipeline",
    "run_task",
    "send_notification",
    "trigger_action",
]
