"""Validation at the door: a clear error naming the field, and nothing written."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gathering_tasks.api import ActionService
from gathering_tasks.db.ledger import Record
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
    assert repo.actions.list_actions() == []


def test_valid_action_gets_its_first_slot_in_its_zone(repo: Repository, settings: Settings):
    created = svc(repo, settings).create(action())
    # 02:30 in Paris on 27 Nov 2026 is 01:30 UTC
    assert created["next_run_at"] == "2026-11-27T01:30:00+00:00"
    assert created["status"] == "active"


def test_duplicate_name_is_invalid(repo: Repository, settings: Settings):
    svc(repo, settings).create(action())
    with pytest.raises(InvalidInput, match="name"):
        svc(repo, settings).create(action())
    assert len(repo.actions.list_actions()) == 1


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
    assert repo.actions.list_actions() == []


def test_update_reactivates_a_completed_action(repo: Repository, settings: Settings):
    # Given an action that completed its max_runs
    service = svc(repo, settings)
    service.create(action(max_runs=1))
    repo.actions.mutate("nightly", lambda _current: {"status": "completed"}, now=NOW)
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


def test_delete_archives_the_action_and_keeps_its_history(repo: Repository, settings: Settings):
    # Given an action with a finished run and a queued one
    service = svc(repo, settings)
    service.create(action())
    done = service.trigger("nightly")
    started = repo.ledger.start(done, kind="run_task", worker="w", task_id="t")
    assert isinstance(started, Record)
    assert repo.ledger.finish(done, 1, status="succeeded", result={"ok": 1})
    queued = service.trigger("nightly")
    # When it is deleted
    service.delete("nightly")
    # Then it is gone from the live actions but archived, and never due again
    assert repo.actions.list_actions() == []
    (archived,) = repo.actions.list_actions("archived")
    assert (archived["name"], archived["status"], archived["next_run_at"]) == (
        "nightly",
        "archived",
        None,
    )
    # And its history is kept: the finished run as it was, the queued one cancelled
    assert service.get_run(done)["result"] == {"ok": 1}
    assert service.get_run(queued)["status"] == "cancelled"
    # And the name is free for a new action
    assert service.create(action())["id"] != archived["id"]


def test_a_pause_during_an_update_is_never_lost(repo: Repository, settings: Settings):
    # Given an update whose validation is slow, and a pause arriving while it validates
    paused = threading.Event()

    def pause_meanwhile(_task: str) -> bool:
        pauser = threading.Thread(
            target=lambda: (svc(repo, settings).pause("nightly"), paused.set())
        )
        pauser.start()
        # the pause gets up to a second to land before the update writes (it cannot, if the
        # update holds the action's lock: then it lands after)
        paused.wait(timeout=1)
        threads.append(pauser)
        return True

    threads: list[threading.Thread] = []
    svc(repo, settings).create(action())
    slow = ActionService(repo, settings, task_allowed=pause_meanwhile, clock=lambda: NOW)
    # When the update commits
    slow.update("nightly", {"description": "changed"})
    for thread in threads:
        thread.join(30)
    # Then both changes hold: the pause was not overwritten by the update's stale read
    final = repo.actions.get("nightly")
    assert (final["status"], final["description"]) == ("paused", "changed")


def test_a_trigger_with_the_same_key_makes_one_run(repo: Repository, settings: Settings):
    # Given an action
    service = svc(repo, settings)
    service.create(action())
    # When it is triggered twice with the same key (a retried request), and once without
    first = service.trigger("nightly", key="req-1")
    again = service.trigger("nightly", key="req-1")
    other = service.trigger("nightly")
    # Then the repeat returns the first run; the keyless trigger is a run of its own
    assert again == first and other != first
    runs = service.list_runs(action="nightly")
    assert sorted(r["id"] for r in runs) == sorted({first, other})
    # And each run carries an idempotency key of its own, stable for its attempts
    keys = {r["id"]: r["idempotency_key"] for r in runs}
    assert keys[first] != keys[other] and keys[first].startswith("gathering-trigger-")


def test_cancel_stops_a_queued_run_and_asks_a_running_one(repo: Repository, settings: Settings):
    service = svc(repo, settings)
    service.create(action())
    queued = service.trigger("nightly")
    running = service.trigger("nightly")
    assert isinstance(repo.ledger.start(running, kind="run_task", worker="w", task_id="t"), Record)
    # When both are cancelled
    assert service.cancel_run(queued) == "cancelled"
    assert service.cancel_run(running) == "running"
    # Then the queued one never starts, and the running one's worker is told at its heartbeat
    refused = repo.ledger.start(queued, kind="run_task", worker="w", task_id="t2")
    assert not isinstance(refused, Record) and refused.status == "cancelled"
    assert repo.ledger.heartbeat(running, 1).cancel_requested
    with pytest.raises(NotFound):
        service.cancel_run(999_999)
