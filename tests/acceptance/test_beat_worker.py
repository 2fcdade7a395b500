"""Real beat and worker processes: every slot runs once; pause and create take effect.

Nothing here asserts on elapsed time: every wait is for a condition, under a deadline generous
enough for a loaded machine, and measured latencies are printed, never compared.
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from gathering_tasks.api import ActionService
from gathering_tasks.db.models import ScheduledActionRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.acceptance.procs import running_stack, stack_env
from tests.servers import wait_for

# The waits below have deadlines generous enough for a loaded machine; the suite's 300 s
# per-test timeout must not cut them short.
pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(900)]


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


def all_finished(repo: Repository) -> bool:
    return set(runs_by_status(repo)) <= {"succeeded"}


def slots_claimed_up_to(repo: Repository, end: datetime) -> dict[int, int]:
    """Per action id: how many of its slots at or before ``end`` have a run row."""
    r = ScheduledActionRun
    stmt = select(r.action_id, func.count()).where(r.scheduled_for <= end).group_by(r.action_id)
    with repo.factory() as session:
        return {action_id: count for action_id, count in session.execute(stmt).all()}


def runs_of(repo: Repository, action_id: int) -> list[ScheduledActionRun]:
    with repo.factory() as session:
        r = ScheduledActionRun
        stmt = select(r).where(r.action_id == action_id).order_by(r.scheduled_for)
        return list(session.scalars(stmt))


def first_slot_of(action: dict[str, object]) -> datetime:
    """The first slot of a just-created action, as the API reports it."""
    return datetime.fromisoformat(str(action["next_run_at"]))


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
    duration_s = 20  # 40 ticks of the leader, 420 slots
    svc = service(repo, settings)
    with running_stack(env, tmp_path) as stack:
        workers = [stack.worker("w1", concurrency=4), stack.worker("w2", concurrency=4)]
        stack.beat("b1")
        stack.beat("b2")
        for worker in workers:
            wait_for(lambda w=worker: " ready." in w.log_text(), 60, f"{worker.name} to be ready")
        anchor = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        end = anchor + timedelta(seconds=duration_s)
        # On a slow machine creation may pass the anchor: each action starts at its own
        # first slot, as the API reports it.
        first = {}
        for i in range(20):
            action = svc.create(recorder(f"a{i:02}", "marks", anchor))
            first[action["id"]] = first_slot_of(action)
        expected = {
            action_id: int((end - slot).total_seconds()) + 1 for action_id, slot in first.items()
        }

        # When every slot up to the end of the window has been claimed, all are paused
        wait_for(
            lambda: slots_claimed_up_to(repo, end) == expected,
            duration_s + 300,
            "every slot of the window to be claimed",
        )
        for i in range(20):
            svc.pause(f"a{i:02}")
        wait_for(lambda: all_finished(repo), 300, "every run to finish")

        # Then every slot from the first to the last claimed has exactly one run record
        with repo.factory() as session:
            r = ScheduledActionRun
            rows = session.execute(
                select(r.action_id, r.scheduled_for, r.attempt, r.started_at, r.status)
            ).all()
        slots = {(row.action_id, row.scheduled_for) for row in rows}
        assert len(slots) == len(rows), "a slot has two run records"
        per_action: dict[int, list[datetime]] = {}
        for row in rows:
            per_action.setdefault(row.action_id, []).append(row.scheduled_for)
        assert set(per_action) == set(first)
        for action_id, times in per_action.items():
            times.sort()
            contiguous = [times[0] + timedelta(seconds=k) for k in range(len(times))]
            assert times == contiguous, f"action {action_id} is missing a slot"
            assert times[0] == first[action_id]
            assert times[-1] >= end
        # And each ran exactly once, on its first attempt
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


def test_pause_stops_firing_and_a_new_action_runs_its_first_slot(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    # Given an action firing every half second under a running beat and worker
    anchor = datetime.now(UTC).replace(microsecond=0)
    svc = service(repo, settings)
    first = svc.create(recorder("first", "first", anchor, every_s=0.5))
    env = stack_env(db_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    with running_stack(env, tmp_path) as stack:
        stack.worker("w1", concurrency=2)
        stack.beat("b1")
        wait_for(lambda: client.llen("first") >= 2, 120, "the first action to fire")

        # When it is paused (committed once pause returns), then a new action is created
        svc.pause("first")
        paused_at = datetime.now(UTC)
        second = svc.create(recorder("second", "second", paused_at + timedelta(seconds=1), 60))
        second_slot = first_slot_of(second)

        # Then the new action's first slot runs (so beat has ticked since the pause)
        wait_for(lambda: client.llen("second") >= 1, 300, "the new action to fire")
        wait_for(lambda: all_finished(repo), 300, "in-flight runs to finish")
        new_run = runs_of(repo, int(second["id"]))[0]
        assert new_run.scheduled_for == second_slot > paused_at
        assert new_run.started_at is not None and new_run.started_at >= second_slot
        # And the paused action got no slot after the pause, though several fell due since
        old_runs = runs_of(repo, int(first["id"]))
        late = [run.scheduled_for for run in old_runs if run.scheduled_for > paused_at]
        assert late == [], f"slots claimed after the pause: {late}"
        assert client.llen("first") == len(old_runs)
        with capsys.disabled():
            stop_ms = (paused_at - old_runs[-1].scheduled_for).total_seconds() * 1000
            start_ms = (new_run.started_at - second_slot).total_seconds() * 1000
            print(
                f"\nlast slot {stop_ms:.0f}ms before the pause; new slot started +{start_ms:.0f}ms"
            )
