"""Publishing ledger records to the broker: one task per kind, named by the registry."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery

from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.keys import HARD_LIMIT_MARGIN_S
from gathering_tasks.kinds import kind

log = logging.getLogger(__name__)


def message_labels(dispatch: Dispatch) -> dict[str, str]:
    """What Flower and the worker log show for a record's message, instead of ``[22]``.

    ``shadow`` names the task after the kind and the record (``run_task nightly-report``);
    ``argsrepr`` says which run, slot and attempt. Only names and numbers: a record's config
    (which may hold credentials) never travels in a message.
    """
    task = kind(dispatch.kind).task_name
    parts = [f"run={dispatch.record_id}"]
    if dispatch.label:
        parts.append(f"name={dispatch.label}")
    if dispatch.slot is not None:
        parts.append(f"slot={dispatch.slot.isoformat()}")
    if dispatch.attempt is not None:
        parts.append(f"attempt={dispatch.attempt}")
    shadow = f"{dispatch.kind} {dispatch.label}" if dispatch.label else task
    return {"shadow": shadow, "argsrepr": " ".join(parts), "kwargsrepr": "{}"}


def message_options(dispatch: Dispatch, default_queue: str) -> dict[str, Any]:
    """Routing and time limits of a record's message (JSON payload: the record id only)."""
    options: dict[str, Any] = {"queue": dispatch.queue or default_queue}
    if dispatch.priority is not None:
        options["priority"] = dispatch.priority
    if dispatch.timeout_s:
        options["soft_time_limit"] = dispatch.timeout_s
        options["time_limit"] = dispatch.timeout_s + HARD_LIMIT_MARGIN_S
    return options


def publish(
    app: Celery, dispatches: Iterable[Dispatch], *, default_queue: str, countdown_s: float = 0.0
) -> int:
    """Publish each record on one reused producer connection. Returns how many were sent."""
    sent = 0
    with app.producer_or_acquire() as producer, producer.batch():
        # kombu >= 5.7: the Redis commands of every message (and its task-sent event) go in
        # pipelined round trips, flushed when the batch closes.
        for dispatch in dispatches:
            app.send_task(
                kind(dispatch.kind).task_name,
                args=[dispatch.record_id],
                producer=producer,
                countdown=max(countdown_s, dispatch.countdown_s) or None,
                add_to_parent=False,
                **message_labels(dispatch),
                **message_options(dispatch, default_queue),
            )
            sent += 1
    return sent
