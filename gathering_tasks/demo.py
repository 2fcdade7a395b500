"""Demo actions: they fire visibly in the worker log within seconds of start."""

from __future__ import annotations

from typing import Any

DEMO_ACTIONS: list[dict[str, Any]] = [
    {
        "name": "demo-hello-every-5s",
        "action_type": "run_task",
        "config": {"task": "demo.hello", "kwargs": {"who": "every five seconds"}},
        "schedule": {"kind": "interval", "every_s": 5},
        "catchup_mode": "skip",
    },
    {
        "name": "demo-add-every-minute",
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [2, 3]},
        "schedule": {"kind": "cron", "expr": "* * * * *", "timezone": "Europe/Paris"},
    },
    {
        "name": "demo-fail-every-30s",
        "action_type": "run_task",
        "config": {
            "task": "demo.fail",
            "kwargs": {"message": "demo failure (retried, then failed)"},
        },
        "schedule": {"kind": "interval", "every_s": 30},
        "retry_max_attempts": 2,
        "retry_backoff_s": 2,
        "catchup_mode": "skip",
    },
]
