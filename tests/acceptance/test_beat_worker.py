"""Real beat and worker processes: every slot runs once, changes apply within two seconds."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from gathering_tasks.api import ActionService
from gathering_tasks.db.models import ScheduledActionRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.acceptance.procs import running_stack, stack_env
from tests.servers import wait_for

pytestmark = pytest.mark.acceptance


def service(repo: Repository, settings: Settings) -> ActionService:
    return ActionService(repo, settings, task_allowed=lambda _n: True)


def recorder(name: str, key: str, anchor: datetime, every_s: float = 1) -> dict[str, object]:
    return {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "demo.record", "kwargs": {"key": key}},
        "schedule": {"kind": "interval", "every_s": every_s, "anchor": anchor.isoformat()},
        "catchup_mode": "all",
        "overlap_policy": "allow",
    }


def runs_by_status(repo: Repository) -> dict[str, int]:
    return repo.ledger.count_runs()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_beats_twenty_actions_every_second_one_run_per_slot(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    # Given two beats and two ready workers, then 20 actions every second
    env = stack_env(db_url, redis_url)
    duration_s = 60
    svc = service(repo, settings)
    with running_stack(env, tmp_path) as stack:
        workers = [stack.worker("w1", concurrency=4), stack.worker("w2", concurrency=4)]
        stack.beat("b1")
        stack.beat("b2")
        for worker in workers:
            wait_for(lambda w=worker: " ready." in w.log_text(), 60, f"{worker.name} to be ready")
        anchor = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        for i in range(20):
            svc.create(recorder(f"a{i:02}", "marks", anchor))
        # When they run for the duration, then all actions are paused
        end = anchor + timedelta(seconds=duration_s)
        wait_for(lambda: datetime.now(UTC) > end, duration_s + 30, "the run window to pass")
        for i in range(20):
            svc.pause(f"a{i:02}")
        wait_for(
            lambda: set(runs_by_status(repo)) <= {"succeeded"},
            60,
            "every run to finish",
        )
        # Then every slot in the window has exactly one run, each executed exactly once
        with repo.factory() as session:
            r = ScheduledActionRun
            rows = session.execute(
                select(r.action_id, r.scheduled_for, r.attempt, r.started_at, r.status)
            ).all()
        slots = {(row.action_id, row.scheduled_for) for row in rows}
        assert len(slots) == len(rows), "a slot has two run records"
        per_action = {}
        for row in rows:
            per_action.setdefault(row.action_id, []).append(row.scheduled_for)
        for action_id, times in per_action.items():
            times.sort()
            expected = [times[0] + timedelta(seconds=k) for k in range(len(times))]
            assert times == expected, f"action {action_id} is missing a slot"
            assert times[0] == anchor
            assert len(times) >= duration_s
        assert all(row.attempt == 1 for row in rows)
        marks = redis.Redis.from_url(redis_url).lrange("marks", 0, -1)
        assert len(marks) == len(rows) == len(set(marks)), "an execution was doubled or lost"
        lateness = sorted((row.started_at - row.scheduled_for).total_seconds() for row in rows)
        p99 = lateness[int(len(lateness) * 0.99) - 1]
        with capsys.disabled():
            print(
                f"\nslots={len(rows)} lateness median={statistics.median(lateness) * 1000:.0f}ms "
                f"p99={p99 * 1000:.0f}ms max={lateness[-1] * 1000:.0f}ms"
            )


def test_pause_stops_and_new_action_starts_within_two_seconds(
    db_url: str, redis_url: str, settings: Settings, repo: Repository, tmp_path: Path
):
    anchor = datetime.now(UTC).replace(microsecond=0)
    svc = service(repo, settings)
    svc.create(recorder("first", "first", anchor, every_s=0.5))
    env = stack_env(db_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    with running_stack(env, tmp_path) as stack:
        stack.worker("w1", concurrency=2)
        stack.beat("b1")
        wait_for(lambda: client.llen("first") >= 2, 60, "the first action to fire")
        # When it is paused, it stops firing within 2 s
        svc.pause("first")
        paused_at = datetime.now(UTC)
        wait_for(lambda: not set(runs_by_status(repo)) - {"succeeded"}, 10, "in-flight runs")
        with repo.factory() as session:
            r = ScheduledActionRun
            last_slot = session.execute(select(r.scheduled_for).order_by(r.id.desc())).scalar()
        assert last_slot is not None and last_slot <= paused_at + timedelta(seconds=2)
        # And a new action starts within 2 s of its creation
        created_at = datetime.now(UTC)
        first_slot = created_at + timedelta(seconds=1)
        svc.create(recorder("second", "second", first_slot, every_s=60))
        wait_for(lambda: client.llen("second") >= 1, 30, "the new action to fire")
        with repo.factory() as session:
            started = session.execute(
                select(ScheduledActionRun.started_at).order_by(ScheduledActionRun.id.desc())
            ).scalar()
        assert started is not None and started - created_at < timedelta(seconds=2)
        assert started >= first_slot
