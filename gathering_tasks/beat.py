"""The database-backed Celery beat scheduler.

Each tick the leader extends its lease (one Redis round trip) and reads the earliest
``next_run_at`` with the database clock (one PostgreSQL round trip, on a connection kept in
autocommit for it). Only when that is due does it claim every due slot (run row inserted and
``next_run_at`` advanced in one transaction), and it publishes after commit. Replicas that are
not the leader only try to take the lease. The leader also runs the recovery sweeper, whose
sweep with nothing to do is one more read.

Use it with ``celery -A gathering_tasks beat`` (it is the app's default) or
``-S gathering_tasks.beat:DatabaseScheduler``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from celery.beat import Scheduler
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks import keys, metrics, runtime
from gathering_tasks.clock import utcnow
from gathering_tasks.db.claims import DueAction, SlotClaims, SlotPlan
from gathering_tasks.db.engine import reads_engine
from gathering_tasks.db.ledger import Carrying, Dispatch, Record
from gathering_tasks.db.sweeps import Sweeps
from gathering_tasks.errors import InvalidInput
from gathering_tasks.keys import MIN_SLEEP_S, SCHEDULE_CACHE_SIZE
from gathering_tasks.locks import Lease
from gathering_tasks.publish import publish
from gathering_tasks.schedules import (
    ON_TIME_S,
    CatchUpPolicy,
    Schedule,
    Window,
    parse_schedule,
    plan_due,
)
from gathering_tasks.settings import Settings
from gathering_tasks.sweeper import PipelineDeadlines, Sweeper

if TYPE_CHECKING:
    from gathering_tasks.db.pipelines import PipelineStore

log = logging.getLogger(__name__)

# A batched publish that fails (the broker went away mid-flush) leaves delivery uncertain: the
# runs stay pending and the sweeper re-publishes them, as after any broker outage.
TRANSIENT = (SQLAlchemyError, RedisError, BrokerError, BatchPublishError, OSError)


class SlotPlanner:
    """Turns a due action row into a :class:`SlotPlan`, caching parsed schedules.

    Schedules are cached by what they say, not by action: the actions that share an
    expression and a time zone (or a period and an anchor) share one parsed schedule.
    """

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._cache: dict[Hashable, Schedule] = {}

    def schedule(self, action: DueAction) -> Schedule:
        key = _schedule_key(action)
        parsed = self._cache.get(key)
        if parsed is None:
            parsed = parse_schedule(action.schedule, now=action.next_run_at)
            if len(self._cache) > SCHEDULE_CACHE_SIZE:
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
            run_slots=slots,
            next_run_at=plan.next_run_at,
            status=plan.finished or "active",
            skipped_slots=plan.skipped_slots,
        )


def _schedule_key(action: DueAction) -> Hashable:
    """What a stored schedule parses from: its fields (an interval without an anchor is
    anchored at the action's own next slot, so that slot is part of its key)."""
    spec = action.schedule
    fields: Hashable
    try:
        fields = tuple(sorted(spec.items()))
        hash(fields)
    except TypeError:  # an odd stored value (a list, say): parse_schedule will judge it
        fields = (json.dumps(spec, sort_keys=True, default=str),)
    if spec.get("kind") == "interval" and "anchor" not in spec:
        return (fields, action.next_run_at)
    return fields


class BeatStores(Protocol):
    """The stores beat works with (a :class:`~gathering_tasks.db.repo.Repository` has them)."""

    @property
    def claims(self) -> SlotClaims: ...

    @property
    def sweeps(self) -> Sweeps: ...

    @property
    def pipelines(self) -> PipelineDeadlines: ...


class _Pipelines:
    """The pipeline store, imported when the sweeper first needs it: a run to recover or
    a pipeline run past its deadline.

    ``gathering_tasks.db.pipelines`` brings the pipeline definitions (their pydantic models,
    jmespath, the action types' checks): a beat whose sweeps find nothing of the kind never
    loads them. It is what :class:`~gathering_tasks.db.ledger.Progress` and the sweeper ask
    of a :class:`~gathering_tasks.db.pipelines.PipelineStore`, passed on to one.
    """

    def __init__(self, factory: sessionmaker[Session], max_input_bytes: int) -> None:
        self._factory = factory
        self._max_input_bytes = max_input_bytes

    @functools.cached_property
    def store(self) -> PipelineStore:
        from gathering_tasks.db.pipelines import PipelineStore

        store = PipelineStore(self._factory)
        store.max_input_bytes = self._max_input_bytes
        return store

    # -- the sweeper's (PipelineDeadlines) ---------------------------------------------------

    def overdue_runs(self, now: datetime, *, limit: int) -> list[int]:
        return self.store.overdue_runs(now, limit=limit)

    def cancel_run(self, run_id: int, *, now: datetime, status: str = "cancelled") -> str:
        return self.store.cancel_run(run_id, now=now, status=status)

    # -- the recovery's (Progress) -------------------------------------------------------

    def lock_run_of(self, session: Session, record_id: int) -> tuple[int, str] | None:
        return self.store.lock_run_of(session, record_id)

    def settled(self, node: tuple[int, str], status: str, result: dict[str, Any] | None) -> None:
        self.store.settled(node, status, result)

    def advance_record(
        self,
        session: Session,
        record_id: int,
        *,
        nodes: Iterable[str] = (),
        carrying: Carrying | None = None,
    ) -> list[Dispatch]:
        return self.store.advance_record(session, record_id, nodes=nodes, carrying=carrying)

    def prepare(self, session: Session, record: Record) -> Record:
        return self.store.prepare(session, record)


class _Stores:
    """Beat's own stores over the process's database: its every-tick reads (the due
    lookup, the sweeper's probe) go through an engine of their own (``reads``)."""

    def __init__(self, settings: Settings) -> None:
        factory = runtime.sessions()
        self.reads = reads_engine(settings.database_url, settings.db_timeouts)
        self.pipelines = _Pipelines(factory, settings.max_result_bytes)
        self.claims = SlotClaims(factory, reads=self.reads)
        self.sweeps = Sweeps(factory, progress=self.pipelines, reads=self.reads)

    def close(self) -> None:
        if self.reads is not None:
            self.reads.dispose()


class BeatEngine:
    """One beat replica's work, without Celery: lead, claim, publish, sweep."""

    def __init__(
        self,
        settings: Settings,
        repo: BeatStores,
        lease: Lease,
        app: Any,
        *,
        run_lease_alive: Callable[[int], bool] = lambda _record_id: False,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.lease = lease
        self.app = app
        self.clock = clock
        self.is_leader = False
        self.planner = SlotPlanner(clock())
        self.sweeper = Sweeper(
            settings,
            repo.sweeps,
            lease_alive=run_lease_alive,
            publish=self._publish,
            pipelines=repo.pipelines,
        )
        self._next_sweep = 0.0

    def lead(self) -> bool:
        """Hold the leader lease: extend it if ours, else try to take it."""
        leading = self._lead()
        metrics.leading(leading)
        return leading

    def _lead(self) -> bool:
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
        """Claim and publish every due slot, in bounded transactions. Returns how many were
        published. The leader lease is re-checked between transactions: a leader whose lease
        lapsed mid-tick stops at once."""
        self.planner.now = now
        published = 0
        settings = self.settings
        while True:
            batch = self.repo.claims.claim_due(
                now,
                limit=settings.beat_batch_size,
                slot_budget=settings.beat_slot_budget,
                plan=self.planner,
            )
            published += self._publish(batch.dispatches)
            metrics.claimed(batch.dispatches, now)
            if not batch.more or not batch.actions:
                return published
            if not self.lead():
                return published

    def sweep(self, now: datetime | None = None) -> int:
        """Re-publish lost messages, recover runs whose worker died, prune old runs."""
        return self.sweeper.sweep(now)

    def tick(self) -> float:
        """One beat cycle. Returns seconds to sleep."""
        tick_s = self.settings.beat_tick_s
        if not self.lead():
            return tick_s
        now = self.clock()
        claims = self.repo.claims
        try:
            # One read decides whether the (locking, transactional) claim is needed, and
            # brings the database clock the sweeper judges heartbeats by.
            state = claims.tick_state()
            if state.next_due_at is not None and state.next_due_at <= now:
                self.dispatch_due(now)
                state = claims.tick_state()
            if self.is_leader and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.settings.sweep_interval_s
                self.sweep(state.db_now)
        except TRANSIENT as exc:
            log.error("beat tick failed, will retry: %s", exc)
            return tick_s
        if state.next_due_at is None:
            return tick_s
        wait_s = (state.next_due_at - self.clock()).total_seconds()
        return max(MIN_SLEEP_S, min(tick_s, wait_s))

    def _publish(self, dispatches: list[Dispatch]) -> int:
        if not dispatches:
            return 0
        sent = publish(self.app, dispatches, default_queue=self.settings.default_queue)
        log.info("published %d run(s)", sent)
        return sent

    def stop(self) -> None:
        if self.is_leader:
            self.lease.release()
            self.is_leader = False


class DatabaseScheduler(Scheduler):  # type: ignore[misc]
    """Celery beat scheduler that reads action schedules from the database."""

    engine: BeatEngine
    stores: _Stores

    def setup_schedule(self) -> None:
        settings = runtime.settings()
        lease = Lease(
            runtime.redis_client(),
            keys.beat_leader(settings.key_prefix),
            settings.leader_lease_ttl_s,
            owner=f"{socket.gethostname()}:{os.getpid()}",
        )
        client = runtime.redis_client()

        def run_lease_alive(run_id: int) -> bool:
            try:
                return bool(client.exists(keys.run_lock(settings.key_prefix, run_id)))
            except RedisError:
                return False  # no Redis, no lease to trust: the database heartbeat decides

        self.stores = _Stores(settings)
        self.engine = BeatEngine(
            settings, self.stores, lease, self.app, run_lease_alive=run_lease_alive
        )
        self.max_interval = settings.beat_tick_s
        metrics.serve_beat()
        log.info("database scheduler ready (tick %.2fs)", settings.beat_tick_s)

    def tick(self, *_args: Any, **_kwargs: Any) -> float:
        return self.engine.tick()

    def sync(self) -> None:
        """Nothing to persist: the database is written as slots are claimed."""

    def close(self) -> None:
        self.engine.stop()
        self.stores.close()

    @property
    def info(self) -> str:
        # Celery reads this from a scheduler it never sets up (lazy=True): no self.stores.
        dialect = runtime.sessions().kw["bind"].dialect.name
        return f"    . db -> {dialect} (leader lease via Redis)"
