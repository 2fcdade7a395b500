"""Measure OUR beat in a fresh process, through ``DatabaseScheduler.tick()``.

Run by ``bench/beat.py`` as ``python -m bench.beat_ours --n N --dues 1000,10000`` against a
database it has loaded with N actions whose ``next_run_at`` lies in the future; the database
and Redis come from ``GATHERING_DATABASE_URL`` / ``GATHERING_REDIS_URL``, exactly as for
``celery beat``. The sequence is :func:`bench.beat_child.run`'s; on top of it: idle ticks with
and without the sweeper apart, where a dispatch's time goes (claim SQL, planning, publish),
run rows verified, and the plans of the tick's queries. Prints one JSON line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, event, text

from bench import beat_child
from bench.dataset import SCHEDULES, slot_after, slot_at_or_before
from bench.measure import QUEUE, TickStats
from gathering_tasks.app import celery_config
from gathering_tasks.beat import DatabaseScheduler, SlotPlanner
from gathering_tasks.db.actions import ActionStore
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


def make_due(engine: Engine, *, n: int, due: int, slot: datetime) -> None:
    """Move ``due`` actions, spread over the table, to a past slot.

    The loader cycles through SCHEDULES every len(SCHEDULES) consecutive ids, so whole blocks
    of that many ids are picked: the due set has the table's mix of schedules.
    """
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE scheduled_actions SET next_run_at = :slot WHERE id IN ("
                " SELECT id FROM scheduled_actions WHERE (id - 1) / :kinds % :stride = 0"
                " ORDER BY id LIMIT :due)"
            ),
            {"slot": slot, "kinds": len(SCHEDULES), "stride": max(1, n // due), "due": due},
        )


class Ours:
    """The driver of :func:`bench.beat_child.run` for our ``DatabaseScheduler``."""

    name = "ours"

    def __init__(self, n: int) -> None:
        self.n = n
        self.settings = settings = get_settings()
        self.client = redis.Redis.from_url(settings.redis_url)
        self.engine: Engine = session_factory(settings.database_url).kw["bind"]
        self.sweep_every = max(1, round(settings.sweep_interval_s / settings.beat_tick_s))
        self.idle = True  # while idle, the sweep is forced at its production ratio
        self.idle_samples: list[tuple[bool, float]] = []
        self.sent = 0
        self.samples: list[dict[str, Any]] = []
        self.plans: dict[str, list[str]] = {}
        self.claims: TimedClaims | None = None
        self.planner: TimedPlanner | None = None

    def start(self) -> None:
        self.scheduler = DatabaseScheduler(beat_app(self.settings))
        beat = self.scheduler.engine
        publish = beat._publish

        def counted(dispatches: Any) -> int:
            sent = publish(dispatches)
            self.sent += sent
            return sent

        beat._publish = counted  # type: ignore[method-assign]
        self.scheduler.tick()
        if not beat.is_leader:
            raise RuntimeError("the benchmark beat did not take the leader lease")

    def tick(self) -> None:
        if not self.idle:
            self.scheduler.tick()
            return
        sweep = len(self.idle_samples) % self.sweep_every == 0
        if sweep:
            # Ticks here run back to back, not once per beat_tick_s: force the sweep at its
            # production ratio (one tick in sweep_interval_s / beat_tick_s) so p99 includes it.
            self.scheduler.engine._next_sweep = 0.0
        started = time.perf_counter()
        self.scheduler.tick()
        self.idle_samples.append((sweep, time.perf_counter() - started))

    def published(self) -> int:
        return self.sent

    def make_due(self, k: int) -> None:
        if self.idle:
            self.idle = False
            self.plans = explain_tick_queries(self.scheduler, self.engine)
            self.settle()
        now = datetime.now(UTC)
        make_due(self.engine, n=self.n, due=k, slot=slot_at_or_before(now))
        beat = self.scheduler.engine
        # Timed, and otherwise as beat's own: its every-tick read on beat's reads engine.
        self.claims = TimedClaims(
            session_factory(self.settings.database_url), reads=beat.repo.claims.reads
        )
        beat.repo.claims = self.claims
        # A fresh planner: a burst of actions it has never parsed is the expensive case.
        beat.planner = self.planner = TimedPlanner(now)

    def settle(self) -> int:
        queued = int(self.client.llen(QUEUE))
        with self.engine.begin() as conn:
            runs = conn.execute(text("SELECT count(*) FROM executions")).scalar_one()
            if self.claims is not None and self.planner is not None:
                self.samples.append(
                    {
                        "published": self.sent,
                        "queued": queued,
                        "run_rows": int(runs),
                        "claim_s": self.claims.spent_s,
                        "plan_s": self.planner.spent_s,
                    }
                )
                self.claims = self.planner = None
            # overlap_policy "skip": a pending run would hold its action's next slot back.
            conn.execute(text("DELETE FROM executions"))
            # Claimed actions moved to their next slot, some a minute away: park them.
            park = slot_after(datetime.now(UTC)) + timedelta(hours=1)
            conn.execute(
                text("UPDATE scheduled_actions SET next_run_at = :park WHERE next_run_at < :park"),
                {"park": park},
            )
        self.client.delete(QUEUE)
        self.sent = 0
        return queued

    def edit(self) -> bool:
        """An operator moves one action's next slot to its latest past slot
        (``ActionStore.set_next_run``); the slot is in the catch-up grace, so it runs.

        The store alone, not a whole ``Repository``: the rest of it (the pipelines' store and
        their definitions' models) is the API's and the workers', not beat's, and would count
        in this process's RSS."""
        now = datetime.now(UTC)
        actions = ActionStore(session_factory(self.settings.database_url))
        actions.set_next_run(f"bench-{self.n // 2:06d}", slot_at_or_before(now), now=now)
        return True

    def extra(self) -> dict[str, Any]:
        def stats(sweep: bool) -> dict[str, Any]:
            return TickStats.of([s for kind, s in self.idle_samples if kind is sweep]).as_dict()

        return {
            "idle_plain": stats(False),
            "idle_sweep": stats(True),
            "sweep_every": self.sweep_every,
            "dispatch_detail": self.samples,
            "plans": self.plans,
        }

    def close(self) -> None:
        self.scheduler.close()
        self.client.close()


def main() -> None:
    args = beat_child.parse_args(__doc__)
    beat_child.run(Ours(args.n), args)


if __name__ == "__main__":
    main()
