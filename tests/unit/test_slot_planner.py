"""Beat's planner: schedules parsed once per distinct schedule, plans as the pure core says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gathering_tasks.beat import SlotPlanner
from gathering_tasks.db.claims import DueAction
from gathering_tasks.schedules import CatchUpPolicy, Window, parse_schedule, plan_due

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CRON = {"kind": "cron", "expr": "*/5 * * * *", "timezone": "Europe/Paris"}


def due(action_id: int, schedule: dict[str, Any], next_run_at: datetime = T0) -> DueAction:
    return DueAction(
        id=action_id,
        schedule=schedule,
        next_run_at=next_run_at,
        run_count=0,
        start_at=None,
        end_at=None,
        max_runs=None,
        catchup_mode="all",
        catchup_grace_s=3600.0,
        catchup_max=100,
        overlap_policy="allow",
    )


def test_actions_with_the_same_schedule_share_one_parsed_schedule():
    planner = SlotPlanner(T0 + timedelta(minutes=12))
    # Given two actions with the same cron schedule (keys in another order) and one without
    first, second = due(1, CRON), due(2, dict(reversed(CRON.items())))
    other = due(3, {**CRON, "timezone": "UTC"})
    # Then the first two share their parsed schedule, the third has its own
    assert planner.schedule(first) is planner.schedule(second)
    assert planner.schedule(other) is not planner.schedule(first)


def test_an_interval_without_anchor_is_parsed_per_next_slot():
    # Given two anchorless intervals at different next slots (the anchor defaults to it)
    planner = SlotPlanner(T0)
    spec = {"kind": "interval", "every_s": 7}
    early, late = due(1, spec, T0), due(2, spec, T0 + timedelta(seconds=3))
    # Then each gets the schedule its own slot anchors
    assert planner.schedule(early) == parse_schedule(spec, now=T0)
    assert planner.schedule(late) == parse_schedule(spec, now=T0 + timedelta(seconds=3))


def test_plans_are_the_pure_planners_whatever_the_caching():
    now = T0 + timedelta(minutes=17)
    planner = SlotPlanner(now)
    for action_id in range(3):  # the second and third plans come from caches
        plan = planner(due(action_id, CRON))
        expected = plan_due(
            parse_schedule(CRON, now=T0),
            next_run_at=T0,
            now=now,
            policy=CatchUpPolicy(mode="all", grace_s=3600.0, max_catchup=100),
            window=Window(),
            run_count=0,
        )
        assert [slot for slot, _trigger in plan.run_slots] == list(expected.run_slots)
        assert plan.next_run_at == expected.next_run_at
