"""Beat's claim: one run row per (action, slot), next_run_at advanced in the same commit."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from gathering_tasks.api import ActionService
from gathering_tasks.beat import SlotPlanner
from gathering_tasks.db.ledger import Dispatch
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


def claim(
    repo: Repository, now: datetime, *, limit: int = 100, budget: int = 10_000
) -> list[Dispatch]:
    """One claim transaction at ``now``: the records it created to publish."""
    return repo.claims.claim_due(
        now, limit=limit, slot_budget=budget, plan=SlotPlanner(now)
    ).dispatches


def run_rows(repo: Repository) -> list[tuple[int, datetime, str]]:
    factory = repo.factory
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
    first = claim(repo, now, limit=100)
    second = claim(repo, now, limit=100)
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
                claims = claim(repo, now, limit=7)
                with lock:
                    claimed.extend(c.record_id for c in claims)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(ms,)) for ms in (100, 300, 500, 700)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Then: every claimer finished without errors, every claimed run id is distinct, and
    # each action has one row per slot
    assert [t.name for t in threads if t.is_alive()] == []
    assert errors == []
    assert len(claimed) == len(set(claimed))
    rows = run_rows(repo)
    assert len(rows) == len(claimed)
    # And nothing is missing: every action has a run for EVERY slot from T0 to the last
    # instant claimed (T0 + 29.7 s), i.e. 30 slots each, none lost in the race
    expected = {T0 + timedelta(seconds=k) for k in range(30)}
    by_action: dict[int, set[datetime]] = {}
    for action_id, slot, _status in rows:
        by_action.setdefault(action_id, set()).add(slot)
    assert len(by_action) == 20
    missing = {a: sorted(expected - slots) for a, slots in by_action.items() if slots != expected}
    assert missing == {}


def test_paused_action_is_not_due_and_resume_skips_the_pause(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    svc.create(every_second("p"))
    svc.pause("p")
    later = T0 + timedelta(seconds=10)
    assert claim(repo, later, limit=10) == []
    service(repo, settings, now=later).resume("p")
    assert svc.get("p")["next_run_at"] == later.isoformat()
    claims = claim(repo, later, limit=10)
    assert len(claims) == 1


def test_overlap_skip_records_skipped_slot(repo: Repository, settings: Settings):
    # Given a run still pending from the previous slot
    svc = service(repo, settings)
    svc.create(every_second("o"))
    claim(repo, T0, limit=10)
    # When the next slot comes due
    now = T0 + timedelta(seconds=1)
    claims = claim(repo, now, limit=10)
    # Then it is recorded as skipped and not published
    assert claims == []
    statuses = sorted(status for _, _, status in run_rows(repo))
    assert statuses == ["pending", "skipped"]


def test_max_runs_completes_the_action(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    svc.create(every_second("m", max_runs=2, overlap_policy="allow"))
    for step in range(5):
        now = T0 + timedelta(seconds=step)
        claim(repo, now, limit=10)
    assert svc.get("m")["status"] == "completed"
    assert len(run_rows(repo)) == 2


def test_due_query_uses_index_and_batches(repo: Repository, settings: Settings):
    svc = service(repo, settings)
    for i in range(25):
        svc.create(every_second(f"b{i}", overlap_policy="allow"))
    now = T0
    first = claim(repo, now, limit=10)
    assert len(first) == 10
    assert repo.claims.next_due_at() == T0
    with repo.factory() as session:
        count = session.execute(select(func.count()).select_from(ScheduledActionRun)).scalar()
    assert count == 10


def test_an_unparseable_schedule_disables_only_its_action(repo: Repository, settings: Settings):
    # Given two due actions, one of whose stored schedule no longer parses
    svc = service(repo, settings)
    svc.create(every_second("good", overlap_policy="allow"))
    svc.create(every_second("broken"))
    with repo.factory() as session, session.begin():
        session.execute(
            update(ScheduledAction)
            .where(ScheduledAction.name == "broken")
            .values(schedule={"kind": "cron", "expr": "0 3 * * *", "timezone": "Gone/Away"})
        )
    # When beat claims
    claims = claim(repo, T0, limit=10)
    # Then the good action still runs and the broken one is disabled, not lost
    assert len(claims) == 1
    assert svc.get("good")["status"] == "active"
    assert svc.get("broken")["status"] == "disabled"


def test_skipped_slots_do_not_use_up_max_runs(repo: Repository, settings: Settings):
    # Given max_runs=3 and overlap skip, with the first run still pending
    svc = service(repo, settings)
    svc.create(every_second("budget", max_runs=3))
    claim(repo, T0, limit=10)
    for step in (1, 2, 3):
        now = T0 + timedelta(seconds=step)
        claim(repo, now, limit=10)
    # Then the three skipped slots did not complete the action
    action = svc.get("budget")
    assert action["run_count"] == 1 and action["status"] == "active"
    statuses = sorted(status for _, _, status in run_rows(repo))
    assert statuses == ["pending", "skipped", "skipped", "skipped"]


def test_run_count_counts_only_the_records_the_database_accepted(
    repo: Repository, settings: Settings
):
    # Given an action whose T0 slot was claimed, and whose next slot was then moved back
    # onto that same slot (an operator edit racing a claim)
    svc = service(repo, settings)
    svc.create(every_second("again", overlap_policy="allow"))
    claim(repo, T0)
    repo.actions.set_next_run("again", T0, now=T0)
    # When beat claims the slot a second time
    replay = claim(repo, T0)
    # Then no second record exists and run_count still counts one run
    assert replay == []
    assert len(run_rows(repo)) == 1
    assert svc.get("again")["run_count"] == 1


def test_catch_up_is_claimed_in_bounded_transactions_and_skips_are_counted(
    repo: Repository, settings: Settings, caplog
):
    # Given 5 one-second actions (catch-up all, cap 100) that missed 200 s of slots
    svc = service(repo, settings)
    for i in range(5):
        svc.create(
            every_second(
                f"c{i}",
                catchup_mode="all",
                catchup_max=100,
                catchup_grace_s=3600,
                overlap_policy="allow",
            )
        )
    now = T0 + timedelta(seconds=200)
    # When beat claims with a budget of 120 slots per transaction, until nothing is due
    sizes: list[int] = []
    with caplog.at_level("WARNING", logger="gathering_tasks.db.claims"):
        while True:
            batch = repo.claims.claim_due(now, limit=100, slot_budget=120, plan=SlotPlanner(now))
            if not batch.actions:
                break
            sizes.append(len(batch.dispatches))
    # Then each transaction held at most the budget (one action's 100 slots each)
    assert sizes == [100] * 5
    # And the cap was honoured: the 100 most recent slots of each action ran
    rows = run_rows(repo)
    assert len(rows) == 500
    assert min(slot for _, slot, _ in rows) == T0 + timedelta(seconds=101)
    # And what the policy skipped is recorded, per action, and said in the log
    skipped = [svc.get(f"c{i}")["skipped_slots"] for i in range(5)]
    assert skipped == [101] * 5
    assert sum("101 due slot(s) not run" in r.getMessage() for r in caplog.records) == 5


def test_once_action_whose_only_slot_was_skipped_for_overlap_expires(
    repo: Repository, settings: Settings
):
    # Given a one-shot action at T0 + 5 s, and a manual run of it still unfinished
    svc = service(repo, settings)
    at = T0 + timedelta(seconds=5)
    svc.create(
        {
            "name": "once",
            "action_type": "run_task",
            "config": {"task": "demo.add", "args": [1, 2]},
            "schedule": {"kind": "once", "at": at.isoformat()},
        }
    )
    svc.trigger("once")
    # When its only slot comes due while that run is still pending
    assert claim(repo, at) == []
    # Then the slot is recorded skipped, and the action expired: it never ran a slot
    action = svc.get("once")
    assert (action["status"], action["run_count"]) == ("expired", 0)
    assert sorted(status for _, _, status in run_rows(repo)) == ["pending", "skipped"]
