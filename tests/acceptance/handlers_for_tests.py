"""``run_task`` handlers used only by the acceptance tests, each with a countable effect.

A worker loads them with ``celery worker -I tests.acceptance.handlers_for_tests``. They talk
to Redis only (never to the database), so a test can stall a worker's database link and
still watch the work progress. Every key they write starts with the ``key`` they are given.
"""

from __future__ import annotations

import time
from typing import Any

from gathering_tasks import runtime
from gathering_tasks.handlers import handler


def progress_key(key: str, run_id: int, attempt: int) -> str:
    """The counter of steps an attempt of a run has taken."""
    return f"{key}:steps:{run_id}:{attempt}"


def calls_key(key: str, run_id: int) -> str:
    """The counter of calls a run's handler received, over all its attempts."""
    return f"{key}:calls:{run_id}"


def mark(run_id: int, attempt: int) -> str:
    """What a finished attempt appends to the list ``key``."""
    return f"{run_id}:{attempt}"


@handler("tests.steps")
def steps(
    key: str,
    count: int,
    step_s: float = 0.1,
    later_count: int | None = None,
    **context: Any,
) -> dict[str, Any]:
    """Take ``count`` steps of ``step_s`` (``later_count`` on attempts after the first),
    counting each, then append ``run_id:attempt`` to the list ``key``.

    Steps are counted rather than timed, so a process frozen mid-work still has the rest of
    its steps to take when it wakes: the guard has time to stop it before it finishes.
    """
    run_id, attempt = int(context["run_id"]), int(context["attempt"])
    total = later_count if later_count is not None and attempt > 1 else count
    client = runtime.redis_client()
    for _ in range(total):
        time.sleep(step_s)
        client.incr(progress_key(key, run_id, attempt))
    client.rpush(key, mark(run_id, attempt))
    return {"steps": total}


@handler("tests.fail_first")
def fail_first(key: str, **context: Any) -> dict[str, Any]:
    """Fail the first call for a run, succeed on every later one (appending its mark)."""
    run_id, attempt = int(context["run_id"]), int(context["attempt"])
    client = runtime.redis_client()
    calls = int(client.incr(calls_key(key, run_id)))
    if calls == 1:
        raise RuntimeError(f"first call of run {run_id} fails on purpose")
    client.rpush(key, mark(run_id, attempt))
    return {"calls": calls}
