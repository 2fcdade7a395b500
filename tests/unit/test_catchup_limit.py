"""One catch-up limit: what an action may ask for is what the planner plans in one call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gathering_tasks.actions import validate_action
from gathering_tasks.errors import InvalidInput
from gathering_tasks.schedules import (
    MAX_CATCHUP_SLOTS,
    ON_TIME_S,
    CatchUpPolicy,
    IntervalSchedule,
    Window,
    plan_due,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def validate(**changes: Any) -> Any:
    data = {
        "name": "catch-up",
        "action_type": "run_task",
        "config": {"task": "demo.add"},
        "schedule": {"kind": "interval", "every_s": 1},
        "catchup_mode": "all",
        **changes,
    }
    spec, _schedule = validate_action(
        data, now=NOW, max_config_bytes=64 * 1024, task_allowed=lambda _name: True
    )
    return spec


def test_catchup_max_above_the_planner_limit_is_refused_naming_field_and_limit() -> None:
    # Given a catch-up cap one above what plan_due plans per call
    # When the action is validated
    with pytest.raises(InvalidInput) as caught:
        validate(catchup_max=MAX_CATCHUP_SLOTS + 1)

    # Then catchup_max is refused, and the message says what the limit is
    assert caught.value.field == "catchup_max"
    assert str(MAX_CATCHUP_SLOTS) in caught.value.reason


def test_catchup_max_at_the_limit_is_accepted_and_fully_planned() -> None:
    # Given an action accepted with the largest catch-up cap, missed for longer than that
    spec = validate(catchup_max=MAX_CATCHUP_SLOTS)
    schedule = IntervalSchedule(every_s=1, anchor=NOW - timedelta(hours=2))

    # When beat plans it with the planner's default limit
    plan = plan_due(
        schedule,
        next_run_at=schedule.anchor,
        now=NOW,
        policy=CatchUpPolicy(mode="all", grace_s=86_400, max_catchup=spec.catchup_max),
        window=Window(),
        run_count=0,
    )

    # Then every slot the cap promises is planned: none vanish between validation and plan
    assert MAX_CATCHUP_SLOTS == 1000
    assert len(plan.run_slots) == spec.catchup_max
    assert plan.run_slots[-1] == NOW


@pytest.mark.parametrize(("late_s", "runs"), [(ON_TIME_S, 1), (ON_TIME_S + 0.001, 0)])
def test_skip_mode_uses_the_shared_on_time_constant(late_s: float, runs: int) -> None:
    # Given a slot that beat reaches late_s seconds after it fell
    slot = NOW - timedelta(seconds=late_s)
    schedule = IntervalSchedule(every_s=3600, anchor=slot)

    # When planned in skip mode with the planner's default on-time window
    plan = plan_due(
        schedule,
        next_run_at=slot,
        now=NOW,
        policy=CatchUpPolicy(mode="skip"),
        window=Window(),
        run_count=0,
    )

    # Then it runs only if it is within ON_TIME_S
    assert len(plan.run_slots) == runs
    assert ON_TIME_S == 5.0
