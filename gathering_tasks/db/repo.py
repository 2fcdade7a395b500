"""All SQL of gathering-tasks lives here, behind :class:`Repository`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Row, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.selectable import GenerativeSelect

from gathering_tasks.db.models import Base, ScheduledAction, ScheduledActionRun
from gathering_tasks.errors import InvalidInput, NotFound

UNFINISHED = ("pending", "running", "retrying")
MAX_ATTEMPT_HISTORY = 50
RETRY_CLOCK_SKEW = timedelta(seconds=1)
MAX_REPUBLISH_DOUBLINGS = 6  # the sweeper re-publishes one run at most every 64 x grace
_Sel = TypeVar("_Sel", bound=GenerativeSelect)
FINAL = ("succeeded", "failed", "timed_out", "cancelled", "skipped")


@dataclass(frozen=True)
class DueAction:
    """The columns beat needs to plan an action's due slots."""

    id: int
    schedule: dict[str, Any]
    next_run_at: datetime
    run_count: int
    start_at: datetime | None
    end_at: datetime | None
    max_runs: int | None
    catchup_mode: str
    catchup_grace_s: float
    catchup_max: int
    overlap_policy: str


@dataclass(frozen=True)
class SlotPlan:
    """What beat decided for one due action (computed by the pure planner)."""

    run_slots: tuple[tuple[datetime, str], ...]  # (scheduled_for, trigger)
    next_run_at: datetime | None
    status: str  # the action's new status ("active" while more slots remain)


@dataclass(frozen=True)
class Claim:
    """A run to publish: the Celery message carries only ``run_id``."""

    run_id: int
    action_id: int
    action_type: str
    queue: str | None
    priority: int | None
    timeout_s: int | None
    countdown_s: float = 0.0


@dataclass(frozen=True)
class RunContext:
    """A run that a worker has just moved to ``running``, with its action's definition."""

    run_id: int
    attempt: int
    action_id: int
    action_name: str
    action_type: str
    config: dict[str, Any]
    scheduled_for: datetime
    trigger: str
    retry_max_attempts: int
    retry_backoff_s: float
    retry_backoff_max_s: float
    timeout_s: int | None


@dataclass(frozen=True)
class StaleRun:
    """A ``running`` run whose heartbeat stopped: its worker is presumed gone."""

    run_id: int
    attempt: int
    started_at: datetime
    timeout_s: int | None
    retry_max_attempts: int


Planner = Callable[[DueAction], SlotPlan]

_ACTION_FIELDS = (
    "name",
    "description",
    "action_type",
    "action_config",
    "schedule",
    "start_at",
    "end_at",
    "max_runs",
    "catchup_mode",
    "catchup_grace_s",
    "catchup_max",
    "overlap_policy",
    "retry_max_attempts",
    "retry_backoff_s",
    "retry_backoff_max_s",
    "timeout_s",
    "queue",
    "priority",
)


def action_to_dict(action: ScheduledAction) -> dict[str, Any]:
    """A JSON-friendly view of an action row."""
    out: dict[str, Any] = {"id": action.id}
    for name in (*_ACTION_FIELDS, "status", "run_count", "next_run_at", "last_run_at"):
        value = getattr(action, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def run_to_dict(run: ScheduledActionRun) -> dict[str, Any]:
    """A JSON-friendly view of a run row."""
    out: dict[str, Any] = {}
    for column in ScheduledActionRun.__table__.columns:
        value = getattr(run, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


class Repository:
    """Reads and writes actions and runs. Every statement the product issues is here."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory
        bind = factory.kw["bind"]
        self.dialect: str = bind.dialect.name

    # -- actions -----------------------------------------------------------------------------

    def create_action(
        self, values: dict[str, Any], *, next_run_at: datetime | None, now: datetime
    ) -> dict[str, Any]:
        """Insert a validated action. A taken name is an :class:`InvalidInput`."""
        row = ScheduledAction(
            **{k: values[k] for k in _ACTION_FIELDS if k in values},
            status="active" if next_run_at else "completed",
            run_count=0,
            next_run_at=next_run_at,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._write_tx() as session:
                session.add(row)
        except IntegrityError as exc:
            raise InvalidInput(f"an action named {values['name']!r} exists", field="name") from exc
        return action_to_dict(row)

    def update_action(
        self,
        name: str,
        values: dict[str, Any],
        *,
        next_run_at: datetime | None,
        status: str,
        now: datetime,
    ) -> dict[str, Any]:
        """Replace an action's definition; its next slot and status are decided by the caller."""
        with self._write_tx() as session:
            row = self._get(session, name)
            for key in _ACTION_FIELDS:
                if key in values:
                    setattr(row, key, values[key])
            row.next_run_at = next_run_at
            row.status = status
            row.updated_at = now
            return action_to_dict(row)

    def get_action(self, name: str) -> dict[str, Any]:
        with self._factory() as session:
            return action_to_dict(self._get(session, name))

    def list_actions(self, status: str | None = None) -> list[dict[str, Any]]:
        stmt = select(ScheduledAction).order_by(ScheduledAction.name)
        if status:
            stmt = stmt.where(ScheduledAction.status == status)
        with self._factory() as session:
            return [action_to_dict(a) for a in session.scalars(stmt)]

    def set_status(
        self, name: str, status: str, *, now: datetime, next_run_at: datetime | None = None
    ) -> dict[str, Any]:
        """Pause, resume (with a fresh ``next_run_at``), disable."""
        with self._write_tx() as session:
            row = self._get(session, name)
            row.status = status
            if next_run_at is not None:
                row.next_run_at = next_run_at
            row.updated_at = now
            return action_to_dict(row)

    def delete_action(self, name: str) -> None:
        with self._write_tx() as session:
            result = session.execute(delete(ScheduledAction).where(ScheduledAction.name == name))
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no action named {name!r}")

    @staticmethod
    def _get(session: Session, name: str) -> ScheduledAction:
        row = session.scalars(select(ScheduledAction).where(ScheduledAction.name == name)).first()
        if row is None:
            raise NotFound(f"no action named {name!r}")
        return row

    # -- beat: claim due slots ---------------------------------------------------------------

    def claim_due(self, now: datetime, *, limit: int, plan: Planner) -> list[Claim]:
        """Claim every due slot of up to ``limit`` actions in ONE transaction.

        Run rows are inserted with ON CONFLICT DO NOTHING on (action_id, scheduled_for), and
        ``next_run_at`` advances in the same commit, so a replayed tick or a second beat can
        never create a second run for a slot. The caller publishes after this returns.
        """
        a = ScheduledAction
        stmt = (
            select(
                a.id,
                a.schedule,
                a.next_run_at,
                a.run_count,
                a.start_at,
                a.end_at,
                a.max_runs,
                a.catchup_mode,
                a.catchup_grace_s,
                a.catchup_max,
                a.overlap_policy,
                a.action_type,
                a.queue,
                a.priority,
                a.timeout_s,
            )
            .where(a.status == "active", a.next_run_at <= now)
            .order_by(a.next_run_at)
            .limit(limit)
        )
        with self._write_tx() as session:
            rows = session.execute(self._skip_locked(stmt, a)).all()
            if not rows:
                return []
            busy = self._busy_actions(session, [r.id for r in rows if r.overlap_policy == "skip"])
            return self._claim_rows(session, rows, busy, now, plan)

    def _skip_locked(self, stmt: _Sel, of: type[Base]) -> _Sel:
        """Lock the selected rows, passing over rows another transaction holds (PostgreSQL).

        SQLite has no row locks: there the write transaction itself (BEGIN IMMEDIATE) is
        the lock, and a second claimer waits for it instead of skipping.
        """
        if self.dialect != "postgresql":
            return stmt
        return stmt.with_for_update(skip_locked=True, of=of)

    @contextmanager
    def _write_tx(self) -> Iterator[Session]:
        """A transaction that takes its write locks up front (SQLite: BEGIN IMMEDIATE)."""
        with self._factory() as session:
            if self.dialect == "sqlite":
                session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @staticmethod
    def _busy_actions(session: Session, action_ids: Sequence[int]) -> set[int]:
        if not action_ids:
            return set()
        r = ScheduledActionRun
        stmt = (
            select(r.action_id)
            .where(r.action_id.in_(action_ids), r.status.in_(UNFINISHED))
            .distinct()
        )
        return set(session.scalars(stmt))

    def _claim_rows(
        self,
        session: Session,
        rows: Sequence[Row[Any]],
        busy: set[int],
        now: datetime,
        plan: Planner,
    ) -> list[Claim]:
        new_runs: list[dict[str, Any]] = []
        action_updates: list[dict[str, Any]] = []
        by_id = {row.id: row for row in rows}
        for row in rows:
            # A busy action's slots are recorded as skipped: they are not runs, so they
            # neither count towards max_runs nor may complete the action.
            is_busy = row.id in busy
            decided = plan(_due_action(row, count_runs=not is_busy))
            status = "skipped" if is_busy else "pending"
            for slot, trigger in decided.run_slots:
                new_runs.append(_new_run(row.id, slot, trigger, status, now))
            ran = 0 if is_busy else len(decided.run_slots)
            action_updates.append(_action_update(row, decided, ran, now))
        inserted = self._insert_runs(session, new_runs)
        session.execute(update(ScheduledAction), action_updates)
        return [
            _claim(run_id, by_id[action_id])
            for run_id, action_id, status in inserted
            if status == "pending"
        ]

    def _insert_runs(
        self, session: Session, new_runs: list[dict[str, Any]]
    ) -> list[tuple[int, int, str]]:
        if not new_runs:
            return []
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        table = Base.metadata.tables[ScheduledActionRun.__tablename__]
        stmt = (
            dialect_insert(table)
            .on_conflict_do_nothing(index_elements=[table.c.action_id, table.c.scheduled_for])
            .returning(table.c.id, table.c.action_id, table.c.status)
        )
        # executemany: one cached statement, sent as batched multi-row INSERTs
        # ("insertmanyvalues"), instead of compiling a new 8-params-per-row statement.
        result = session.connection().execute(stmt, new_runs)
        return [(row[0], row[1], row[2]) for row in result]

    def next_due_at(self) -> datetime | None:
        """The earliest ``next_run_at`` of an active action (an index lookup)."""
        a = ScheduledAction
        stmt = select(func.min(a.next_run_at)).where(a.status == "active")
        with self._factory() as session:
            value: datetime | None = session.execute(stmt).scalar_one_or_none()
        return value

    def trigger_now(self, name: str, *, now: datetime, trigger: str = "manual") -> Claim:
        """A run outside the schedule (CLI, API). It still goes through the guard."""
        with self._write_tx() as session:
            action = self._get(session, name)
            run = ScheduledActionRun(**_new_run(action.id, now, trigger, "pending", now))
            session.add(run)
            session.flush()
            return _claim(run.id, action)

    # -- worker: the run record side of the guard ---------------------------------------------

    def start_run(
        self, run_id: int, *, worker: str, task_id: str | None, now: datetime
    ) -> RunContext | None:
        """Move a run ``pending|retrying -> running``. None: someone else has it, or it is done."""
        r = ScheduledActionRun
        stmt = (
            update(r)
            .where(
                r.id == run_id,
                or_(
                    r.status == "pending",
                    # A retry waits out its backoff: an early copy of the message is dropped.
                    and_(r.status == "retrying", r.retry_at <= now + RETRY_CLOCK_SKEW),
                ),
            )
            .values(
                status="running",
                attempt=r.attempt + 1,
                worker=worker,
                celery_task_id=task_id,
                started_at=now,
                heartbeat_at=now,
                retry_at=None,
                # A started run's messages did their job: the next attempt backs off afresh.
                publish_count=0,
                republish_at=None,
                updated_at=now,
            )
            .returning(r.attempt)
        )
        with self._write_tx() as session:
            attempt = session.execute(stmt).scalar_one_or_none()
            if attempt is None:
                return None
            run, action = session.execute(
                select(r, ScheduledAction)
                .join(ScheduledAction, ScheduledAction.id == r.action_id)
                .where(r.id == run_id)
            ).one()
            return RunContext(
                run_id=run.id,
                attempt=attempt,
                action_id=action.id,
                action_name=action.name,
                action_type=action.action_type,
                config=dict(action.action_config),
                scheduled_for=run.scheduled_for,
                trigger=run.trigger,
                retry_max_attempts=action.retry_max_attempts,
                retry_backoff_s=action.retry_backoff_s,
                retry_backoff_max_s=action.retry_backoff_max_s,
                timeout_s=action.timeout_s,
            )

    def heartbeat(self, run_id: int, attempt: int, now: datetime) -> bool:
        """Record that the attempt's worker is alive. False: the attempt was taken from it."""
        return self._update_attempt(run_id, attempt, heartbeat_at=now)

    def finish_run(
        self,
        run_id: int,
        attempt: int,
        *,
        status: str,
        now: datetime,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        stale_before: datetime | None = None,
    ) -> bool:
        """Close an attempt. Fenced by ``attempt``: a zombie worker cannot overwrite a newer one.

        ``stale_before`` (the sweeper's writes): only if the heartbeat is still older than it.
        """
        return self._close_attempt(
            run_id,
            attempt,
            status=status,
            now=now,
            error=error,
            result=result,
            finished_at=now,
            stale_before=stale_before,
        )

    def schedule_retry(
        self, run_id: int, attempt: int, *, retry_at: datetime, error: str, now: datetime
    ) -> bool:
        """Park a failed attempt as ``retrying`` until ``retry_at``."""
        return self._close_attempt(
            run_id, attempt, status="retrying", now=now, error=error, retry_at=retry_at
        )

    def _close_attempt(
        self,
        run_id: int,
        attempt: int,
        *,
        status: str,
        now: datetime,
        error: str | None,
        stale_before: datetime | None = None,
        **values: Any,
    ) -> bool:
        """End attempt ``attempt`` with ``status`` and append it to the run's attempt history."""
        r = ScheduledActionRun
        fence = [r.id == run_id, r.attempt == attempt, r.status == "running"]
        if stale_before is not None:
            # A heartbeat that landed since the sweeper looked means the worker is alive.
            fence.append(r.heartbeat_at < stale_before)
        query = select(r.attempts, r.started_at, r.worker).where(*fence)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        with self._write_tx() as session:
            row = session.execute(query).first()
            if row is None:
                return False
            entry = {
                "attempt": attempt,
                "status": status,
                "worker": row.worker,
                "started_at": row.started_at.isoformat() if row.started_at else None,
                "ended_at": now.isoformat(),
                "error": error,
            }
            history = [*(row.attempts or []), entry][-MAX_ATTEMPT_HISTORY:]
            session.execute(
                update(r)
                .where(*fence)
                .values(status=status, error=error, attempts=history, updated_at=now, **values)
            )
            return True

    def _update_attempt(self, run_id: int, attempt: int, **values: Any) -> bool:
        r = ScheduledActionRun
        stmt = (
            update(r)
            .where(r.id == run_id, r.attempt == attempt, r.status == "running")
            .values(**values)
        )
        with self._write_tx() as session:
            return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]

    # -- sweeper -----------------------------------------------------------------------------

    def stale_queued(self, now: datetime, *, grace_s: float, limit: int) -> list[Claim]:
        """Runs queued but never started past ``grace_s`` (a publish lost after commit).

        A run is re-published after ``grace_s``, then after 2, 4, 8 ... times that (capped):
        a lost message is replaced quickly, while a backlog that workers are merely slow to
        drain is not flooded with copies every sweep.
        """
        r = ScheduledActionRun
        cutoff = now - timedelta(seconds=grace_s)
        stale = and_(
            r.updated_at < cutoff,
            or_(r.republish_at.is_(None), r.republish_at < now),
            or_(r.status == "pending", and_(r.status == "retrying", r.retry_at < cutoff)),
        )
        # The common case is "nothing stale": answer it with a plain read, and take the
        # write lock (BEGIN IMMEDIATE on SQLite) only when there is work.
        with self._factory() as session:
            if session.execute(select(r.id).where(stale).limit(1)).first() is None:
                return []
        stmt = (
            select(*_CLAIM_COLUMNS, r.publish_count)
            .join(ScheduledAction, ScheduledAction.id == r.action_id)
            .where(stale)
            .order_by(r.id)
            .limit(limit)
        )
        with self._write_tx() as session:
            rows = session.execute(self._skip_locked(stmt, r)).all()
            if rows:
                session.execute(
                    update(r),
                    [_republished(row.run_id, row.publish_count, now, grace_s) for row in rows],
                )
            return [_claim(row.run_id, row) for row in rows]

    def stale_running(
        self, now: datetime, *, heartbeat_timeout_s: float, limit: int
    ) -> list[StaleRun]:
        """Runs ``running`` whose heartbeat is older than ``heartbeat_timeout_s``."""
        r, a = ScheduledActionRun, ScheduledAction
        cutoff = now - timedelta(seconds=heartbeat_timeout_s)
        stmt = (
            select(r.id, r.attempt, r.started_at, a.timeout_s, a.retry_max_attempts)
            .join(a, a.id == r.action_id)
            .where(r.status == "running", r.heartbeat_at < cutoff)
            .order_by(r.id)
            .limit(limit)
        )
        with self._factory() as session:
            return [
                StaleRun(
                    run_id=row.id,
                    attempt=row.attempt,
                    started_at=row.started_at or now,
                    timeout_s=row.timeout_s,
                    retry_max_attempts=row.retry_max_attempts,
                )
                for row in session.execute(stmt).all()
            ]

    def requeue_lost(
        self, run_id: int, attempt: int, *, now: datetime, error: str, stale_before: datetime
    ) -> bool:
        """Put a lost attempt back to ``pending`` for another delivery.

        Fenced by attempt and by the heartbeat still being older than ``stale_before``.
        """
        return self._close_attempt(
            run_id, attempt, status="pending", now=now, error=error, stale_before=stale_before
        )

    def claim_for_publish(self, run_id: int) -> Claim | None:
        r, a = ScheduledActionRun, ScheduledAction
        stmt = select(*_CLAIM_COLUMNS).join(a, a.id == r.action_id).where(r.id == run_id)
        with self._factory() as session:
            row = session.execute(stmt).first()
            return _claim(row.run_id, row) if row else None

    # -- reading runs ------------------------------------------------------------------------

    def list_runs(
        self, *, action: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        r = ScheduledActionRun
        stmt = select(r).order_by(r.id.desc()).limit(limit)
        if action:
            stmt = stmt.join(ScheduledAction).where(ScheduledAction.name == action)
        if status:
            stmt = stmt.where(r.status == status)
        with self._factory() as session:
            return [run_to_dict(run) for run in session.scalars(stmt)]

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self._factory() as session:
            run = session.get(ScheduledActionRun, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            return run_to_dict(run)

    def count_runs(self, statuses: Iterable[str] | None = None) -> dict[str, int]:
        r = ScheduledActionRun
        stmt = select(r.status, func.count()).group_by(r.status)
        if statuses:
            stmt = stmt.where(r.status.in_(list(statuses)))
        with self._factory() as session:
            return {status: count for status, count in session.execute(stmt).all()}


_CLAIM_COLUMNS = (
    ScheduledActionRun.id.label("run_id"),
    ScheduledAction.id,
    ScheduledAction.action_type,
    ScheduledAction.queue,
    ScheduledAction.priority,
    ScheduledAction.timeout_s,
)


def _claim(run_id: int, action: Any) -> Claim:
    """A claim for ``run_id`` from anything with the action's routing columns."""
    return Claim(
        run_id=run_id,
        action_id=action.id,
        action_type=action.action_type,
        queue=action.queue,
        priority=action.priority,
        timeout_s=action.timeout_s,
    )


def _due_action(row: Row[Any], *, count_runs: bool) -> DueAction:
    return DueAction(
        id=row.id,
        schedule=row.schedule,
        next_run_at=row.next_run_at,
        run_count=row.run_count,
        start_at=row.start_at,
        end_at=row.end_at,
        max_runs=row.max_runs if count_runs else None,
        catchup_mode=row.catchup_mode,
        catchup_grace_s=row.catchup_grace_s,
        catchup_max=row.catchup_max,
        overlap_policy=row.overlap_policy,
    )


def _action_update(row: Row[Any], decided: SlotPlan, ran: int, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": row.id,
        "next_run_at": decided.next_run_at,
        "status": decided.status,
        "run_count": row.run_count + ran,
        "updated_at": now,
    }
    if decided.run_slots:
        values["last_run_at"] = decided.run_slots[-1][0]
    return values


def _republished(run_id: int, count: int, now: datetime, grace_s: float) -> dict[str, Any]:
    backoff_s = grace_s * 2 ** min(count + 1, MAX_REPUBLISH_DOUBLINGS)
    return {
        "id": run_id,
        "updated_at": now,
        "publish_count": count + 1,
        "republish_at": now + timedelta(seconds=backoff_s),
    }


def _new_run(
    action_id: int, slot: datetime, trigger: str, status: str, now: datetime
) -> dict[str, Any]:
    return {
        "action_id": action_id,
        "scheduled_for": slot,
        "trigger": trigger,
        "status": status,
        "attempt": 0,
        "publish_count": 0,
        "created_at": now,
        "updated_at": now,
        "finished_at": now if status == "skipped" else None,
    }
