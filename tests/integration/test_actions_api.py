"""Validation at the door: a clear error naming the field, and nothing written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gathering_tasks.api import ActionService
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import InvalidInput, NotFound
from gathering_tasks.settings import Settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def svc(repo: Repository, settings: Settings) -> ActionService:
    return ActionService(
        repo, settings, task_allowed=lambda name: name.startswith("demo."), clock=lambda: NOW
    )


def action(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "nightly",
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [1, 2]},
        "schedule": {"kind": "cron", "expr": "30 2 * * *", "timezone": "Europe/Paris"},
    }
    base.update(overrides)
    return base


BAD_INPUTS = [
    ({"schedule": {"kind": "cron", "expr": "61 * * * *"}}, "schedule.expr"),
    ({"schedule": {"kind": "cron", "expr": "* * *"}}, "schedule.expr"),
    (
        {"schedule": {"kind": "cron", "expr": "0 3 * * *", "timezone": "Mars/Olympus"}},
        "schedule.timezone",
    ),
    ({"schedule": {"kind": "interval", "every_s": 0}}, "schedule.every_s"),
    ({"schedule": {"kind": "interval", "every_s": -5}}, "schedule.every_s"),
    ({"schedule": {"kind": "weekly"}}, "schedule.kind"),
    ({"action_type": "launch_rocket"}, "action_type"),
    ({"config": {"task": "os.system", "args": ["rm -rf /"]}}, "config.task"),
    ({"config": {"args": [1]}}, "config.task"),
    ({"config": {"task": "demo.add", "surprise": 1}}, "config.surprise"),
    ({"config": {"task": "demo.add", "args": ["x" * 70_000]}}, "config"),
    ({"name": "has spaces"}, "name"),
    ({"retry_max_attempts": 0}, "retry_max_attempts"),
    ({"end_at": NOW.isoformat(), "start_at": (NOW + timedelta(days=1)).isoformat()}, "end_at"),
    ({"action_type": "call_api", "config": {"method": "GET"}}, "config.url"),
    ({"action_type": "send_notification", "config": {"channel": "pigeon"}}, "config"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD_INPUTS)
def test_invalid_action_names_the_field_and_writes_nothing(
    repo: Repository, settings: Settings, overrides: dict[str, Any], field: str
):
    with pytest.raises(InvalidInput) as info:
        svc(repo, settings).create(action(**overrides))
    assert info.value.field is not None and info.value.field.startswith(field)
    assert field in str(info.value)
    assert repo.list_actions() == []


def test_valid_action_gets_its_first_slot_in_its_zone(repo: Repository, settings: Settings):
    created = svc(repo, settings).create(action())
    # 02:30 in Paris on 27 Nov 2026 is 01:30 UTC
    assert created["next_run_at"] == "2026-11-27T01:30:00+00:00"
    assert created["status"] == "active"


def test_duplicate_name_is_invalid(repo: Repository, settings: Settings):
    svc(repo, settings).create(action())
    with pytest.raises(InvalidInput, match="name"):
        svc(repo, settings).create(action())
    assert len(repo.list_actions()) == 1


def test_update_revalidates_and_recomputes(repo: Repository, settings: Settings):
    service = svc(repo, settings)
    service.create(action())
    with pytest.raises(InvalidInput, match=r"schedule\.expr"):
        service.update("nightly", {"schedule": {"kind": "cron", "expr": "bad"}})
    updated = service.update("nightly", {"schedule": {"kind": "interval", "every_s": 60}})
    assert updated["schedule"]["kind"] == "interval"
    # the interval is anchored at the update (on the second here), so its first slot is now
    assert updated["next_run_at"] == NOW.isoformat()
    assert updated["schedule"]["anchor"] == NOW.isoformat()


def test_an_action_that_could_never_run_is_refused(repo: Repository, settings: Settings):
    past = (NOW - timedelta(hours=1)).isoformat()
    with pytest.raises(InvalidInput, match=r"schedule\.at"):
        svc(repo, settings).create(action(schedule={"kind": "once", "at": past}))
    with pytest.raises(InvalidInput, match="end_at"):
        svc(repo, settings).create(action(end_at=(NOW + timedelta(minutes=1)).isoformat()))
    assert repo.list_actions() == []


def test_update_reactivates_a_completed_action(repo: Repository, settings: Settings):
    # Given an action that completed its max_runs
    service = svc(repo, settings)
    service.create(action(max_runs=1))
    repo.set_status("nightly", "completed", now=NOW)
    # When its budget is raised, it is active again; a paused one stays paused
    assert service.update("nightly", {"max_runs": 5})["status"] == "active"
    service.pause("nightly")
    assert service.update("nightly", {"max_runs": 6})["status"] == "paused"


def test_timeout_above_the_global_limit_is_refused(repo: Repository, settings: Settings):
    with pytest.raises(InvalidInput, match="timeout_s"):
        svc(repo, settings).create(action(timeout_s=settings.task_time_limit_s + 1))


def test_unknown_action_is_not_found(repo: Repository, settings: Settings):
    service = svc(repo, settings)
    for call in (service.get, service.pause, service.resume, service.delete):
        with pytest.raises(NotFound):
            call("ghost")


def test_delete_removes_action_and_runs(repo: Repository, settings: Settings):
    service = svc(repo, settings)
    service.create(action())
    run_id = service.trigger("nightly")
    service.delete("nightly")
    assert repo.list_actions() == []
    with pytest.raises(NotFound):
        repo.get_run(run_id)
