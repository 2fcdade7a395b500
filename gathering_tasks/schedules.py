"""Pure schedule arithmetic: when an action's slots fall, and which of them to run now.

Nothing here reads the clock, the database or the network: every function takes ``now`` /
``after`` explicitly, so beat, the API and the tests all get the same answer for the same input.
Every datetime going in must be timezone-aware (naive ones raise :class:`InvalidInput`); every
datetime coming out is aware UTC.

Schedules
=========

* :class:`CronSchedule` -- a 5-field cron expression (or an ``@daily``-style alias) read in the
  *local wall time* of an IANA zone. Seconds fields (6 or 7 columns) are rejected: sub-minute
  periods are what :class:`IntervalSchedule` is for, and a seconds column makes the DST rules
  below ambiguous. The random/hashed croniter extensions (``R``, ``H``) are rejected too, because
  a slot must be the same every time it is computed.
* :class:`IntervalSchedule` -- slots at ``anchor + k * every_s`` for ``k >= 0``. Slots are always
  computed from the anchor in integer microseconds, never from the previous run, so they do not
  drift and a late beat never shifts them.
* :class:`OnceSchedule` -- exactly one slot, ``at``.

Cron and daylight-saving time
-----------------------------

The expression is matched against naive local wall times (croniter's own tz-aware iteration runs
a daily 01:30 job twice on a fall-back day, so it is not used), and each matching wall time is
then mapped to UTC:

* A wall time that does not exist (inside a spring-forward gap, e.g. 02:30 in New York on
  2026-03-08) runs **once, at the instant the clocks jump** (03:00 local, 07:00 UTC), as Vixie
  cron does. Several wall times in the same gap (``*/30`` gives 02:00 and 02:30) collapse into
  that single slot.
* A wall time that occurs twice (inside a fall-back fold, e.g. 01:30 in New York on
  2026-11-01) runs **once, at its first occurrence** (``fold=0``, 01:30 EDT).
* This is wall-clock semantics for every expression, including hourly and minutely ones: the
  repeated hour of a fall-back day is not run a second time, and the missing hour of a
  spring-forward day runs once at the jump. An hourly job therefore has a two-hour UTC gap on a
  fall-back day and one slot fewer on a spring-forward day.

Both rules keep the slot sequence strictly increasing in UTC with no duplicates, which is what
deterministic slot keys rely on.

Catch-up (:func:`plan_due`)
===========================

Beat calls :func:`plan_due` for an action whose stored ``next_run_at`` is ``<= now``. The *due*
slots are the schedule's slots in ``[next_run_at, now]``, clipped to the :class:`Window`
(nothing before ``start_at``, nothing after ``end_at``). The most recent due slot is the
*current* one; the older ones were *missed*. A slot is never run if it is older than
``grace_s`` before ``now``. Then, by :class:`CatchUpPolicy` mode:

* ``skip`` -- run the current slot only if it is on time (``now - slot <= on_time_s``, capped by
  ``grace_s``); every missed slot is dropped. ``on_time_s`` should cover beat's tick and jitter.
* ``latest`` -- run the current slot if it is within ``grace_s``; drop the missed ones.
* ``all`` -- run every due slot within ``grace_s``, at most ``max_catchup`` per plan. When the
  cap bites, the **most recent** slots are kept and the oldest dropped, the same direction as
  ``grace_s``, so the current slot always runs and the history that is replayed is contiguous
  up to ``now``.

``max_runs`` then caps ``run_count + len(run_slots)``; when it bites, the **earliest** selected
slots are kept, because a "run N times" action means the first N slots of its schedule.

Every due slot that is not run is counted in ``skipped_slots``. ``next_run_at`` of the plan is
always strictly after ``now`` (and not before the stored ``next_run_at`` or ``start_at``), or
``None``, so beat never plans the same slot twice. ``finished`` says the action is done:

* ``"completed"`` -- ``max_runs`` is reached, or the schedule has no slot left and the action ran
  at least once (a once schedule that fired);
* ``"expired"`` -- the next slot would fall after ``end_at``, or the schedule has no slot left and
  the action never ran (a once schedule whose slot was dropped by the policy).

Work per call is bounded whatever the outage length: interval slots are counted and selected by
floor division; cron slots to run are walked backwards from ``now`` (at most
``min(max_catchup, limit)`` of them) and the skipped ones counted forwards, at most ``limit`` on
each side of the runs. When that count stops early ``skipped_slots`` is a lower bound and
``skipped_capped`` is set.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
from typing import Any, Literal, TypeAlias, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from gathering_tasks.errors import InvalidInput

__all__ = [
    "MAX_CATCHUP_SLOTS",
    "ON_TIME_S",
    "CatchUpMode",
    "CatchUpPolicy",
    "CronSchedule",
    "DuePlan",
    "FinishReason",
    "IntervalSchedule",
    "OnceSchedule",
    "Schedule",
    "Window",
    "first_slot",
    "next_slot",
    "parse_schedule",
    "plan_due",
    "schedule_to_spec",
    "slots_between",
]

CatchUpMode: TypeAlias = Literal["skip", "latest", "all"]
FinishReason: TypeAlias = Literal["completed", "expired"]

MAX_CATCHUP_SLOTS = 1000
"""The most slots :func:`plan_due` plans per call, and so the largest ``catchup_max`` accepted:
a larger cap would be promised at the door and silently cut by the planner."""
ON_TIME_S = 5.0
"""How late a slot may be and still count as on time (``skip`` mode); covers beat's tick."""

# The resolution of datetime: "at or after t" is "strictly after t - _TICK".
_TICK = timedelta(microseconds=1)
_CRON_FIELD_COUNT = 5
_CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
# croniter's random (R) and hashed (H) tokens give different slots per process or per id.
_NONDETERMINISTIC_TOKENS = ("R", "H")
# These keys exist on disk but follow the host's configuration, so slots would differ per host.
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules"})
# A fixed start for the "does this expression ever match?" probe, so validation is deterministic.
# Naive on purpose: cron expressions are matched against naive local wall times.
_CRON_PROBE_START = datetime(2000, 1, 1)
_MAX_EVERY_S = timedelta(days=36_500).total_seconds()
_EARLIEST = datetime.min.replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Validation helpers


def _require_aware(value: datetime, field: str) -> datetime:
    """Return ``value`` in UTC, or raise if it carries no offset."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            "must be timezone-aware (give an offset such as +00:00 or Z)", field=field
        )
    return value.astimezone(UTC)


def _load_zone(name: str) -> ZoneInfo:
    if name in _HOST_DEPENDENT_ZONES:
        raise InvalidInput(
            f"{name!r} depends on the host; name an IANA zone", field="schedule.timezone"
        )
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(
            f"unknown IANA time zone {name!r} (e.g. 'UTC', 'Europe/Paris')",
            field="schedule.timezone",
        ) from exc


def _check_cron_shape(expr: str) -> None:
    fields = expr.split()
    if len(fields) == 1 and fields[0].lower() in _CRON_ALIASES:
        return
    if len(fields) != _CRON_FIELD_COUNT:
        hint = ""
        if len(fields) > _CRON_FIELD_COUNT:
            hint = "; seconds and year fields are not supported (use an interval schedule)"
        raise InvalidInput(
            f"invalid cron expression {expr!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {len(fields)}{hint}",
            field="schedule.expr",
        )
    pieces = re.split(r"[\s,/-]+", expr.upper())
    if any(piece.startswith(_NONDETERMINISTIC_TOKENS) for piece in pieces):
        raise InvalidInput(
            f"invalid cron expression {expr!r}: random (R) and hashed (H) values are not allowed",
            field="schedule.expr",
        )


@functools.lru_cache(maxsize=1024)
def _check_cron_expr(expr: str) -> None:
    _check_cron_shape(expr)
    try:
        croniter(expr, _CRON_PROBE_START).get_next(datetime)
    except CroniterBadDateError as exc:
        raise InvalidInput(
            f"cron expression {expr!r} never matches a date", field="schedule.expr"
        ) from exc
    except ValueError as exc:  # CroniterBadCronError and friends subclass ValueError
        raise InvalidInput(
            f"invalid cron expression {expr!r}: {exc}", field="schedule.expr"
        ) from exc


def _step_us(every_s: float) -> int:
    return round(every_s * 1_000_000)


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class CronSchedule:
    """Slots at the local wall times matched by a 5-field cron expression in an IANA zone."""

    expr: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        _check_cron_expr(self.expr)
        _load_zone(self.timezone)


@dataclass(frozen=True)
class IntervalSchedule:
    """Slots at ``anchor + k * every_s`` for ``k >= 0``, computed from the anchor (no drift)."""

    every_s: float
    anchor: datetime

    def __post_init__(self) -> None:
        _require_aware(self.anchor, "schedule.anchor")
        if not (math.isfinite(self.every_s) and 0 < self.every_s <= _MAX_EVERY_S):
            raise InvalidInput(
                f"must be a number of seconds > 0 and <= {_MAX_EVERY_S:.0f}, got {self.every_s}",
                field="schedule.every_s",
            )
        if _step_us(self.every_s) < 1:
            raise InvalidInput("must be at least one microsecond", field="schedule.every_s")


@dataclass(frozen=True)
class OnceSchedule:
    """A single slot at ``at``."""

    at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.at, "schedule.at")


Schedule: TypeAlias = CronSchedule | IntervalSchedule | OnceSchedule


@dataclass(frozen=True)
class CatchUpPolicy:
    """How :func:`plan_due` treats slots that beat reaches late (see the module docstring)."""

    mode: CatchUpMode = "latest"
    grace_s: float = 3600.0
    max_catchup: int = 100

    def __post_init__(self) -> None:
        if self.mode not in get_args(CatchUpMode):
            raise InvalidInput(
                f"unknown catch-up mode {self.mode!r}; expected skip, latest or all",
                field="catch_up.mode",
            )
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise InvalidInput("must be a number of seconds >= 0", field="catch_up.grace_s")
        if self.max_catchup < 1:
            raise InvalidInput("must be at least 1", field="catch_up.max_catchup")


@dataclass(frozen=True)
class Window:
    """Limits on when and how often an action runs; ``None`` means unbounded."""

    start_at: datetime | None = None
    end_at: datetime | None = None
    max_runs: int | None = None

    def __post_init__(self) -> None:
        if self.start_at is not None:
            _require_aware(self.start_at, "window.start_at")
        if self.end_at is not None:
            _require_aware(self.end_at, "window.end_at")
        if self.start_at is not None and self.end_at is not None and self.end_at < self.start_at:
            raise InvalidInput("must not be before start_at", field="window.end_at")
        if self.max_runs is not None and self.max_runs < 1:
            raise InvalidInput("must be at least 1", field="window.max_runs")


@dataclass(frozen=True)
class DuePlan:
    """What beat should do for one action now (see :func:`plan_due`).

    ``run_slots`` are the slots to claim and run, ascending. ``skipped_slots`` counts the due
    slots that are not run; when ``skipped_capped`` is true the count stopped at the work limit
    and the real number is larger. ``next_run_at`` is the next slot strictly after ``now``, or
    ``None`` when ``finished`` says the action is done.
    """

    run_slots: tuple[datetime, ...]
    skipped_slots: int
    next_run_at: datetime | None
    finished: FinishReason | None
    skipped_capped: bool = False


# --------------------------------------------------------------------------------------------
# Parsing and serialisation


def _parse_instant(value: Any, field: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidInput(f"not an ISO-8601 datetime: {value!r}", field=field) from exc
    if not isinstance(value, datetime):
        raise InvalidInput("must be an ISO-8601 datetime string", field=field)
    return _require_aware(value, field)


def _parse_cron(spec: Mapping[str, Any], now: datetime) -> Schedule:
    expr = spec.get("expr")
    if not isinstance(expr, str):
        raise InvalidInput("must be a cron expression string", field="schedule.expr")
    timezone = spec.get("timezone")
    if timezone is None:
        timezone = "UTC"
    if not isinstance(timezone, str):
        raise InvalidInput("must be an IANA zone name", field="schedule.timezone")
    return CronSchedule(expr=" ".join(expr.split()), timezone=timezone)


def _parse_interval(spec: Mapping[str, Any], now: datetime) -> Schedule:
    every_s = spec.get("every_s")
    # bool is an int subclass; `true` for a period is a mistake, not one second.
    if isinstance(every_s, bool) or not isinstance(every_s, int | float):
        raise InvalidInput("must be a number of seconds", field="schedule.every_s")
    anchor = spec.get("anchor")
    if anchor is None:
        # The next whole second: the first slot is at most a second away (not a whole
        # interval), and whole seconds keep slots readable. Callers store the anchor.
        at = _require_aware(now, "now")
        anchor_at = at if at.microsecond == 0 else at.replace(microsecond=0) + timedelta(seconds=1)
    else:
        anchor_at = _parse_instant(anchor, "schedule.anchor")
    return IntervalSchedule(every_s=float(every_s), anchor=anchor_at)


def _parse_once(spec: Mapping[str, Any], now: datetime) -> Schedule:
    return OnceSchedule(at=_parse_instant(spec.get("at"), "schedule.at"))


_Parser: TypeAlias = Callable[[Mapping[str, Any], datetime], Schedule]
_PARSERS: dict[str, tuple[_Parser, frozenset[str]]] = {
    "cron": (_parse_cron, frozenset({"kind", "expr", "timezone"})),
    "interval": (_parse_interval, frozenset({"kind", "every_s", "anchor"})),
    "once": (_parse_once, frozenset({"kind", "at"})),
}


def parse_schedule(spec: Mapping[str, Any], *, now: datetime) -> Schedule:
    """Build a schedule from its JSON form, or raise :class:`InvalidInput` naming the field.

    Forms: ``{"kind": "cron", "expr": "*/5 * * * *", "timezone": "Europe/Paris"}`` (timezone
    defaults to UTC); ``{"kind": "interval", "every_s": 30, "anchor": "2026-01-01T00:00:00Z"}``
    (anchor defaults to ``now`` rounded up to the second); ``{"kind": "once", "at":
    "2026-01-01T09:00:00+01:00"}``. Datetimes may be aware ``datetime`` objects or ISO-8601
    strings with an offset; they are stored in UTC. Unknown keys are rejected.
    """
    kind = spec.get("kind")
    entry = _PARSERS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise InvalidInput(
            f"unknown schedule kind {kind!r}; expected cron, interval or once",
            field="schedule.kind",
        )
    parser, allowed = entry
    unexpected = sorted(set(spec) - allowed)
    if unexpected:
        raise InvalidInput(
            f"unexpected field for a {kind} schedule", field=f"schedule.{unexpected[0]}"
        )
    return parser(spec, now)


def schedule_to_spec(schedule: Schedule) -> dict[str, Any]:
    """Return the JSON-serialisable form of ``schedule``; :func:`parse_schedule` inverts it."""
    match schedule:
        case CronSchedule():
            return {"kind": "cron", "expr": schedule.expr, "timezone": schedule.timezone}
        case IntervalSchedule():
            return {
                "kind": "interval",
                "every_s": schedule.every_s,
                "anchor": schedule.anchor.astimezone(UTC).isoformat(),
            }
        case OnceSchedule():
            return {"kind": "once", "at": schedule.at.astimezone(UTC).isoformat()}


# --------------------------------------------------------------------------------------------
# Cron: wall-time iteration mapped to UTC


def _gap_end(wall: datetime, zone: ZoneInfo) -> datetime:
    """Return the instant the clocks jump over ``wall``, a local time that does not exist."""
    # fold=1 reads the wall time with the offset after the jump, which lands before the jump;
    # fold=0 uses the offset before it, which lands after. Bisect between them in whole
    # seconds (tz database transitions are on whole seconds).
    before = math.floor(wall.replace(tzinfo=zone, fold=1).timestamp())
    after = math.ceil(wall.replace(tzinfo=zone, fold=0).timestamp())
    offset_after = datetime.fromtimestamp(after, UTC).astimezone(zone).utcoffset()
    while after - before > 1:
        middle = (before + after) // 2
        if datetime.fromtimestamp(middle, UTC).astimezone(zone).utcoffset() == offset_after:
            after = middle
        else:
            before = middle
    return datetime.fromtimestamp(after, UTC)


def _wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """Map a naive local wall time to the UTC instant its slot runs at (see module docstring)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first  # fold=0 is the first occurrence when the wall time repeats
    return _gap_end(wall, zone)


def _local_wall(instant: datetime, zone: ZoneInfo) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def _fold_tail(instant: datetime, zone: ZoneInfo) -> timedelta:
    """How far wall time runs on past ``instant`` while still mapping to an earlier slot.

    Inside the second pass of a fall-back fold, later wall times of the fold map to their
    first occurrence, which is before ``instant``.
    """
    local = instant.astimezone(zone)
    if local.fold == 0:
        return timedelta(0)
    first_offset = local.replace(fold=0).utcoffset()
    second_offset = local.utcoffset()
    assert first_offset is not None and second_offset is not None  # ZoneInfo always has one
    return first_offset - second_offset


@functools.lru_cache(maxsize=1024)
def _cron_template(expr: str) -> croniter:
    """A parsed expression: croniter's parse (_expand) costs ~100 us, far more than a step."""
    return croniter(expr, _CRON_PROBE_START)


def _walls(expr: str, start: datetime) -> croniter:
    """A croniter over ``expr`` positioned at ``start``, without re-parsing the expression."""
    walls = copy.copy(_cron_template(expr))
    walls.set_current(start, force=True)
    return walls


def _cron_ascending(schedule: CronSchedule, after: datetime) -> Iterator[datetime]:
    """Yield the slots strictly after ``after``, ascending, each once."""
    zone = ZoneInfo(schedule.timezone)
    # Every wall time that maps after `after` is later than after's own wall time, so
    # starting there misses nothing; the few fold walls that map earlier are filtered out.
    walls = _walls(schedule.expr, _local_wall(after, zone))
    last = after
    while True:
        try:
            slot = _wall_to_utc(walls.get_next(datetime), zone)
        except (CroniterBadDateError, OverflowError):
            return
        # Fold walls map before `last`; gap walls all map to the same jump instant.
        if slot > last:
            last = slot
            yield slot


def _cron_descending(schedule: CronSchedule, at_or_before: datetime) -> Iterator[datetime]:
    """Yield the slots at or before ``at_or_before``, descending, each once."""
    zone = ZoneInfo(schedule.timezone)
    top = _local_wall(at_or_before, zone) + _fold_tail(at_or_before, zone)
    # get_prev is strictly before its start; one tick later makes `top` itself eligible.
    walls = _walls(schedule.expr, top + _TICK)
    last = at_or_before + _TICK
    while True:
        try:
            slot = _wall_to_utc(walls.get_prev(datetime), zone)
        except (CroniterBadDateError, OverflowError):
            return
        if slot < last:
            last = slot
            yield slot


# Cron slot queries, remembered: a croniter step costs ~50 us, and beat plans many actions of
# the same expression from the same slot at the same instant (every "*/5" action at :05).
# Pure functions of hashable values (the schedule, aware UTC instants, counts), so a
# remembered answer is the answer.


@functools.lru_cache(maxsize=4096)
def _cron_next(schedule: CronSchedule, after: datetime) -> datetime | None:
    return next(_cron_ascending(schedule, after), None)


@functools.lru_cache(maxsize=4096)
def _cron_between(
    schedule: CronSchedule, start: datetime, end: datetime, limit: int
) -> tuple[datetime, ...]:
    slots = _cron_ascending(schedule, start - _TICK)
    return tuple(islice(takewhile(lambda slot: slot <= end, slots), limit))


@functools.lru_cache(maxsize=4096)
def _cron_latest(
    schedule: CronSchedule, low: datetime, high: datetime, count: int
) -> tuple[datetime, ...]:
    """The ``count`` most recent slots with ``low <= slot <= high``, ascending."""
    slots = _cron_descending(schedule, high)
    return tuple(islice(takewhile(lambda slot: slot >= low, slots), count))[::-1]


# --------------------------------------------------------------------------------------------
# Interval: integer arithmetic on microseconds since the anchor


def _offset_us(schedule: IntervalSchedule, instant: datetime) -> int:
    return (instant - schedule.anchor) // _TICK


def _interval_slot(schedule: IntervalSchedule, index: int) -> datetime | None:
    try:
        delta = timedelta(microseconds=index * _step_us(schedule.every_s))
        return schedule.anchor.astimezone(UTC) + delta
    except OverflowError:
        return None


def _index_at_or_after(schedule: IntervalSchedule, instant: datetime) -> int:
    offset = _offset_us(schedule, instant)
    return 0 if offset <= 0 else -(-offset // _step_us(schedule.every_s))


def _index_at_or_before(schedule: IntervalSchedule, instant: datetime) -> int:
    """Largest slot index at or before ``instant``; negative when it is before the anchor."""
    return _offset_us(schedule, instant) // _step_us(schedule.every_s)


def _interval_slots(schedule: IntervalSchedule, first: int, last: int) -> list[datetime]:
    slots = (_interval_slot(schedule, index) for index in range(first, last + 1))
    return [slot for slot in slots if slot is not None]


# --------------------------------------------------------------------------------------------
# Slot queries


def next_slot(schedule: Schedule, after: datetime) -> datetime | None:
    """Return the first slot strictly after ``after``, or ``None`` if there is none."""
    after = _require_aware(after, "after")
    match schedule:
        case CronSchedule():
            return _cron_next(schedule, after)
        case IntervalSchedule():
            offset = _offset_us(schedule, after)
            index = 0 if offset < 0 else offset // _step_us(schedule.every_s) + 1
            return _interval_slot(schedule, index)
        case OnceSchedule():
            return schedule.at.astimezone(UTC) if schedule.at > after else None


def first_slot(schedule: Schedule, *, not_before: datetime) -> datetime | None:
    """Return the first slot at or after ``not_before``, or ``None`` if there is none."""
    return next_slot(schedule, _require_aware(not_before, "not_before") - _TICK)


def slots_between(
    schedule: Schedule, start: datetime, end: datetime, *, limit: int
) -> list[datetime]:
    """Return the slots with ``start <= slot <= end``, ascending; the earliest ``limit`` of them."""
    start = _require_aware(start, "start")
    end = _require_aware(end, "end")
    if limit <= 0 or end < start:
        return []
    match schedule:
        case CronSchedule():
            return list(_cron_between(schedule, start, end, limit))
        case IntervalSchedule():
            first = _index_at_or_after(schedule, start)
            last = min(_index_at_or_before(schedule, end), first + limit - 1)
            return _interval_slots(schedule, first, last)
        case OnceSchedule():
            return [schedule.at.astimezone(UTC)] if start <= schedule.at <= end else []


def _latest_slots(schedule: Schedule, low: datetime, high: datetime, count: int) -> list[datetime]:
    """Return the ``count`` most recent slots with ``low <= slot <= high``, ascending."""
    if count <= 0 or high < low:
        return []
    match schedule:
        case CronSchedule():
            return list(_cron_latest(schedule, low, high, count))
        case IntervalSchedule():
            last = _index_at_or_before(schedule, high)
            first = max(_index_at_or_after(schedule, low), last - count + 1)
            return _interval_slots(schedule, first, last)
        case OnceSchedule():
            return [schedule.at.astimezone(UTC)] if low <= schedule.at <= high else []


def _count_slots(schedule: Schedule, low: datetime, high: datetime, limit: int) -> tuple[int, bool]:
    """Count the slots in ``[low, high]``; cron stops at ``limit`` and reports it was capped."""
    if high < low:
        return 0, False
    match schedule:
        case CronSchedule():
            counted = len(slots_between(schedule, low, high, limit=limit + 1))
            return min(counted, limit), counted > limit
        case IntervalSchedule():
            first = _index_at_or_after(schedule, low)
            last = _index_at_or_before(schedule, high)
            return max(last - first + 1, 0), False
        case OnceSchedule():
            return int(low <= schedule.at <= high), False


# --------------------------------------------------------------------------------------------
# Catch-up planning


def _seconds_before(instant: datetime, seconds: float) -> datetime:
    try:
        return instant - timedelta(seconds=seconds)
    except OverflowError:
        return _EARLIEST


def _select_runs(
    schedule: Schedule,
    low: datetime,
    high: datetime,
    *,
    now: datetime,
    policy: CatchUpPolicy,
    on_time_s: float,
    limit: int,
) -> list[datetime]:
    """Pick the due slots in ``[low, high]`` that the policy runs, ascending."""
    # Every mode is "the most recent N slots no older than some reach": skip and latest are
    # all with N = 1, skip with an on-time reach instead of the grace period.
    if policy.mode == "skip":
        reach_s, count = min(on_time_s, policy.grace_s), 1
    elif policy.mode == "latest":
        reach_s, count = policy.grace_s, 1
    else:
        reach_s, count = policy.grace_s, policy.max_catchup
    floor = max(low, _seconds_before(now, reach_s))
    return _latest_slots(schedule, floor, high, min(count, limit))


def _count_skipped(
    schedule: Schedule, low: datetime, high: datetime, run_slots: list[datetime], limit: int
) -> tuple[int, bool]:
    """Count the due slots in ``[low, high]`` that are not in ``run_slots``."""
    if not run_slots:
        return _count_slots(schedule, low, high, limit)
    # The runs are consecutive slots (a most-recent run, possibly cut to a prefix by
    # max_runs), so what is skipped lies before the first run and after the last one.
    older, older_capped = _count_slots(schedule, low, run_slots[0] - _TICK, limit)
    newer, newer_capped = _count_slots(schedule, run_slots[-1] + _TICK, high, limit)
    return older + newer, older_capped or newer_capped


def _finish(
    upcoming: datetime | None, window: Window, total_runs: int
) -> tuple[datetime | None, FinishReason | None]:
    if window.max_runs is not None and total_runs >= window.max_runs:
        return None, "completed"
    if upcoming is None:
        return None, "completed" if total_runs > 0 else "expired"
    if window.end_at is not None and upcoming > window.end_at:
        return None, "expired"
    return upcoming, None


def plan_due(
    schedule: Schedule,
    *,
    next_run_at: datetime,
    now: datetime,
    policy: CatchUpPolicy,
    window: Window,
    run_count: int,
    limit: int = MAX_CATCHUP_SLOTS,
    on_time_s: float = ON_TIME_S,
) -> DuePlan:
    """Decide which due slots of one action to run now, and when to look at it next.

    ``next_run_at`` is the action's stored next slot (beat calls this once it is ``<= now``),
    ``run_count`` how many runs it already had. ``limit`` bounds the slots examined per call;
    ``on_time_s`` is how late a slot may be and still count as on time for ``skip``. The rules
    are in the module docstring; the result depends only on the arguments.
    """
    next_run_at = _require_aware(next_run_at, "next_run_at")
    now = _require_aware(now, "now")
    if limit < 1:
        raise InvalidInput("must be at least 1", field="limit")
    if not (math.isfinite(on_time_s) and on_time_s >= 0):
        raise InvalidInput("must be a number of seconds >= 0", field="on_time_s")
    low = next_run_at if window.start_at is None else max(next_run_at, window.start_at)
    high = now if window.end_at is None else min(now, window.end_at)
    run_slots = _select_runs(
        schedule, low, high, now=now, policy=policy, on_time_s=on_time_s, limit=limit
    )
    if window.max_runs is not None:
        run_slots = run_slots[: max(window.max_runs - run_count, 0)]
    skipped, capped = _count_skipped(schedule, low, high, run_slots, limit)
    upcoming = next_slot(schedule, max(now, low - _TICK))
    next_at, finished = _finish(upcoming, window, run_count + len(run_slots))
    return DuePlan(
        run_slots=tuple(run_slots),
        skipped_slots=skipped,
        next_run_at=next_at,
        finished=finished,
        skipped_capped=capped,
    )
