"""The measuring sequence every beat subprocess runs, whatever the scheduler (standard library).

Each scheduler module (``beat_ours``, ``beat_peer``, ``beat_redbeat``, ``beat_sqla``,
``beat_django``) supplies a :class:`Driver` that speaks to its scheduler through that
scheduler's own API; :func:`run` times the same things in the same order for all of them:

1. start-up: build the app and the scheduler, first ``tick()``;
2. idle ticks: back-to-back ``tick()`` with nothing due;
3. for each K: K entries made due (untimed), then ``tick()`` back to back until K slots were
   published or the cap passed; the first K is repeated ``reps`` times (the first sample is
   the fresh process's, the cold case); larger K are skipped when the first was capped;
4. pick-up of one edit: one entry made due through the scheduler's own write path, then
   ``tick()`` back to back until its message is published;
5. peak RSS (VmHWM).

Prints one JSON line (``bench.measure.emit``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Protocol

from bench.measure import Pumped, TickStats, emit, peak_rss_mb, pump, ru_maxrss_mb, time_ticks

SLOW_REPEAT_S = 5.0  # a first dispatch slower than this is not repeated


class Driver(Protocol):
    name: str

    def start(self) -> None:
        """Build the app and the scheduler; the first tick."""

    def tick(self) -> None: ...

    def published(self) -> int:
        """Slots published since the last :meth:`settle`."""

    def make_due(self, k: int) -> None:
        """Make ``k`` entries (spread over the table) due now, through the fastest way in."""

    def settle(self) -> int:
        """After a dispatch: verify and empty the queue; make the entries not due again.
        Returns the messages found on the broker."""

    def edit(self) -> bool:
        """Make one entry due through the scheduler's own write API; False: it has none."""

    def extra(self) -> dict[str, Any]:
        """Scheduler-specific measurements for the JSON."""

    def close(self) -> None: ...


def parse_args(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, required=True, help="entries in the schedule")
    parser.add_argument(
        "--dues",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1000],
        help="comma-separated numbers of due slots to dispatch",
    )
    parser.add_argument("--ticks", type=int, default=500, help="idle ticks to time at most")
    parser.add_argument("--idle-budget", type=float, default=8.0, help="idle loop's seconds")
    parser.add_argument("--reps", type=int, default=3, help="dispatches of the first K")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds before giving up")
    parser.add_argument("--config", default="{}", help="the Celery config, as JSON")
    parser.add_argument("--url", default="", help="the scheduler's store (database or Redis)")
    parser.add_argument("--load", action="store_true", help="only write the N entries")
    return parser.parse_args()


def dispatch(driver: Driver, k: int, cap_s: float) -> dict[str, Any]:
    driver.make_due(k)
    pumped = pump(driver.tick, driver.published, goal=k, cap_s=cap_s)
    queued = driver.settle()
    return {"due": k, "queued": queued, **pumped.as_dict()}


def pickup(driver: Driver, cap_s: float) -> dict[str, Any] | None:
    driver.settle()
    if not driver.edit():
        return None
    pumped: Pumped = pump(driver.tick, driver.published, goal=1, cap_s=cap_s)
    queued = driver.settle()
    return {"queued": queued, **pumped.as_dict()}


def run(driver: Driver, args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    try:
        driver.start()
        startup_s = time.perf_counter() - started
        idle = time_ticks(
            lambda _i: driver.tick(), count=args.ticks, min_count=20, budget_s=args.idle_budget
        )
        dues = [k for k in args.dues if k <= args.n]
        first = dispatch(driver, dues[0], args.cap) if dues else None
        repeats = []
        if first and not first["capped"] and first["total_s"] < SLOW_REPEAT_S:
            repeats = [dispatch(driver, dues[0], args.cap) for _ in range(args.reps - 1)]
        edit = pickup(driver, args.cap)
        # A scheduler that could not dispatch the first K within the cap would not do more.
        larger = [
            dispatch(driver, k, args.cap)
            if first and not first["capped"]
            else {"due": k, "skipped": f"{dues[0]:,} due did not finish within the cap"}
            for k in dues[1:]
        ]
        rss_mb, ru_maxrss = peak_rss_mb(), ru_maxrss_mb()
        extra = driver.extra()
    finally:
        driver.close()
    dispatches = [d for d in (first, *repeats, *larger) if d]
    emit(
        {
            "scheduler": driver.name,
            "n": args.n,
            "startup_s": startup_s,
            "idle": TickStats.of(idle).as_dict(),
            "dispatch": dispatches,
            "repeat_median_s": (
                statistics.median(d["total_s"] for d in (first, *repeats))
                if first and repeats
                else None
            ),
            "pickup": edit,
            "peak_rss_mb": rss_mb,
            "ru_maxrss_mb": ru_maxrss,
            "extra": extra,
        }
    )
