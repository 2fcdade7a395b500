"""The database-backed Celery beat scheduler.

Each tick the leader runs one indexed due query, claims every due slot (run row inserted and
``next_run_at`` advanced in one transaction), and publishes after commit. Replicas that are not
the leader only try to take the lease. The leader also runs the recovery sweeper.

Use it with ``celery -A gathering_tasks beat`` (it is the app's default) or
``-S gathering_tasks.beat:DatabaseScheduler``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.beat import Scheduler
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from gathering_tasks import keys, runtime
from gathering_tasks.db.repo import Claim, DueAction, Repository, SlotPlan, StaleRun
from gathering_tasks.errors import InvalidInput
from gathering_tasks.locks import Lease
from gathering_tasks.publish import publish_claims
from gathering_tasks.runs import lost_run_decision
from gathering_tasks.schedules import CatchUpPolicy, Schedule, Window, parse_schedule, plan_due
from gathering_tasks.settings import Settings

log = logging.getLogger(__name__)

# A slot claimed within this many seconds of its time is "on time" (trigger=schedule);
# later ones were missed while no beat was leading (trigger=recovery).
ON_TIME_S = 5.0
MIN_SLEEP_S = 0.005
SWEEP_LIMIT = 500
# A batched publish that fails (the broker went away mid-flush) leaves delivery uncertain: the
# runs stay pending and the sweeper re-publishes them, as after any broker outage.
TRANSIENT = (SQLAlchemyError, RedisError, BrokerError, BatchPublishError, OSError)


def utcnow() -> datetime:
    return datetime.now(UTC)


class SlotPlanner:
    """Turns a due action row into a :class:`SlotPlan`, caching parsed schedules."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._cache: dict[tuple[int, str], Schedule] = {}

    def schedule(self, action: DueAction) -> Schedule:
        key = (action.id, json.dumps(action.schedule, sort_keys=True))
        parsed = self._cache.get(key)
        if parsed is None:
            parsed = parse_schedule(action.schedule, now=action.next_run_at)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = parsed
        return parsed

    def __call__(self, action: DueAction) -> SlotPlan:
        try:
            return self._plan(action)
        except InvalidInput as exc:
            # One unreadable schedule (say, a time zone the tz database dropped) must not
            # block every other due action: this one is disabled, and the reason logged.
            log.error(
                "action disabled: its schedule no longer parses: %s",
                exc,
                extra={"action_id": action.id},
            )
            return SlotPlan(run_slots=(), next_run_at=None, status="disabled")

    def _plan(self, action: DueAction) -> SlotPlan:
        plan = plan_due(
            self.schedule(action),
            next_run_at=action.next_run_at,
            now=self.now,
            policy=CatchUpPolicy(
                mode=action.catchup_mode,  # type: ignore[arg-type]
                grace_s=action.catchup_grace_s,
                max_catchup=action.catchup_max,
            ),
            window=Window(start_at=action.start_at, end_at=action.end_at, max_runs=action.max_runs),
            run_count=action.run_count,
        )
        slots = tuple(
            (slot, "schedule" if (self.now - slot).total_seconds() <= ON_TIME_S else "recovery")
            for slot in plan.run_slots
        )
        return SlotPlan(
            run_slots=slots, next_run_at=plan.next_run_at, status=plan.finished or "active"
        )


class BeatEngine:
    """One beat replica's work, without Celery: lead, claim, publish, sweep."""

    def __init__(
        self,
        settings: Settings,
        repo: Repository,
        lease: Lease,
        app: Any,
        *,
        run_lease_alive: Callable[[int], bool] = lambda _run_id: False,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.lease = lease
        self.app = app
        self.run_lease_alive = run_lease_alive
        self.is_leader = False
        self.planner = SlotPlanner(utcnow())
        self._next_sweep = 0.0

    def lead(self) -> bool:
        """Hold the leader lease: extend it if ours, else try to take it."""
        if self.is_leader:
            if self.lease.extend():
                return True
            self.is_leader = False
            log.warning("beat lost the leader lease; dispatching stops")
            return False
        if self.lease.acquire():
            self.is_leader = True
            self._next_sweep = 0.0  # sweep at once on taking over
            log.warning("beat is now the leader")
        return self.is_leader

    def dispatch_due(self, now: datetime) -> int:
        """Claim and publish every due slot (in batches). Returns how many were published."""
        self.planner.now = now
        published = 0
        while True:
            claims = self.repo.claim_due(
                now, limit=self.settings.beat_batch_size, plan=self.planner
            )
            published += self._publish(claims)
            if len(claims) < self.settings.beat_batch_size:
                return published

    def sweep(self, now: datetime) -> int:
        """Re-publish lost messages and recover runs whose worker died."""
        settings = self.settings
        claims = self.repo.stale_queued(now, grace_s=settings.pending_grace_s, limit=SWEEP_LIMIT)
        stale_before = now - timedelta(seconds=settings.run_lease_ttl_s)
        for stale in self.repo.stale_running(
            now, heartbeat_timeout_s=settings.run_lease_ttl_s, limit=SWEEP_LIMIT
        ):
            if self.run_lease_alive(stale.run_id):
                continue  # its worker still renews the lease: slow database writes, not death
            claim = self._recover(stale, now, stale_before)
            claims += [claim] if claim else []
        if claims:
            log.warning("sweeper re-publishing %d run(s)", len(claims))
        return self._publish(claims)

    def _recover(self, stale: StaleRun, now: datetime, stale_before: datetime) -> Claim | None:
        decision = lost_run_decision(
            stale, now, default_time_limit_s=self.settings.task_time_limit_s
        )
        extra = {"run_id": stale.run_id, "attempt": stale.attempt, "decision": decision}
        if decision == "requeue":
            requeued = self.repo.requeue_lost(
                stale.run_id,
                stale.attempt,
                now=now,
                error="worker lost during the run",
                stale_before=stale_before,
            )
            recovered = self.repo.claim_for_publish(stale.run_id) if requeued else None
        else:
            error = "run exceeded its time limit" if decision == "timed_out" else "worker lost"
            self.repo.finish_run(
                stale.run_id,
                stale.attempt,
                status=decision,
                now=now,
                error=error,
                stale_before=stale_before,
            )
            recovered = None
        log.warning("recovered a run whose worker is gone", extra=extra)
        return recovered

    def tick(self) -> float:
        """One beat cycle. Returns seconds to sleep."""
        tick_s = self.settings.beat_tick_s
        if not self.lead():
            return tick_s
        now = utcnow()
        try:
            # One index lookup decides whether the (locking, transactional) claim is needed.
            upcoming = self.repo.next_due_at()
            if upcoming is not None and upcoming <= now:
                self.dispatch_due(now)
                upcoming = self.repo.next_due_at()
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.settings.sweep_interval_s
                self.sweep(now)
        except TRANSIENT as exc:
            log.error("beat tick failed, will retry: %s", exc)
            return tick_s
        if upcoming is None:
            return tick_s
        wait_s = (upcoming - utcnow()).total_seconds()
        return max(MIN_SLEEP_S, min(tick_s, wait_s))

    def _publish(self, claims: list[Claim]) -> int:
        if not claims:
            return 0
        sent = publish_claims(self.app, claims, default_queue=self.settings.default_queue)
        log.info("published %d run(s)", sent)
        return sent

    def stop(self) -> None:
        if self.is_leader:
            self.lease.release()
            self.is_leader = False


class DatabaseScheduler(Scheduler):  # type: ignore[misc]
    """Celery beat scheduler that reads action schedules from the database."""

    engine: BeatEngine

    def setup_schedule(self) -> None:
        settings = runtime.settings()
        lease = Lease(
            runtime.redis_client(),
            keys.beat_leader(settings.key_prefix),
            settings.leader_lease_ttl_s,
        )
        client = runtime.redis_client()

        def run_lease_alive(run_id: int) -> bool:
            try:
                return bool(client.exists(keys.run_lock(settings.key_prefix, run_id)))
            except RedisError:
                return False  # no Redis, no lease to trust: the database heartbeat decides

        self.engine = BeatEngine(
            settings, runtime.repository(), lease, self.app, run_lease_alive=run_lease_alive
        )
        self.max_interval = settings.beat_tick_s
        log.info("database scheduler ready (tick %.2fs)", settings.beat_tick_s)

    def tick(self, *_args: Any, **_kwargs: Any) -> float:
        return self.engine.tick()

    def sync(self) -> None:
        """Nothing to persist: the database is written as slots are claimed."""

    def close(self) -> None:
        self.engine.stop()

    @property
    def info(self) -> str:
        return f"    . db -> {runtime.repository().dialect} (leader lease via Redis)"
