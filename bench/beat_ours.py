"""Measure OUR beat in a fresh process: start-up, idle tick, claim+publish, peak RSS.

Run by ``bench/beat.py`` as ``python -m bench.beat_ours --n N --due K`` against a database it
has loaded with N actions whose ``next_run_at`` lies in the future; the database and Redis
come from ``GATHERING_DATABASE_URL`` / ``GATHERING_REDIS_URL``, exactly as for ``celery beat``.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, event, text

from bench.dataset import SCHEDULES, slot_at_or_before
from bench.measure import QUEUE, TickStats, emit, peak_rss_mb, ru_maxrss_mb, time_ticks
from gathering_tasks.app import celery_config
from gathering_tasks.beat import DatabaseScheduler, SlotPlanner
from gathering_tasks.db.claims import ClaimBatch, DueAction, Planner, SlotClaims, SlotPlan
from gathering_tasks.db.engine import session_factory
from gathering_tasks.settings import Settings, get_settings

DUE_QUERY_MARK = "FOR UPDATE OF scheduled_actions SKIP LOCKED"
NEXT_DUE_MARK = "min(scheduled_actions.next_run_at)"


class TimedPlanner(SlotPlanner):
    """The real planner, accumulating the time spent planning."""

    def __init__(self, now: datetime) -> None:
        super().__init__(now)
        self.spent_s = 0.0

    def __call__(self, action: DueAction) -> SlotPlan:
        started = time.perf_counter()
        try:
            return super().__call__(action)
        finally:
            self.spent_s += time.perf_counter() - started


class TimedClaims(SlotClaims):
    """The real claims store, accumulating the time spent in ``claim_due`` (SQL + planning)."""

    spent_s = 0.0

    def claim_due(
        self, now: datetime, *, limit: int, slot_budget: int, plan: Planner
    ) -> ClaimBatch:
        started = time.perf_counter()
        try:
            return super().claim_due(now, limit=limit, slot_budget=slot_budget, plan=plan)
        finally:
            self.spent_s += time.perf_counter() - started


@dataclass(frozen=True)
class DispatchSample:
    """One ``dispatch_due`` of K due actions, and what reached Redis and the database."""

    total_s: float
    cpu_s: float  # this process's CPU time: far below total_s means waiting (I/O, or no CPU)
    claim_s: float
    plan_s: float
    published: int
    queued: int
    run_rows: int


def beat_app(settings: Settings) -> Celery:
    """A Celery app configured like ``gathering_tasks.app`` (broker: the throwaway Redis)."""
    app = Celery("bench-beat", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


@contextmanager
def captured_sql(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Record the statements (and parameters) that ``engine`` sends while the block runs."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_rest: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def explain(engine: Engine, statement: str, params: Any) -> list[str]:
    """EXPLAIN ANALYZE one captured statement, in a transaction that is rolled back."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}", params)
        plan = [str(row[0]) for row in rows]
        conn.rollback()
    return plan


def explain_tick_queries(scheduler: DatabaseScheduler, engine: Engine) -> dict[str, list[str]]:
    """The plans of ``next_due_at`` (every tick) and of the due query (ticks with work due)."""
    # The tick's own read goes through the scheduler's reads engine, when it has one.
    reads = getattr(getattr(scheduler, "stores", None), "reads", None) or engine
    with captured_sql(engine) as seen, captured_sql(reads) as seen_reads:
        scheduler.tick()
        # An idle tick skips the due query (next_due_at says nothing is due); issue it too.
        scheduler.engine.dispatch_due(datetime.now(UTC))
    plans: dict[str, list[str]] = {}
    for statement, params in seen + seen_reads:
        if DUE_QUERY_MARK in statement:
            plans["due_query"] = explain(engine, statement, params)
        elif NEXT_DUE_MARK in statement:
            plans["next_due_at"] = explain(engine, statement, params)
    return plans


def make_due(engine: Engine, client: redis.Redis, *, n: int, due: int, slot: datetime) -> None:
    """Move ``due`` actions, spread over the table, to a past slot; empty runs and queue.

    The loader cycles through SCHEDULES every len(SCHEDULES) consecutive ids, so whole blocks
    of that many ids are picked: the due set has the table's mix of schedules.
    """
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM executions"))
        conn.execute(
            text(
                "UPDATE scheduled_actions SET next_run_at = :slot WHERE id IN ("
                " SELECT id FROM scheduled_actions WHERE (id - 1) / :kinds % :stride = 0"
                " ORDER BY id LIMIT :due)"
            ),
            {"slot": slot, "kinds": len(SCHEDULES), "stride": max(1, n // due), "due": due},
        )
    client.delete(QUEUE)


def dispatch_once(
    scheduler: DatabaseScheduler, engine: Engine, client: redis.Redis, *, n: int, due: int
) -> DispatchSample:
    """Time one ``dispatch_due`` that finds ``due`` actions due, then verify its effect."""
    now = datetime.now(UTC)
    make_due(engine, client, n=n, due=due, slot=slot_at_or_before(now))
    beat = scheduler.engine
    claims = TimedClaims(session_factory(get_settings().database_url))
    beat.repo.claims = claims
    # A fresh planner: a burst of actions it has never parsed is the expensive case.
    beat.planner = planner = TimedPlanner(now)
    started, cpu_started = time.perf_counter(), time.process_time()
    published = beat.dispatch_due(now)
    total_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    with engine.connect() as conn:
        run_rows = conn.execute(text("SELECT count(*) FROM scheduled_action_runs")).scalar_one()
    return DispatchSample(
        total_s=total_s,
        cpu_s=cpu_s,
        claim_s=claims.spent_s,
        plan_s=planner.spent_s,
        published=published,
        queued=client.llen(QUEUE),
        run_rows=int(run_rows),
    )


def idle_ticks(scheduler: DatabaseScheduler, settings: Settings, count: int) -> dict[str, Any]:
    """Back-to-back ticks with nothing due, the sweeper running as often as in production.

    Returns the stats of all ticks, and of the plain and the sweeping ones apart.
    """
    sweep_every = max(1, round(settings.sweep_interval_s / settings.beat_tick_s))

    def tick(i: int) -> None:
        if i % sweep_every == 0:
            # Ticks here run back to back, not once per beat_tick_s: force the sweep at its
            # production ratio (one tick in sweep_interval_s / beat_tick_s) so p99 includes it.
            scheduler.engine._next_sweep = 0.0
        scheduler.tick()

    samples = time_ticks(tick, count=count, min_count=count, budget_s=0)
    return {
        **TickStats.of(samples).as_dict(),
        "sweep_every": sweep_every,
        "plain": TickStats.of([s for i, s in enumerate(samples) if i % sweep_every]).as_dict(),
        "sweep": TickStats.of(samples[::sweep_every]).as_dict(),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    engine = session_factory(settings.database_url).kw["bind"]
    started = time.perf_counter()
    scheduler = DatabaseScheduler(beat_app(settings))
    try:
        scheduler.tick()
        startup_s = time.perf_counter() - started
        if not scheduler.engine.is_leader:
            raise RuntimeError("the benchmark beat did not take the leader lease")
        idle = idle_ticks(scheduler, settings, args.ticks)
        plans = explain_tick_queries(scheduler, engine)
        samples = [
            dispatch_once(scheduler, engine, client, n=args.n, due=args.due)
            for _ in range(args.reps)
        ]
        rss_mb, ru_maxrss = peak_rss_mb(), ru_maxrss_mb()
    finally:
        scheduler.close()
        client.close()
    return {
        "n": args.n,
        "startup_s": startup_s,
        "idle": idle,
        "plans": plans,
        "dispatch": [asdict(s) for s in samples],
        "dispatch_median_s": statistics.median(s.total_s for s in samples),
        "peak_rss_mb": rss_mb,
        "ru_maxrss_mb": ru_maxrss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, required=True, help="actions in the database")
    parser.add_argument("--due", type=int, default=1000, help="actions made due per dispatch")
    parser.add_argument("--ticks", type=int, default=500, help="idle ticks to time")
    parser.add_argument("--reps", type=int, default=5, help="timed dispatches")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    emit(measure(args))


if __name__ == "__main__":
    main()
