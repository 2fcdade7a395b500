"""Unit tests for the pure schedule arithmetic in :mod:`gathering_tasks.schedules`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gathering_tasks.errors import InvalidInput
from gathering_tasks.schedules import (
    CatchUpMode,
    CatchUpPolicy,
    CronSchedule,
    DuePlan,
    IntervalSchedule,
    OnceSchedule,
    Schedule,
    Window,
    first_slot,
    next_slot,
    parse_schedule,
    plan_due,
    schedule_to_spec,
    slots_between,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def local_day(zone: ZoneInfo, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """The UTC bounds of one local calendar day, whatever its length."""
    start = datetime(year, month, day, tzinfo=zone).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=zone) + timedelta(days=1)).astimezone(UTC)
    return start, end - timedelta(microseconds=1)


def plan(
    schedule: Schedule,
    *,
    next_run_at: datetime,
    now: datetime,
    mode: CatchUpMode = "latest",
    grace_s: float = 3600.0,
    max_catchup: int = 100,
    window: Window | None = None,
    run_count: int = 0,
    limit: int = 1000,
) -> DuePlan:
    return plan_due(
        schedule,
        next_run_at=next_run_at,
        now=now,
        policy=CatchUpPolicy(mode=mode, grace_s=grace_s, max_catchup=max_catchup),
        window=window or Window(),
        run_count=run_count,
        limit=limit,
    )


EVERY_MINUTE = IntervalSchedule(every_s=60, anchor=utc(2026, 1, 1))


# --------------------------------------------------------------------------------------------
# Cron in UTC and in a zone


def test_cron_every_five_minutes_in_utc_gives_the_next_multiple_of_five() -> None:
    # Given a */5 cron in UTC
    schedule = CronSchedule("*/5 * * * *")
    # When / Then: the next slot is strictly after `after`, the first slot may equal it
    assert next_slot(schedule, utc(2026, 1, 1, 0, 3)) == utc(2026, 1, 1, 0, 5)
    assert next_slot(schedule, utc(2026, 1, 1, 0, 5)) == utc(2026, 1, 1, 0, 10)
    assert first_slot(schedule, not_before=utc(2026, 1, 1, 0, 5)) == utc(2026, 1, 1, 0, 5)
    assert first_slot(schedule, not_before=utc(2026, 1, 1, 0, 5, 0, 1)) == utc(2026, 1, 1, 0, 10)
    hour = slots_between(schedule, utc(2026, 1, 1, 0), utc(2026, 1, 1, 1), limit=100)
    assert len(hour) == 13
    assert hour[0] == utc(2026, 1, 1, 0) and hour[-1] == utc(2026, 1, 1, 1)


def test_slots_between_returns_the_earliest_slots_up_to_the_limit() -> None:
    # Given a minutely cron and a day-long range
    schedule = CronSchedule("* * * * *")
    # When asking for at most 3
    slots = slots_between(schedule, utc(2026, 1, 1), utc(2026, 1, 2), limit=3)
    # Then the first three come back, ascending
    assert slots == [utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 2)]
    assert slots_between(schedule, utc(2026, 1, 2), utc(2026, 1, 1), limit=3) == []


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        # Winter: Paris is UTC+1, 09:00 local is 08:00 UTC.
        (utc(2026, 1, 15, 12), utc(2026, 1, 16, 8)),
        # Summer: Paris is UTC+2, 09:00 local is 07:00 UTC.
        (utc(2026, 7, 15, 12), utc(2026, 7, 16, 7)),
        (utc(2026, 7, 15, 6, 59), utc(2026, 7, 15, 7)),
    ],
)
def test_cron_in_europe_paris_runs_at_local_wall_time(after: datetime, expected: datetime) -> None:
    # Given a daily 09:00 cron in Europe/Paris
    schedule = CronSchedule("0 9 * * *", timezone="Europe/Paris")
    # When / Then the next slot is 09:00 Paris time, returned in UTC
    slot = next_slot(schedule, after)
    assert slot == expected
    assert slot is not None and slot.tzinfo is UTC


def test_cron_accepts_aliases_and_month_and_day_names() -> None:
    # Given names containing the letters R and H, which croniter also uses as random/hash tokens
    for expr in ("@daily", "0 9 * MAR THU", "0 9 * * MON-FRI", "0 0 L * *"):
        # When / Then they parse and produce a slot
        assert next_slot(CronSchedule(expr), NOW) is not None


# --------------------------------------------------------------------------------------------
# Cron across daylight-saving transitions


@pytest.mark.parametrize(
    ("zone", "expr", "day", "expected"),
    [
        # New York 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC); 02:30 does not exist.
        (NEW_YORK, "30 2 * * *", (2026, 3, 8), utc(2026, 3, 8, 7, 0)),
        # Berlin 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
        (BERLIN, "30 2 * * *", (2026, 3, 29), utc(2026, 3, 29, 1, 0)),
        # New York 2026-11-01: 01:30 happens at 05:30 UTC (EDT) and again at 06:30 UTC (EST).
        (NEW_YORK, "30 1 * * *", (2026, 11, 1), utc(2026, 11, 1, 5, 30)),
        # Berlin 2026-10-25: 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
        (BERLIN, "30 2 * * *", (2026, 10, 25), utc(2026, 10, 25, 0, 30)),
    ],
    ids=["new-york-spring", "berlin-spring", "new-york-fall", "berlin-fall"],
)
def test_daily_cron_runs_exactly_once_on_a_dst_transition_day(
    zone: ZoneInfo, expr: str, day: tuple[int, int, int], expected: datetime
) -> None:
    # Given a daily job whose wall time is skipped or repeated on that day
    schedule = CronSchedule(expr, timezone=str(zone))
    start, end = local_day(zone, *day)
    # When listing that local day's slots
    slots = slots_between(schedule, start, end, limit=10)
    # Then it runs once: at the jump for a gap, at the first occurrence for a fold
    assert slots == [expected]
    # And walking slot by slot agrees (no second occurrence hides behind next_slot)
    assert next_slot(schedule, start - timedelta(microseconds=1)) == expected
    following = next_slot(schedule, expected)
    assert following is not None and following > end


def test_daily_cron_is_not_run_again_when_beat_is_inside_the_repeated_hour() -> None:
    # Given the New York fall-back day and beat asking between the two 01:30s
    schedule = CronSchedule("30 1 * * *", timezone="America/New_York")
    # When asking for the next slot from 01:00 EST (06:00 UTC, the second pass)
    slot = next_slot(schedule, utc(2026, 11, 1, 6, 0))
    # Then the second 01:30 is not a slot; the next one is tomorrow's 01:30 EST
    assert slot == utc(2026, 11, 2, 6, 30)


def test_hourly_cron_across_fall_back_gives_strictly_increasing_utc_slots() -> None:
    # Given an hourly job in New York on the fall-back night
    schedule = CronSchedule("0 * * * *", timezone="America/New_York")
    # When listing 03:00..09:00 UTC (23:00 EDT .. 04:00 EST)
    slots = slots_between(schedule, utc(2026, 11, 1, 3), utc(2026, 11, 1, 9), limit=100)
    # Then every wall hour runs once: 01:00 runs as EDT (05:00 UTC) only, not again as EST
    assert slots == [utc(2026, 11, 1, hour) for hour in (3, 4, 5, 7, 8, 9)]
    assert all(a < b for a, b in pairwise(slots))


def test_half_hourly_cron_across_spring_forward_runs_the_missing_hour_once() -> None:
    # Given a */30 job in New York on the spring-forward night
    schedule = CronSchedule("*/30 * * * *", timezone="America/New_York")
    # When listing 05:00..08:00 UTC (00:00 EST .. 04:00 EDT)
    slots = slots_between(schedule, utc(2026, 3, 8, 5), utc(2026, 3, 8, 8), limit=100)
    # Then 02:00 and 02:30 (missing) and 03:00 EDT collapse into one slot at the jump
    expected = [utc(2026, 3, 8, 5), utc(2026, 3, 8, 5, 30), utc(2026, 3, 8, 6)]
    expected += [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 30)]
    assert slots == [*expected, utc(2026, 3, 8, 8)]


def test_cron_in_the_second_pass_of_a_fold_skips_to_after_the_fold() -> None:
    # Given */30 in New York and `after` at 01:15 EST, the repeated hour's second pass
    schedule = CronSchedule("*/30 * * * *", timezone="America/New_York")
    # When / Then the next slot is 02:00 EST, not the repeated 01:30
    assert next_slot(schedule, utc(2026, 11, 1, 6, 15)) == utc(2026, 11, 1, 7)
    # And in the first pass the next slot is the first 01:30
    assert next_slot(schedule, utc(2026, 11, 1, 5, 15)) == utc(2026, 11, 1, 5, 30)


@pytest.mark.parametrize(
    ("expr", "timezone", "start"),
    [
        ("*/30 * * * *", "America/New_York", utc(2026, 3, 7)),
        ("*/30 * * * *", "America/New_York", utc(2026, 10, 31)),
        ("*/7 * * * *", "Europe/Berlin", utc(2026, 3, 28)),
        ("*/7 * * * *", "Europe/Berlin", utc(2026, 10, 24)),
        # Lord Howe shifts by 30 minutes, not an hour.
        ("0,30 * * * *", "Australia/Lord_Howe", utc(2026, 4, 4)),
        ("0,30 * * * *", "Australia/Lord_Howe", utc(2026, 10, 3)),
    ],
)
def test_cron_slots_are_strictly_increasing_and_each_wall_time_runs_once(
    expr: str, timezone: str, start: datetime
) -> None:
    # Given a frequent cron over three days that contain a DST transition
    schedule = CronSchedule(expr, timezone=timezone)
    end = start + timedelta(days=3)
    # When listing the slots at once and walking them one next_slot at a time
    listed = slots_between(schedule, start, end, limit=10_000)
    walked: list[datetime] = []
    cursor = start - timedelta(microseconds=1)
    while (slot := next_slot(schedule, cursor)) is not None and slot <= end:
        walked.append(slot)
        cursor = slot
    # Then both agree, are strictly increasing, and no local wall time repeats
    assert listed == walked
    assert all(a < b for a, b in pairwise(listed))
    walls = [slot.astimezone(ZoneInfo(timezone)).replace(tzinfo=None) for slot in listed]
    assert len(set(walls)) == len(walls)


def test_plan_due_on_a_spring_forward_day_runs_the_skipped_slot_once() -> None:
    # Given a daily 02:30 New York job whose stored slot is the jump instant
    schedule = CronSchedule("30 2 * * *", timezone="America/New_York")
    # When beat plans one second later
    due = plan(schedule, next_run_at=utc(2026, 3, 8, 7), now=utc(2026, 3, 8, 7, 0, 1))
    # Then that slot runs and the next is 02:30 EDT the following day
    assert due.run_slots == (utc(2026, 3, 8, 7),)
    assert due.next_run_at == utc(2026, 3, 9, 6, 30)


# --------------------------------------------------------------------------------------------
# Intervals and once


def test_interval_slots_are_anchor_plus_multiples_without_drift() -> None:
    # Given a 30 s interval anchored on a whole minute
    anchor = utc(2026, 1, 1)
    schedule = IntervalSchedule(every_s=30, anchor=anchor)
    # When asking from mid-interval, or before the anchor
    # Then the slot is still on the anchor's grid
    assert next_slot(schedule, anchor + timedelta(seconds=45.5)) == anchor + timedelta(seconds=60)
    assert next_slot(schedule, anchor + timedelta(seconds=60)) == anchor + timedelta(seconds=90)
    assert next_slot(schedule, anchor - timedelta(days=3)) == anchor
    assert first_slot(schedule, not_before=anchor) == anchor


def test_fractional_interval_does_not_accumulate_float_error() -> None:
    # Given a 0.1 s interval, which is not exact in binary floating point
    anchor = utc(2026, 1, 1)
    schedule = IntervalSchedule(every_s=0.1, anchor=anchor)
    # When asking for the slot after a million steps
    slot = next_slot(schedule, anchor + timedelta(seconds=100_000) - timedelta(microseconds=1))
    # Then it is exactly on the grid
    assert slot == anchor + timedelta(seconds=100_000)


def test_once_has_a_slot_only_until_it_passes() -> None:
    # Given a once schedule
    schedule = OnceSchedule(at=utc(2026, 6, 1, 9))
    # When / Then it is next before it happens, and nothing is next after
    assert next_slot(schedule, utc(2026, 6, 1, 8)) == utc(2026, 6, 1, 9)
    assert next_slot(schedule, utc(2026, 6, 1, 9)) is None
    assert first_slot(schedule, not_before=utc(2026, 6, 1, 9)) == utc(2026, 6, 1, 9)


def test_once_in_the_future_plans_nothing_yet() -> None:
    # Given a once schedule not yet due
    schedule = OnceSchedule(at=NOW + timedelta(hours=1))
    # When beat plans early
    due = plan(schedule, next_run_at=schedule.at, now=NOW)
    # Then nothing runs and the slot stays next
    assert due == DuePlan(run_slots=(), skipped_slots=0, next_run_at=schedule.at, finished=None)


def test_once_that_fires_is_completed() -> None:
    # Given a once schedule that just became due
    schedule = OnceSchedule(at=NOW)
    # When beat plans
    due = plan(schedule, next_run_at=NOW, now=NOW + timedelta(seconds=1))
    # Then it runs and the action is completed
    assert due == DuePlan(run_slots=(NOW,), skipped_slots=0, next_run_at=None, finished="completed")


def test_once_missed_beyond_grace_is_expired_without_running() -> None:
    # Given a once schedule beat reaches two hours late with a one-hour grace
    schedule = OnceSchedule(at=NOW - timedelta(hours=2))
    # When beat plans
    due = plan(schedule, next_run_at=schedule.at, now=NOW, mode="all")
    # Then it does not run and the action expires
    assert due == DuePlan(run_slots=(), skipped_slots=1, next_run_at=None, finished="expired")


# --------------------------------------------------------------------------------------------
# Catch-up policies


def test_skip_runs_the_current_slot_when_on_time() -> None:
    # Given a minutely interval whose last four slots were missed, now 2 s after the current one
    due = plan(
        EVERY_MINUTE,
        next_run_at=NOW - timedelta(minutes=4),
        now=NOW + timedelta(seconds=2),
        mode="skip",
    )
    # Then only the current slot runs and the four missed ones are skipped
    assert due.run_slots == (NOW,)
    assert due.skipped_slots == 4
    assert due.next_run_at == NOW + timedelta(minutes=1)


def test_skip_runs_nothing_when_the_current_slot_is_late() -> None:
    # Given beat 30 s late for the current slot (more than on_time_s = 5 s)
    due = plan(EVERY_MINUTE, next_run_at=NOW, now=NOW + timedelta(seconds=30), mode="skip")
    # Then nothing runs
    assert due.run_slots == ()
    assert due.skipped_slots == 1
    assert due.next_run_at == NOW + timedelta(minutes=1)


def test_latest_runs_only_the_most_recent_missed_slot() -> None:
    # Given five due slots, the latest 30 s old
    due = plan(
        EVERY_MINUTE, next_run_at=NOW - timedelta(minutes=4), now=NOW + timedelta(seconds=30)
    )
    # Then the latest runs once and the other four are skipped
    assert due.run_slots == (NOW,)
    assert due.skipped_slots == 4


def test_latest_runs_nothing_when_even_the_latest_is_beyond_grace() -> None:
    # Given a daily job whose only due slot is 2 h old, with a 1 h grace
    schedule = CronSchedule("0 10 * * *")
    due = plan(schedule, next_run_at=utc(2026, 6, 1, 10), now=NOW)
    # Then nothing runs and the next slot is tomorrow
    assert due.run_slots == ()
    assert due.skipped_slots == 1
    assert due.next_run_at == utc(2026, 6, 2, 10)


def test_all_runs_every_missed_slot_within_grace_oldest_first() -> None:
    # Given five due slots, all within grace
    due = plan(
        EVERY_MINUTE,
        next_run_at=NOW - timedelta(minutes=4),
        now=NOW + timedelta(seconds=1),
        mode="all",
    )
    # Then all five run, ascending
    assert due.run_slots == tuple(NOW - timedelta(minutes=m) for m in (4, 3, 2, 1, 0))
    assert due.skipped_slots == 0


def test_all_keeps_the_most_recent_slots_when_capped() -> None:
    # Given five due slots and max_catchup = 3
    due = plan(
        EVERY_MINUTE,
        next_run_at=NOW - timedelta(minutes=4),
        now=NOW,
        mode="all",
        max_catchup=3,
    )
    # Then the three most recent run and the two oldest are skipped
    assert due.run_slots == tuple(NOW - timedelta(minutes=m) for m in (2, 1, 0))
    assert due.skipped_slots == 2


def test_all_drops_slots_older_than_grace() -> None:
    # Given ten due slots and a grace of 150 s
    due = plan(
        EVERY_MINUTE, next_run_at=NOW - timedelta(minutes=9), now=NOW, mode="all", grace_s=150
    )
    # Then only the slots at most 150 s old run
    assert due.run_slots == tuple(NOW - timedelta(minutes=m) for m in (2, 1, 0))
    assert due.skipped_slots == 7


def test_cron_catch_up_all_runs_missed_cron_slots() -> None:
    # Given a */5 cron missed for 20 minutes
    schedule = CronSchedule("*/5 * * * *")
    due = plan(schedule, next_run_at=NOW - timedelta(minutes=20), now=NOW, mode="all")
    # Then the five due slots run in order
    assert due.run_slots == tuple(NOW - timedelta(minutes=m) for m in (20, 15, 10, 5, 0))
    assert due.skipped_slots == 0
    assert due.next_run_at == NOW + timedelta(minutes=5)


# --------------------------------------------------------------------------------------------
# Bounded work after a long outage


@pytest.mark.parametrize("mode", ["skip", "latest", "all"])
def test_one_second_interval_missed_for_a_year_is_planned_by_arithmetic(
    mode: CatchUpMode,
) -> None:
    # Given a 1 s interval whose beat was down for a year
    anchor = utc(2025, 6, 1, 12)
    schedule = IntervalSchedule(every_s=1, anchor=anchor)
    year_of_slots = 365 * 86_400 + 1
    # When beat plans (grace covers the whole year, so only the cap limits `all`)
    due = plan(
        schedule, next_run_at=anchor, now=NOW, mode=mode, grace_s=400 * 86_400, max_catchup=100
    )
    # Then the counts are exact, the run list is capped, and next moves past now
    expected_runs = 100 if mode == "all" else 1
    assert len(due.run_slots) == expected_runs
    assert due.run_slots[-1] == NOW
    assert due.skipped_slots == year_of_slots - expected_runs
    assert not due.skipped_capped
    assert due.next_run_at == NOW + timedelta(seconds=1)


def test_minutely_cron_missed_for_a_year_counts_up_to_the_limit() -> None:
    # Given a minutely cron whose beat was down for a year
    schedule = CronSchedule("* * * * *")
    # When beat plans with a small work limit
    due = plan(schedule, next_run_at=NOW - timedelta(days=365), now=NOW, mode="all", limit=50)
    # Then the most recent slots run (bounded by the limit) and the skip count is a lower bound
    assert len(due.run_slots) == 50
    assert due.run_slots[-1] == NOW
    # And the older missed slots are counted only up to the limit, flagged as a lower bound
    assert due.skipped_capped
    assert due.skipped_slots == 50
    assert due.next_run_at == NOW + timedelta(minutes=1)


# --------------------------------------------------------------------------------------------
# Windows


def test_start_window_skips_slots_before_start() -> None:
    # Given a window that opens in 10 minutes
    start_at = NOW + timedelta(minutes=10, seconds=30)
    window = Window(start_at=start_at)
    # When beat plans now
    due = plan(EVERY_MINUTE, next_run_at=NOW, now=NOW, window=window)
    # Then nothing runs and the next slot is the first one inside the window
    assert due.run_slots == ()
    assert due.next_run_at == NOW + timedelta(minutes=11)
    assert first_slot(EVERY_MINUTE, not_before=start_at) == NOW + timedelta(minutes=11)


def test_start_window_excludes_due_slots_before_it() -> None:
    # Given three due slots, the first of which is before the window opens
    window = Window(start_at=NOW - timedelta(minutes=1))
    due = plan(
        EVERY_MINUTE, next_run_at=NOW - timedelta(minutes=2), now=NOW, window=window, mode="all"
    )
    # Then only the slots inside the window run
    assert due.run_slots == (NOW - timedelta(minutes=1), NOW)
    assert due.skipped_slots == 0


def test_end_window_expires_the_action_after_its_last_slot() -> None:
    # Given a window that closes 30 s after the current slot
    window = Window(end_at=NOW + timedelta(seconds=30))
    # When beat plans the current slot
    due = plan(EVERY_MINUTE, next_run_at=NOW, now=NOW + timedelta(seconds=1), window=window)
    # Then it runs, and the action expires because the next slot is outside the window
    assert due == DuePlan(run_slots=(NOW,), skipped_slots=0, next_run_at=None, finished="expired")


def test_end_window_already_passed_runs_nothing_after_it() -> None:
    # Given a window that closed 90 s ago and a beat that was down
    window = Window(end_at=NOW - timedelta(seconds=90))
    due = plan(
        EVERY_MINUTE, next_run_at=NOW - timedelta(minutes=5), now=NOW, window=window, mode="all"
    )
    # Then only slots up to end_at run, and the action expires
    assert due.run_slots == tuple(NOW - timedelta(minutes=m) for m in (5, 4, 3, 2))
    assert due.finished == "expired"
    assert due.next_run_at is None


def test_max_runs_completes_the_action_keeping_the_earliest_slots() -> None:
    # Given an action that ran twice out of three, with five slots due
    window = Window(max_runs=3)
    due = plan(
        EVERY_MINUTE,
        next_run_at=NOW - timedelta(minutes=4),
        now=NOW,
        window=window,
        run_count=2,
        mode="all",
    )
    # Then one more runs (the earliest of the selected slots) and the action is completed
    assert due.run_slots == (NOW - timedelta(minutes=4),)
    assert due.skipped_slots == 4
    assert due.finished == "completed"
    assert due.next_run_at is None


def test_max_runs_already_reached_runs_nothing() -> None:
    # Given an action that has already run its maximum
    due = plan(EVERY_MINUTE, next_run_at=NOW, now=NOW, window=Window(max_runs=1), run_count=1)
    # Then nothing runs and it is completed
    assert due.run_slots == ()
    assert due.finished == "completed"


# --------------------------------------------------------------------------------------------
# Beat invariants


SCHEDULES: list[Schedule] = [
    EVERY_MINUTE,
    IntervalSchedule(every_s=7.5, anchor=utc(2026, 5, 31, 23, 59, 59)),
    CronSchedule("*/5 * * * *"),
    CronSchedule("*/30 * * * *", timezone="America/New_York"),
    OnceSchedule(at=NOW + timedelta(minutes=3)),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("mode", ["skip", "latest", "all"])
@pytest.mark.parametrize("lag_s", [0, 1, 59, 3_599, 86_400])
def test_next_run_at_always_moves_past_now(
    schedule: Schedule, mode: CatchUpMode, lag_s: int
) -> None:
    # Given beat planning an action whose stored slot is lag_s old
    now = NOW + timedelta(seconds=lag_s)
    # When it plans
    due = plan(schedule, next_run_at=NOW, now=now, mode=mode)
    # Then the next slot is strictly after now (or there is none), and runs are in the past
    assert due.next_run_at is None or due.next_run_at > now
    assert all(NOW <= slot <= now for slot in due.run_slots)
    assert list(due.run_slots) == sorted(set(due.run_slots))
    assert (due.next_run_at is None) == (due.finished is not None)


@pytest.mark.parametrize(
    "schedule",
    [
        CronSchedule("*/30 * * * *", timezone="America/New_York"),
        CronSchedule("30 1 * * *", timezone="America/New_York"),
        IntervalSchedule(every_s=1_234, anchor=utc(2026, 10, 31)),
    ],
    ids=["half-hourly", "daily-0130", "interval"],
)
def test_a_beat_loop_across_fall_back_never_runs_a_slot_twice(schedule: Schedule) -> None:
    # Given beat ticking irregularly through the New York fall-back night
    now = utc(2026, 10, 31, 20)
    stored = first_slot(schedule, not_before=now)
    ran: list[datetime] = []
    ticks = [7, 61, 300, 13, 1_800, 2, 3_700]
    step = 0
    # When it plans every time the stored slot is due
    while stored is not None and now < utc(2026, 11, 2, 12):
        now += timedelta(seconds=ticks[step % len(ticks)])
        step += 1
        if stored <= now:
            due = plan(schedule, next_run_at=stored, now=now, mode="all", grace_s=86_400)
            ran.extend(due.run_slots)
            assert due.next_run_at is not None and due.next_run_at > now
            stored = due.next_run_at
    # Then every slot of the period ran exactly once, in order
    assert ran == slots_between(schedule, ran[0], ran[-1], limit=10_000)
    assert all(a < b for a, b in pairwise(ran))


def test_plan_due_is_deterministic() -> None:
    # Given the same inputs twice
    schedule = CronSchedule("*/5 * * * *", timezone="Europe/Berlin")
    args: dict[str, Any] = {"next_run_at": NOW - timedelta(hours=3), "now": NOW, "mode": "all"}
    # Then the plans are equal
    assert plan(schedule, **args) == plan(schedule, **args)


# --------------------------------------------------------------------------------------------
# Parsing and round trips


@pytest.mark.parametrize(
    "spec",
    [
        {"kind": "cron", "expr": "*/5 * * * *", "timezone": "Europe/Paris"},
        {"kind": "cron", "expr": "0 9 * * MON-FRI"},
        {"kind": "interval", "every_s": 30, "anchor": "2026-01-01T00:00:00Z"},
        {"kind": "interval", "every_s": 0.5, "anchor": datetime(2026, 1, 1, 1, tzinfo=BERLIN)},
        {"kind": "once", "at": "2026-06-01T09:00:00+02:00"},
    ],
)
def test_schedule_round_trips_through_its_json_spec(spec: dict[str, Any]) -> None:
    # Given a parsed schedule
    schedule = parse_schedule(spec, now=NOW)
    # When it is serialised to JSON and parsed back
    text = json.dumps(schedule_to_spec(schedule))
    # Then it is the same schedule
    assert parse_schedule(json.loads(text), now=NOW + timedelta(days=1)) == schedule


def test_parse_normalises_to_utc_and_defaults() -> None:
    # Given specs relying on defaults and local offsets
    cron = parse_schedule({"kind": "cron", "expr": " */5  *  * * * "}, now=NOW)
    interval = parse_schedule(
        {"kind": "interval", "every_s": 30}, now=NOW + timedelta(microseconds=123_456)
    )
    once = parse_schedule({"kind": "once", "at": "2026-06-01T09:00:00+02:00"}, now=NOW)
    # Then the zone defaults to UTC, the anchor to now rounded up to the second, times are UTC
    assert cron == CronSchedule("*/5 * * * *", timezone="UTC")
    assert interval == IntervalSchedule(every_s=30.0, anchor=NOW + timedelta(seconds=1))
    on_the_second = parse_schedule({"kind": "interval", "every_s": 30}, now=NOW)
    assert on_the_second == IntervalSchedule(every_s=30.0, anchor=NOW)
    assert isinstance(once, OnceSchedule) and once.at == utc(2026, 6, 1, 7)
    assert once.at.tzinfo is UTC


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "cron", "expr": "61 * * * *"}, "schedule.expr"),
        ({"kind": "cron", "expr": "* * *"}, "schedule.expr"),
        ({"kind": "cron", "expr": "0 0 * * * 30"}, "schedule.expr"),
        ({"kind": "cron", "expr": "0 0 30 2 *"}, "schedule.expr"),
        ({"kind": "cron", "expr": "R * * * *"}, "schedule.expr"),
        ({"kind": "cron", "expr": "H * * * *"}, "schedule.expr"),
        ({"kind": "cron", "expr": 5}, "schedule.expr"),
        ({"kind": "cron"}, "schedule.expr"),
        ({"kind": "cron", "expr": "* * * * *", "timezone": "Mars/Olympus"}, "schedule.timezone"),
        ({"kind": "cron", "expr": "* * * * *", "timezone": "localtime"}, "schedule.timezone"),
        ({"kind": "cron", "expr": "* * * * *", "timezone": "../etc/passwd"}, "schedule.timezone"),
        ({"kind": "cron", "expr": "* * * * *", "every_s": 5}, "schedule.every_s"),
        ({"kind": "interval", "every_s": 0}, "schedule.every_s"),
        ({"kind": "interval", "every_s": -5}, "schedule.every_s"),
        ({"kind": "interval", "every_s": float("nan")}, "schedule.every_s"),
        ({"kind": "interval", "every_s": "30"}, "schedule.every_s"),
        ({"kind": "interval", "every_s": True}, "schedule.every_s"),
        ({"kind": "interval", "every_s": 30, "anchor": "2026-01-01T00:00:00"}, "schedule.anchor"),
        ({"kind": "interval", "every_s": 30, "anchor": "yesterday"}, "schedule.anchor"),
        ({"kind": "once", "at": "2026-06-01T09:00:00"}, "schedule.at"),
        ({"kind": "once", "at": datetime(2026, 6, 1, 9)}, "schedule.at"),
        ({"kind": "once"}, "schedule.at"),
        ({"kind": "weekly"}, "schedule.kind"),
        ({"expr": "* * * * *"}, "schedule.kind"),
    ],
)
def test_invalid_spec_raises_invalid_input_naming_the_field(
    spec: dict[str, Any], field: str
) -> None:
    # Given an invalid spec
    # When it is parsed
    with pytest.raises(InvalidInput) as caught:
        parse_schedule(spec, now=NOW)
    # Then the error names the field in a one-line message
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert "\n" not in str(caught.value)


def test_six_field_cron_is_rejected_with_a_hint_about_seconds() -> None:
    with pytest.raises(InvalidInput, match="seconds and year fields are not supported"):
        CronSchedule("0 0 * * * 30")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: next_slot(EVERY_MINUTE, datetime(2026, 1, 1)), "after"),
        (lambda: first_slot(EVERY_MINUTE, not_before=datetime(2026, 1, 1)), "not_before"),
        (lambda: slots_between(EVERY_MINUTE, datetime(2026, 1, 1), NOW, limit=1), "start"),
        (lambda: plan(EVERY_MINUTE, next_run_at=NOW, now=datetime(2026, 1, 1)), "now"),
        (lambda: plan(EVERY_MINUTE, next_run_at=datetime(2026, 1, 1), now=NOW), "next_run_at"),
        (lambda: plan(EVERY_MINUTE, next_run_at=NOW, now=NOW, limit=0), "limit"),
        (
            lambda: parse_schedule({"kind": "interval", "every_s": 1}, now=datetime(2026, 1, 1)),
            "now",
        ),
        (lambda: IntervalSchedule(every_s=1, anchor=datetime(2026, 1, 1)), "schedule.anchor"),
        (lambda: CatchUpPolicy(mode="sometimes"), "catch_up.mode"),  # type: ignore[arg-type]
        (lambda: CatchUpPolicy(grace_s=-1), "catch_up.grace_s"),
        (lambda: CatchUpPolicy(max_catchup=0), "catch_up.max_catchup"),
        (lambda: Window(start_at=NOW, end_at=NOW - timedelta(seconds=1)), "window.end_at"),
        (lambda: Window(start_at=datetime(2026, 1, 1)), "window.start_at"),
        (lambda: Window(max_runs=0), "window.max_runs"),
    ],
)
def test_invalid_arguments_raise_invalid_input_naming_the_field(call: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        call()
    assert caught.value.field == field
