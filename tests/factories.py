"""Small builders shared by tests: actions and claimed runs."""

from __future__ import annotations

from datetime import datetime

from gathering_tasks.api import ActionService
from gathering_tasks.beat import SlotPlanner
from gathering_tasks.db.repo import Repository
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
    """A pending run, claimed by beat at ``now`` for a new one-shot action. Its run id."""
    once_action(repo, settings, now, **extra)
    (claim,) = repo.claim_due(now, limit=1, plan=SlotPlanner(now))
    return claim.run_id
