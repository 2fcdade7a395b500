"""Small builders shared by tests: actions, claimed records, guards."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import redis

from gathering_tasks import keys
from gathering_tasks.api import ActionService
from gathering_tasks.beat import SlotPlanner
from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.db.repo import Repository
from gathering_tasks.guard import ExecutionGuard, GuardConfig
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings


def once_action(
    repo: Repository, settings: Settings, now: datetime, name: str = "once", **extra: object
) -> dict[str, object]:
    """Create a ``run_task`` action whose only slot is ``now``."""
    service = ActionService(repo, settings, task_allowed=lambda _n: True, clock=lambda: now)
    return service.create(
        {
            "name": name,
            "action_type": "run_task",
            "config": {"task": "demo.add", "args": [1, 2]},
            "schedule": {"kind": "once", "at": now.isoformat()},
            **extra,
        }
    )


def claimed_run(repo: Repository, settings: Settings, now: datetime, **extra: object) -> int:
    """A pending record, claimed by beat at ``now`` for a new one-shot action. Its id."""
    once_action(repo, settings, now, **extra)
    batch = repo.claims.claim_due(now, limit=1, slot_budget=100, plan=SlotPlanner(now))
    (dispatch,) = batch.dispatches
    return dispatch.record_id


def make_guard(
    repo: Repository,
    settings: Settings,
    published: list[tuple[Dispatch, float]] | None = None,
    *,
    on_publish: Callable[[Dispatch, float], None] | None = None,
    heartbeat_interval_s: float = 0.2,
    outcome_retry_s: float = 60.0,
) -> ExecutionGuard:
    """A guard over ``repo`` with real Redis leases (prefix ``gathering``)."""
    client = redis.Redis.from_url(settings.redis_url)
    sink = published if published is not None else []

    def publish(dispatch: Dispatch, delay_s: float) -> None:
        if on_publish is not None:
            on_publish(dispatch, delay_s)
        sink.append((dispatch, delay_s))

    return ExecutionGuard(
        repo.ledger,
        lambda record_id: Lease(
            client, keys.run_lock(settings.key_prefix, record_id), settings.run_lease_ttl_s
        ),
        GuardConfig(
            lease_ttl_s=settings.run_lease_ttl_s,
            heartbeat_interval_s=heartbeat_interval_s,
            max_result_bytes=settings.max_result_bytes,
            outcome_retry_s=outcome_retry_s,
        ),
        publish_retry=publish,
    )
