"""Publishing runs to the broker: one task per action type, one dispatch table."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery

from gathering_tasks.db.repo import Claim

log = logging.getLogger(__name__)

ACTION_TASKS: dict[str, str] = {
    "run_task": "gathering.run_task",
    "execute_pipeline": "gathering.execute_pipeline",
    "send_notification": "gathering.send_notification",
    "call_api": "gathering.call_api",
}
HARD_LIMIT_MARGIN_S = 10


def message_options(claim: Claim, default_queue: str) -> dict[str, Any]:
    """Routing and time limits of a run's message (JSON payload: the run id only)."""
    options: dict[str, Any] = {"queue": claim.queue or default_queue}
    if claim.priority is not None:
        options["priority"] = claim.priority
    if claim.timeout_s:
        options["soft_time_limit"] = claim.timeout_s
        options["time_limit"] = claim.timeout_s + HARD_LIMIT_MARGIN_S
    return options


def publish_claims(
    app: Celery, claims: Iterable[Claim], *, default_queue: str, countdown_s: float = 0.0
) -> int:
    """Publish each claim on one reused producer connection. Returns how many were sent."""
    sent = 0
    with app.producer_or_acquire() as producer, producer.batch():
        # kombu >= 5.7: the Redis commands of every message (and its task-sent event) go in
        # pipelined round trips, flushed when the batch closes.
        for claim in claims:
            app.send_task(
                ACTION_TASKS[claim.action_type],
                args=[claim.run_id],
                producer=producer,
                countdown=countdown_s or None,
                add_to_parent=False,
                **message_options(claim, default_queue),
            )
            sent += 1
    return sent
