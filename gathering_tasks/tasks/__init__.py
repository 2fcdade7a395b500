"""The Celery tasks: one per action type. Task names and payloads are a published contract."""

from __future__ import annotations

from gathering_tasks.tasks.actions import (
    ACTION_TASKS,
    call_api,
    execute_pipeline,
    run_task,
    trigger_action,
)
from gathering_tasks.tasks.actions import send_notification as send_notification

__all__ = [
    "ACTION_TASKS",
    "call_api",
    "execute_pipeline",
    "run_task",
    "send_notification",
    "trigger_action",
]
