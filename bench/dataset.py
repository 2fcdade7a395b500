"""The benchmark's scheduled actions: their rows, and the slots that make them due.

Standard library only, like ``bench.measure``, so the measuring subprocesses can share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

# Every schedule below has a slot on each 10-minute UTC boundary (Paris is a whole number of
# hours from UTC): the loader puts every action on a real future slot, and any action is made
# due by setting its next_run_at to the last boundary.
ANCHOR = "2026-01-01T00:00:00+00:00"
SCHEDULES = (
    {"kind": "interval", "every_s": 60, "anchor": ANCHOR},
    {"kind": "cron", "expr": "*/5 * * * *", "timezone": "Europe/Paris"},
    {"kind": "interval", "every_s": 300, "anchor": ANCHOR},
    {"kind": "cron", "expr": "*/10 * * * *", "timezone": "UTC"},
)
SLOT_GRID = timedelta(minutes=10)
ACTION_CONFIG = json.dumps({"task": "demo.add", "args": [1, 2]})
COLUMNS = (
    "name",
    "action_type",
    "action_config",
    "schedule",
    "run_count",
    "status",
    "catchup_mode",
    "catchup_grace_s",
    "catchup_max",
    "overlap_policy",
    "retry_max_attempts",
    "retry_backoff_s",
    "retry_backoff_max_s",
    "next_run_at",
    "created_at",
    "updated_at",
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _row(name: str, schedule: str, next_run_at: datetime, stamp: str) -> tuple[object, ...]:
    return (
        name,
        "run_task",
        ACTION_CONFIG,
        schedule,
        0,  # run_count
        "active",
        "latest",  # catchup_mode
        3600.0,  # catchup_grace_s
        100,  # catchup_max
        "skip",  # overlap_policy
        3,  # retry_max_attempts
        5.0,  # retry_backoff_s
        300.0,  # retry_backoff_max_s
        next_run_at.isoformat(),
        stamp,  # created_at
        stamp,  # updated_at
    )


def action_rows(n: int, now: datetime) -> Iterator[tuple[object, ...]]:
    """N active run_task actions (values for COLUMNS), on future slots over the next day.

    Row ``i`` (id ``i + 1``) has schedule ``SCHEDULES[i % len(SCHEDULES)]``.
    """
    first = slot_after(now) + timedelta(hours=1)
    stamp = now.isoformat()
    schedules = [json.dumps(s) for s in SCHEDULES]
    for i in range(n):
        yield _row(
            f"bench-{i:06d}", schedules[i % len(schedules)], first + (i % 144) * SLOT_GRID, stamp
        )


def spread_rows(n: int, every_s: float, first_at: datetime) -> Iterator[tuple[object, ...]]:
    """N actions every ``every_s``, their slots spread evenly over one period from
    ``first_at``: ``n`` slots due per period, one every ``every_s / n`` seconds."""
    stamp = datetime.now(UTC).isoformat()
    for i in range(n):
        anchor = first_at + timedelta(seconds=every_s * i / n)
        schedule = {"kind": "interval", "every_s": every_s, "anchor": anchor.isoformat()}
        yield _row(f"late-{i:06d}", json.dumps(schedule), anchor, stamp)


def slot_at_or_before(moment: datetime) -> datetime:
    """The latest instant <= ``moment`` that is a slot of every schedule."""
    return _EPOCH + ((moment - _EPOCH) // SLOT_GRID) * SLOT_GRID


def slot_after(moment: datetime) -> datetime:
    """The earliest instant >= ``moment`` that is a slot of every schedule."""
    return _EPOCH - ((_EPOCH - moment) // SLOT_GRID) * SLOT_GRID
