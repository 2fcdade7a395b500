"""The sweeper's SQL: lost messages, dead workers' records, and retention.

Works on every ledger record, whatever its kind. ``now`` is the database clock
(:meth:`Sweeps.read_now`), the same clock the heartbeats were written with.

A sweep starts with :meth:`Sweeps.probe`: one read that says which jobs have work. The
common answer is "none", and then the sweep costs that one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Engine, and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.engine import read_rows
from gathering_tasks.db.ledger import FINAL, Dispatch, Progress, close_attempt, dispatch_for
from gathering_tasks.db.models import Execution, PipelineRun
from gathering_tasks.db.sql import Sql
from gathering_tasks.db.types import UtcDateTime
from gathering_tasks.keys import MAX_REPUBLISH_DOUBLINGS


@dataclass(frozen=True)
class StaleRecord:
    """A ``running`` record whose heartbeat stopped: its worker is presumed gone."""

    record_id: int
    attempt: int
    started_at: datetime
    timeout_s: int | None
    retry_max_attempts: int


@dataclass(frozen=True)
class SweepProbe:
    """Which of the sweeper's jobs have work now (:meth:`Sweeps.probe`)."""

    stale_queued: bool  # a record queued past the grace, its message presumably lost
    stale_running: bool  # a running record whose heartbeat stopped
    overdue_pipelines: bool  # a pipeline run past its deadline


class Sweeps(Sql):
    """Recovery and retention over the whole ledger.

    ``reads`` (:func:`~gathering_tasks.db.engine.reads_engine`) serves :meth:`probe`, the
    read of every sweep; without it, the probe takes a connection like any other read.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        *,
        progress: Progress | None = None,
        reads: Engine | None = None,
    ) -> None:
        super().__init__(factory)
        self.progress = progress
        self.reads: Engine = reads or factory.kw["bind"]

    def probe(self, now: datetime, *, grace_s: float, heartbeat_timeout_s: float) -> SweepProbe:
        """Whether :meth:`stale_queued`, :meth:`stale_running` and the pipelines' deadlines
        would find anything at ``now``: one read of three index lookups."""
        params = {
            "p_now": now,
            "p_queued_before": now - timedelta(seconds=grace_s),
            "p_stale_before": now - timedelta(seconds=heartbeat_timeout_s),
        }
        row = read_rows(self.reads, _PROBE, params)[0]
        return SweepProbe(
            stale_queued=bool(row[0]), stale_running=bool(row[1]), overdue_pipelines=bool(row[2])
        )

    def stale_queued(self, now: datetime, *, grace_s: float, limit: int) -> list[Dispatch]:
        """Records queued but never started past ``grace_s`` (a publish lost after commit).

        A record is re-published after ``grace_s``, then after 2, 4, 8 ... times that
        (capped): a lost message is replaced quickly, while a backlog that workers are
        merely slow to drain is not flooded with copies every sweep.
        """
        e = Execution
        stale = _stale_queued(now - timedelta(seconds=grace_s), now)
        # The common case is "nothing stale": answer it with a plain read, and take the
        # write lock (BEGIN IMMEDIATE on SQLite) only when there is work.
        with self.factory() as session:
            if session.execute(select(e.id).where(stale).limit(1)).first() is None:
                return []
        stmt = (
            select(e.id, e.kind, e.definition, e.publish_count)
            .where(stale)
            .order_by(e.id)
            .limit(limit)
        )
        with self.write_tx() as session:
            rows = session.execute(self.skip_locked(stmt, e)).all()
            if rows:
                session.execute(
                    update(e),
                    [_republished(row.id, row.publish_count, now, grace_s) for row in rows],
                )
            return [dispatch_for(row.id, row.kind, row.definition) for row in rows]

    def stale_running(
        self, now: datetime, *, heartbeat_timeout_s: float, limit: int
    ) -> list[StaleRecord]:
        """Records ``running`` whose heartbeat is older than ``heartbeat_timeout_s``."""
        e = Execution
        stmt = (
            select(e.id, e.attempt, e.started_at, e.definition)
            .where(_stale_running(now - timedelta(seconds=heartbeat_timeout_s)))
            .order_by(e.id)
            .limit(limit)
        )
        with self.factory() as session:
            return [
                StaleRecord(
                    record_id=row.id,
                    attempt=row.attempt,
                    started_at=row.started_at or now,
                    timeout_s=row.definition.get("timeout_s"),
                    retry_max_attempts=int(row.definition.get("retry_max_attempts", 1)),
                )
                for row in session.execute(stmt).all()
            ]

    def requeue_lost(
        self, record_id: int, attempt: int, *, error: str, stale_before: datetime
    ) -> Dispatch | None:
        """Put a lost attempt back to ``pending`` for another delivery; its dispatch.

        Fenced by attempt and by the heartbeat still being older than ``stale_before``.
        """
        e = Execution
        with self.write_tx() as session:
            cancelled = session.execute(
                select(e.cancel_requested_at).where(e.id == record_id)
            ).scalar_one_or_none()
            if cancelled is not None:
                # Cancelled while it ran, and its worker is gone: so is the run.
                close_attempt(
                    self,
                    session,
                    record_id,
                    attempt,
                    status="cancelled",
                    error="cancelled; its worker was lost",
                    values={"finished_at": self.now()},
                    stale_before=stale_before,
                )
                return None
            if not close_attempt(
                self,
                session,
                record_id,
                attempt,
                status="pending",
                error=error,
                values={},
                stale_before=stale_before,
            ):
                return None
            row = session.execute(select(e.kind, e.definition).where(e.id == record_id)).one()
            return dispatch_for(record_id, row.kind, row.definition)

    def end_lost(
        self, record_id: int, attempt: int, *, status: str, error: str, stale_before: datetime
    ) -> list[Dispatch] | None:
        """Close a lost attempt for good (``failed`` or ``timed_out``), fenced like requeue.

        None when the fence refused; else what became ready (a pipeline moving on)."""
        with self.write_tx() as session:
            run_id = self.progress.lock_run_of(session, record_id) if self.progress else None
            if not close_attempt(
                self,
                session,
                record_id,
                attempt,
                status=status,
                error=error,
                values={"finished_at": self.now()},
                stale_before=stale_before,
            ):
                return None
            if run_id is None or self.progress is None:
                return []
            return self.progress.advance_record(session, record_id)

    def prune(self, finished_before: datetime, *, limit: int) -> int:
        """Delete up to ``limit`` finished records that ended before ``finished_before``."""
        e = Execution
        doomed = (
            select(e.id)
            .where(e.status.in_(FINAL), e.finished_at < finished_before)
            .order_by(e.id)
            .limit(limit)
            .scalar_subquery()
        )
        with self.write_tx() as session:
            result = session.execute(delete(e).where(e.id.in_(doomed)))
            return int(result.rowcount)  # type: ignore[attr-defined]


def _stale_queued(cutoff: Any, now: Any) -> ColumnElement[bool]:
    """Queued since before ``cutoff``, not backing off at ``now``, not waiting on purpose."""
    e = Execution
    return and_(
        e.updated_at < cutoff,
        or_(e.republish_at.is_(None), e.republish_at < now),
        e.status.in_(("pending", "retrying")),
        # a retry's backoff or a delay's countdown still running is not a lost message
        or_(e.retry_at.is_(None), e.retry_at < cutoff),
    )


def _stale_running(cutoff: Any) -> ColumnElement[bool]:
    e = Execution
    return and_(e.status == "running", e.heartbeat_at < cutoff)


def _probe() -> Any:
    now = bindparam("p_now", type_=UtcDateTime)
    r = PipelineRun
    return select(
        exists().where(_stale_queued(bindparam("p_queued_before", type_=UtcDateTime), now)),
        exists().where(_stale_running(bindparam("p_stale_before", type_=UtcDateTime))),
        # PipelineStore.overdue_runs, asked whether there is any
        exists().where(r.status == "running", r.deadline_at < now),
    )


_PROBE = _probe()


def _republished(record_id: int, count: int, now: datetime, grace_s: float) -> dict[str, Any]:
    backoff_s = grace_s * 2 ** min(count + 1, MAX_REPUBLISH_DOUBLINGS)
    return {
        "id": record_id,
        "updated_at": now,
        "publish_count": count + 1,
        "republish_at": now + timedelta(seconds=backoff_s),
    }
