"""Beat's claim: one run row per (action, slot), next_run_at advanced in the same commit."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from gathering_tasks.api import ActionService
from gathering_tasks.beat import SlotPlanner
from gathering_tasks.db.models import ScheduledAction, ScheduledActionRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def service(repo: Repository, settings: Settings, now: datetime = T0) -> ActionService:
    return ActionService(repo, settings, task_allowed=lambda _name: True, clock=lambda: now)


def every_second(name: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [1, 2]},
        "schedule": {"kind": "interval", "every_s": 1, "anchor": T0.isoformat()},
        **extra,
    }


def run_rows(repo: Repository) -> list[tuple[int, datetime, str]]:
    factory = repo._factory
    with factory() as session:
        r = ScheduledActionRun
        rows = session.execute(select(r.action_id, r.scheduled_for, r.status)).all()
    return [(row[0], row[1], row[2]) for row in rows]


def test_due_slot_is_claimed_once_and_next_run_advances(repo: Repository, settings: Settings):
    # Given an action every second, created at T0
    svc = service(repo, settings)
    svc.create(every_second("a"))
    # When beat claims at T0 + 0.5 s, twice (a replayed tick)
    now = T0 + timedelta(milliseconds=500)
    first = repo.claim_due(now, limit=100, plan=SlotPlanner(now))
    second = repo.claim_due(now, limit=100, plan=SlotPlanner(now))
    # Then exactly one run exists, for the T0 slot, and next_run_at moved past now
    assert len(first) == 1 and second == []
    assert [(slot, status) for _, slot, status in run_rows(repo)] == [(T0, "pending")]
    assert svc.get("a")["next_run_at"] == (T0 + timedelta(seconds=1)).isoformat()
    assert svc.get("a")["run_count"] == 1


def test_concurrent_claimers_never_double_a_slot(repo: Repository, settings: Settings):
    # Given 20 actions every second, all due for 30 seconds of slots
    svc = service(repo, settings)
    for i in range(20):
        svc.create(
            every_second(f"a{i}", catchup_mode="all", catchup_max=1000, overlap_policy="allow")
        )
    claimed: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    # When 4 threads claim at successive instants, racing each other
    def claimer(offset_ms: int) -> None:
        try:
            for step in range(30):
                now = T0 + timedelta(seconds=step, milliseconds=offset_ms)
                claims = repo.claim_due(now, limit=7, plan=SlotPlanner(now))
                with lock:
                    claimed.extend(c.run_id for c in claims)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(ms,)) for ms in (100, 300, 500, 700)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then: no errors, every claimed run id is distinct, and each action has one row per slot
    assert errors == []
    assert len(claimed) == len(set(claimed))
    rows = run_rows(repo)
    assert len(rows) == len({(action, slot) for action, slot, _ in rows})
    assert len(rows) == len(claimed)


def test_paused_action_is_not_due_and_resume_skips_the_pause(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    svc.create(every_second("p"))
    svc.pause("p")
    later = T0 + timedelta(seconds=10)
    assert repo.claim_due(later, limit=10, plan=SlotPlanner(later)) == []
    service(repo, settings, now=later).resume("p")
    assert svc.get("p")["next_run_at"] == later.isoformat()
    claims = repo.claim_due(later, limit=10, plan=SlotPlanner(later))
    assert len(claims) == 1


def test_overlap_skip_records_skipped_slot(repo: Repository, settings: Settings):
    # Given a run still pending from the previous slot
    svc = service(repo, settings)
    svc.create(every_second("o"))
    repo.claim_due(T0, limit=10, plan=SlotPlanner(T0))
    # When the next slot comes due
    now = T0 + timedelta(seconds=1)
    claims = repo.claim_due(now, limit=10, plan=SlotPlanner(now))
    # Then it is recorded as skipped and not published
    assert claims == []
    statuses = sorted(status for _, _, status in run_rows(repo))
    assert statuses == ["pending", "skipped"]


def test_max_runs_completes_the_action(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    svc.create(every_second("m", max_runs=2, overlap_policy="allow"))
    for step in range(5):
        now = T0 + timedelta(seconds=step)
        repo.claim_due(now, limit=10, plan=SlotPlanner(now))
    assert svc.get("m")["status"] == "completed"
    assert len(run_rows(repo)) == 2


def test_due_query_uses_index_and_batches(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    for i in range(25):
        svc.create(every_second(f"b{i}", overlap_policy="allow"))
    now = T0
    first = repo.claim_due(now, limit=10, plan=SlotPlanner(now))
    assert len(first) == 10
    assert repo.next_due_at() == T0
    with repo._factory() as session:
        count = session.execute(select(func.count()).select_from(ScheduledActionRun)).scalar()
    assert count == 10


def test_an_unparseable_schedule_disables_only_its_action(repo: Repository, settings: Settings):
    # Given two due actions, one of whose stored schedule no longer parses
    svc = service(repo, settings)
    svc.create(every_second("good", overlap_policy="allow"))
    svc.create(every_second("broken"))
    with repo._factory() as session, session.begin():
        session.execute(
            update(ScheduledAction)
            .where(ScheduledAction.name == "broken")
            .values(schedule={"kind": "cron", "expr": "0 3 * * *", "timezone": "Gone/Away"})
        )
    # When beat claims
    claims = repo.claim_due(T0, limit=10, plan=SlotPlanner(T0))
    # Then the good action still runs and the broken one is disabled, not lost
    assert len(claims) == 1
    assert svc.get("good")["status"] == "active"
    assert svc.get("broken")["status"] == "disabled"


def test_skipped_slots_do_not_use_up_max_runs(repo: Repository, settings: Settings):
    # Given max_runs=3 and overlap skip, with the first run still pending
    svc = service(repo, settings)
    svc.create(every_second("budget", max_runs=3))
    repo.claim_due(T0, limit=10, plan=SlotPlanner(T0))
    for step in (1, 2, 3):
        now = T0 + timedelta(seconds=step)
        repo.claim_due(now, limit=10, plan=SlotPlanner(now))
    # Then the three skipped slots did not complete the action
    action = svc.get("budget")
    assert action["run_count"] == 1 and action["status"] == "active"
    statuses = sorted(status for _, _, status in run_rows(repo))
    assert statuses == ["pending", "skipped", "skipped", "skipped"]
