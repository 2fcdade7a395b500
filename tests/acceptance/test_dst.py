"""Cron in a time zone across a spring-forward jump, through a real beat and a real worker.

Both processes run under libfaketime on one fake "now" that starts before 01:59 EST on 2026-03-08
in New York, when the clocks jump from 02:00 EST to 03:00 EDT (07:00 UTC), and runs ``RATE``
times as fast as real time, so the minutes around the jump pass in seconds. PostgreSQL and
Redis keep real time: every timestamp in the database is written by a host, and Redis lease TTLs
count on the server.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from gathering_tasks.api import ActionService
from gathering_tasks.db.models import ScheduledActionRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.schedules import Schedule, next_slot, parse_schedule
from gathering_tasks.settings import Settings
from tests.acceptance.procs import ROOT, CeleryProcess, running_stack, stack_env
from tests.servers import wait_for

pytestmark = pytest.mark.acceptance

ZONE = "America/New_York"
JUMP = datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 02:00 EST -> 03:00 EDT
# The fake clock's speed: each real second is RATE fake ones in every process of the test.
RATE = 10
# Long enough before 01:59 EST (ten real seconds) for beat to take the lead; late starts are
# caught up anyway.
FAKE_START = JUMP - timedelta(seconds=60 + 10 * RATE)
LAST_SLOT = JUMP + timedelta(minutes=1)  # 03:01 EDT: the last slot the test waits for
SCHEDULES = {
    "before": "59 1 * * *",  # 01:59 EST, an hour before the jump in wall time
    "gap": "0,30 2 * * *",  # 02:00 and 02:30 do not exist that day
    "after": "0,1 3 * * *",  # 03:00 EDT is the jump itself
    "gap-and-jump": "0,30 2-3 * * *",  # 02:00, 02:30 and 03:00 in one action
}
# Its sitecustomize makes time.sleep work under libfaketime 0.9.10 (see its docstring).
FAKETIME_SITE = Path(__file__).with_name("faketime_site")
# The multithreaded build: celery workers call the clock from several threads.
LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)


def utc(hour: int, minute: int, day: int = 8) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def libfaketime() -> str:
    found = sorted(path for pattern in LIBFAKETIME_GLOBS for path in glob.glob(pattern))
    if not found:
        message = "libfaketime is not installed (apt-get install faketime)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: it is required)")
        pytest.skip(message)
    return found[0]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class FakeClock:
    """One fake wall clock for this process and the ones it starts: ``start`` at the real
    instant ``real_t0`` (epoch seconds), then ``RATE`` fake seconds per real second."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.real_t0 = time.time()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=RATE * (time.time() - self.real_t0))

    def faketime_spec(self) -> str:
        """``FAKETIME`` for a process started right now.

        libfaketime runs a process's clock ``RATE`` times as fast from the real instant it
        loads (``s``), shifted by the offset: ``s + offset + RATE * (t - s)``. Equal to
        :meth:`now` at every real instant ``t`` when the offset is chosen at that process's
        start, as here, just before it is spawned (a few milliseconds apart).
        """
        s = time.time()
        offset_s = self.start.timestamp() - RATE * self.real_t0 + (RATE - 1) * s
        return f"{round(offset_s):+d} x{RATE}"


def faketime_env(library: str, clock: FakeClock) -> dict[str, str]:
    """Environment that puts a process started right now on ``clock``; no other clock moves.

    A fake clock that runs fast also shortens every ``select``/``poll`` timeout by ``RATE``
    (libfaketime scales them): sleeps and intervals are counted on the fake clock too.
    """
    return {
        "LD_PRELOAD": library,
        "FAKETIME": clock.faketime_spec(),
        # Faked, CLOCK_MONOTONIC jumps to the fake epoch and every threading wait with a
        # timeout hangs; celery and kombu time their waits with it, so it stays real.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        # File times stay real, so the .pyc caches shared with unfaked processes stay valid.
        "NO_FAKE_STAT": "1",
        "PYTHONPATH": os.pathsep.join([str(FAKETIME_SITE), str(ROOT)]),
    }


def cron(name: str, now: datetime) -> tuple[dict[str, object], Schedule]:
    spec = {"kind": "cron", "expr": SCHEDULES[name], "timezone": ZONE}
    action = {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "demo.record", "kwargs": {"key": f"dst:{name}"}},
        "schedule": spec,
        "catchup_mode": "all",
        "overlap_policy": "allow",
    }
    return action, parse_schedule(spec, now=now)


def slots_until(schedule: Schedule, after: datetime, last: datetime) -> list[datetime]:
    slots: list[datetime] = []
    slot = next_slot(schedule, after)
    while slot is not None and slot <= last:
        slots.append(slot)
        slot = next_slot(schedule, slot)
    return slots


def runs_of(repo: Repository) -> list[ScheduledActionRun]:
    with repo.factory() as session:
        return list(session.scalars(select(ScheduledActionRun).order_by(ScheduledActionRun.id)))


def all_done(repo: Repository, client: redis.Redis, worker: CeleryProcess, expected: int) -> bool:
    marks = sum(client.llen(f"dst:{name}") for name in SCHEDULES)
    # The worker's own report too: stopped before it acks the last task, it logs a lost worker.
    return (
        marks >= expected
        and repo.ledger.count_runs() == {"succeeded": expected}
        and worker.log_text().count("] succeeded in ") >= expected
    )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_cron_across_spring_forward_runs_each_slot_once(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    tmp_path: Path,
    libfaketime: str,
    client: redis.Redis,
):
    # Given a fast fake clock a little before 01:59 EST on the day New York springs forward
    clock = FakeClock(FAKE_START)
    fake_now = clock.now
    svc = ActionService(repo, settings, task_allowed=lambda _n: True, clock=fake_now)
    created_at = fake_now()
    schedules = {}
    for name in SCHEDULES:
        action, schedules[name] = cron(name, created_at)
        svc.create(action)
    expected = {name: slots_until(s, created_at, LAST_SLOT) for name, s in schedules.items()}
    # The schedule arithmetic agrees with what is known by hand: 01:59 EST is 06:59 UTC; every
    # wall time in the gap, and 03:00 EDT, is the jump at 07:00 UTC, once; 03:01 EDT is 07:01.
    assert expected == {
        "before": [utc(6, 59)],
        "gap": [JUMP],
        "after": [JUMP, utc(7, 1)],
        "gap-and-jump": [JUMP],
    }
    total = sum(len(slots) for slots in expected.values())

    def env() -> dict[str, str]:
        return stack_env(db_url, redis_url, **faketime_env(libfaketime, clock))

    # When a real worker and a real beat run on that clock past 03:01 EDT
    with running_stack(env(), tmp_path) as stack:
        worker = stack.worker("w1", 2, env=env())
        stack.beat_with(env=env(), name="b1")
        budget_s = (LAST_SLOT - fake_now()).total_seconds() / RATE + 90
        try:
            wait_for(lambda: all_done(repo, client, worker, total), budget_s, "every slot to run")
        except TimeoutError:
            print(stack.logs())
            raise

    # Then every expected slot has exactly one run, which succeeded on its first attempt
    runs = runs_of(repo)
    names = {svc.get(name)["id"]: name for name in SCHEDULES}
    observed: dict[str, list[datetime]] = {name: [] for name in SCHEDULES}
    for run in runs:
        observed[names[run.action_id]].append(run.scheduled_for)
    assert observed == expected
    assert len(runs) == len({(run.action_id, run.scheduled_for) for run in runs}) == total
    assert all(run.status == "succeeded" and run.attempt == 1 for run in runs)
    assert not [run for run in runs if JUMP < run.scheduled_for < utc(7, 1)]
    # And beat claimed each slot on the fake clock, never before the slot (started_at is
    # the database's clock, which runs on real time: liveness is judged by one clock)
    end = fake_now()
    for run in runs:
        assert run.started_at is not None
        assert created_at <= run.created_at <= end
        assert run.scheduled_for <= run.created_at
    # And the worker executed each run exactly once
    for name in SCHEDULES:
        marks = [mark.decode() for mark in client.lrange(f"dst:{name}", 0, -1)]
        mine = [run for run in runs if names[run.action_id] == name]
        assert sorted(marks) == sorted(f"{r.id}@{r.scheduled_for.isoformat()}" for r in mine)
    # And the next slots are read on EDT: 01:59 EDT tomorrow is 05:59 UTC, no longer 06:59
    for name, schedule in schedules.items():
        upcoming = next_slot(schedule, LAST_SLOT)
        assert upcoming is not None
        assert svc.get(name)["next_run_at"] == upcoming.isoformat()
    assert svc.get("before")["next_run_at"] == utc(5, 59, day=9).isoformat()
    assert svc.get("after")["next_run_at"] == utc(7, 0, day=9).isoformat()
