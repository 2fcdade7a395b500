"""The execution ledger: records of work, and the worker's side of the guard.

A record is one unit of work (a slot, a trigger, a pipeline node). A worker may execute it
only after moving it ``pending|retrying -> running`` here; every later write is fenced by the
attempt number, so a worker that was presumed dead cannot overwrite a newer attempt. Times
that decide liveness (``started_at``, ``heartbeat_at``, ``retry_at``) come from the database
clock. :class:`LedgerPort` is what the guard needs; :class:`SqlLedger` implements it on
PostgreSQL and SQLite, and ``gathering_tasks.db.memory.MemoryLedger`` in memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, cast

from sqlalchemy import ClauseElement, Table, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.models import Execution, ScheduledAction
from gathering_tasks.db.sql import Sql
from gathering_tasks.errors import NotFound
from gathering_tasks.keys import MAX_ATTEMPT_HISTORY, RETRY_CLOCK_SKEW_S

# The hot path writes through the table (Core), not the mapped class: no ORM bookkeeping.
EX = cast(Table, Execution.__table__)
UNFINISHED = ("pending", "running", "retrying")
RETRY_CLOCK_SKEW = timedelta(seconds=RETRY_CLOCK_SKEW_S)
FINAL = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
Refusal = Literal["missing", "kind_mismatch", "not_startable"]
# What a start returns of the row: its Record (record_of), and what closing the attempt
# appends to (kept by SqlLedger._opened_put).
STARTED = (
    EX.c.id,
    EX.c.attempt,
    EX.c.definition,
    EX.c.idempotency_key,
    EX.c.trigger,
    EX.c.action_id,
    EX.c.scheduled_for,
    EX.c.pipeline_run_id,
    EX.c.node_id,
    EX.c.attempts,
    EX.c.started_at,
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    jitter: float = 0.0


@dataclass(frozen=True)
class Record:
    """A record a worker has just moved to ``running``: what it must execute, and how."""

    id: int
    kind: str
    attempt: int
    definition: dict[str, Any]
    idempotency_key: str
    trigger: str
    action_id: int | None = None
    scheduled_for: datetime | None = None
    pipeline_run_id: int | None = None
    node_id: str | None = None
    # What the kind's executor was handed along with the record, read in the transaction
    # that started it (a pipeline node's context); not part of the record's identity.
    context: Any = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return str(self.definition.get("name", f"record-{self.id}"))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.definition.get("config") or {})

    @property
    def retry(self) -> RetryPolicy:
        d = self.definition
        return RetryPolicy(
            max_attempts=int(d.get("retry_max_attempts", 1)),
            backoff_s=float(d.get("retry_backoff_s", 0.0)),
            backoff_max_s=float(d.get("retry_backoff_max_s", 0.0)),
            jitter=float(d.get("retry_jitter") or 0.0),
        )

    @property
    def timeout_s(self) -> int | None:
        value = self.definition.get("timeout_s")
        return int(value) if value else None


def record_of(record_id: int, kind: str, row: Any, definition: dict[str, Any]) -> Record:
    """The :class:`Record` of a started row (anything with the record's columns)."""
    return Record(
        id=record_id,
        kind=kind,
        attempt=row.attempt,
        definition=definition,
        idempotency_key=row.idempotency_key,
        trigger=row.trigger,
        action_id=row.action_id,
        scheduled_for=row.scheduled_for,
        pipeline_run_id=row.pipeline_run_id,
        node_id=row.node_id,
    )


@dataclass(frozen=True)
class StartRefused:
    """Why a delivery may not start its record (it is dropped, the record left alone)."""

    reason: Refusal
    status: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Dispatch:
    """A record to publish: the message carries only the record id; routing comes along."""

    record_id: int
    kind: str
    queue: str | None = None
    priority: int | None = None
    timeout_s: int | None = None
    countdown_s: float = 0.0  # not before this many seconds (a delay node's countdown)
    # For people watching the broker (Flower, logs): never read back by a worker, and not
    # part of a dispatch's identity (two dispatches of one record route the same).
    label: str | None = field(default=None, compare=False)  # the record's name
    slot: datetime | None = field(default=None, compare=False)
    attempt: int | None = field(default=None, compare=False)  # the attempt it should start
    # Started for the worker that made it ready, in the same transaction (see :class:`Carry`):
    # that worker runs it as this record, and it is never published.
    started: Record | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Carry:
    """A worker that runs the next node of a chain itself (``keep`` accepts its dispatch):
    the transaction that writes a node's final outcome then inserts the one node it made
    ready already ``running`` as that worker's first attempt, with its input, instead of
    ``pending``, and its dispatch carries the started record (``Dispatch.started``): no
    start transaction follows. Given to :meth:`SqlLedger.finish`."""

    worker: str
    task_id: str | None
    keep: Callable[[Dispatch], bool]


@dataclass
class Carrying:
    """A :class:`Carry` inside one transaction: the outputs of the nodes it closed, and
    what the pipeline started for the worker."""

    carry: Carry
    outputs: dict[str, Any]
    started: list[tuple[Record, datetime]] = field(default_factory=list)


@dataclass(frozen=True)
class Closing:
    """One attempt of a batch to close (see :meth:`SqlLedger.finish_many`)."""

    record: Record
    status: str
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Pulse:
    """A heartbeat's answer: does the attempt still own its record, and is it cancelled?"""

    owned: bool
    cancel_requested: bool = False


def dispatch_for(
    record_id: int,
    kind: str,
    definition: Mapping[str, Any],
    *,
    slot: datetime | None = None,
    attempt: int | None = None,
) -> Dispatch:
    name = definition.get("name")
    return Dispatch(
        record_id=record_id,
        kind=kind,
        queue=definition.get("queue"),
        priority=definition.get("priority"),
        timeout_s=definition.get("timeout_s"),
        label=str(name) if name else None,
        slot=slot,
        attempt=attempt,
    )


def attempt_entry(
    attempt: int, status: str, worker: str | None, started_at: datetime | None, ended_at: datetime
) -> dict[str, Any]:
    return {
        "attempt": attempt,
        "status": status,
        "worker": worker,
        "started_at": started_at.isoformat() if started_at else None,
        "ended_at": ended_at.isoformat(),
    }


class LedgerPort(Protocol):
    """The ledger as the guard sees it. Every write after ``start`` is fenced by attempt."""

    def start(
        self, record_id: int, *, kind: str, worker: str, task_id: str | None
    ) -> Record | StartRefused: ...

    def start_many(
        self, record_ids: list[int], *, kind: str, worker: str, task_id: str | None
    ) -> list[Record]: ...

    def heartbeat(self, record_id: int, attempt: int) -> Pulse: ...

    def hand_back(self, records: list[Record]) -> set[int]: ...

    def finish_many(
        self,
        closings: list[Closing],
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> set[int]: ...

    def finish(
        self,
        record_id: int,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> bool: ...

    def schedule_retry(
        self, record_id: int, attempt: int, *, delay_s: float, error: str
    ) -> bool: ...

    def dispatch_of(self, record_id: int) -> Dispatch | None: ...

    def state(self, record_id: int) -> tuple[int, str] | None: ...

    def cancel(self, record_id: int) -> str: ...


def record_to_dict(row: Execution) -> dict[str, Any]:
    """A JSON-friendly view of a record."""
    out: dict[str, Any] = {}
    for column in Execution.__table__.columns:
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


class Progress(Protocol):
    """What the ledger asks of pipelines when a record's outcome is written."""

    def lock_run_of(self, session: Session, record_id: int) -> tuple[int, str] | None:
        """Lock the pipeline run of a node record (before the record's row): its id."""

    def settled(self, node: tuple[int, str], status: str, result: dict[str, Any] | None) -> None:
        """After commit: ``node`` (run id, node id) ended with ``status`` and ``result``."""

    def advance_record(
        self,
        session: Session,
        record_id: int,
        *,
        nodes: Iterable[str] = (),
        carrying: Carrying | None = None,
    ) -> list[Dispatch]:
        """After a node's final outcome (and those of ``nodes``, other nodes of its run
        closed in the same transaction): the records that became ready. With
        ``carrying``, the one a chain goes on with may be started for its worker (a
        dispatch that carries its started record, also added to ``carrying.started``)."""

    def prepare(self, session: Session, record: Record) -> Record:
        """A node record just started: the record with what its executor needs."""


class SqlLedger(Sql):
    """:class:`LedgerPort` on PostgreSQL and SQLite, plus the operators' reads of runs.

    ``progress``, when given, moves a pipeline on in the transaction that records one of
    its nodes' final outcome: the run's row is locked first (always run, then node: the order
    every writer of both takes), and the records that became ready are returned.
    """

    def __init__(self, factory: sessionmaker[Session], *, progress: Progress | None = None) -> None:
        super().__init__(factory)
        self.progress = progress
        # Attempts this process started and has not closed: their history and start, so
        # that closing one is a single fenced UPDATE (no read of the row first).
        self._opened: dict[tuple[int, int], _Opened] = {}
        self._opened_lock = threading.Lock()
        # Built once: every delivery runs these two (and a running record one per pulse).
        self._start = self._start_statement(EX.c.id == bindparam("p_id"))
        self._start_many = self._start_statement(EX.c.id.in_(bindparam("p_ids", expanding=True)))
        # The attempt ``p_attempt`` of record ``p_id``, while it runs.
        attempt_running = (
            EX.c.id == bindparam("p_id"),
            EX.c.attempt == bindparam("p_attempt"),
            EX.c.status == "running",
        )
        self._heartbeat = (
            update(EX)
            .where(*attempt_running)
            .values(heartbeat_at=self.clock())
            .returning(EX.c.cancel_requested_at)
        )
        self._hand_back = (
            update(EX)
            .where(
                *attempt_running,
                # A cancelled one is closed by the worker that holds it, as cancelled.
                EX.c.cancel_requested_at.is_(None),
            )
            .values(
                status="pending",
                attempt=EX.c.attempt - 1,
                worker=None,
                celery_task_id=None,
                started_at=None,
                heartbeat_at=None,
                updated_at=self.clock(),
            )
            .returning(EX.c.id)
        )

    def _start_statement(self, which: Any) -> Any:
        e = EX.c
        now = self.clock()
        return (
            update(EX)
            .where(
                which,
                e.kind == bindparam("p_kind"),
                # Cancelled while it ran (and then requeued): it never starts again.
                e.cancel_requested_at.is_(None),
                e.status.in_(("pending", "retrying")),
                # A retry waits out its backoff, a delay node its countdown: an early copy
                # of the message is dropped.
                or_(
                    e.retry_at.is_(None),
                    e.retry_at <= self.clock("skewed", timedelta(seconds=RETRY_CLOCK_SKEW_S)),
                ),
            )
            .values(
                status="running",
                attempt=e.attempt + 1,
                worker=bindparam("p_worker"),
                celery_task_id=bindparam("p_task_id"),
                started_at=now,
                heartbeat_at=now,
                retry_at=None,
                # A started record's messages did their job: the next attempt backs off afresh.
                publish_count=0,
                republish_at=None,
                updated_at=now,
            )
            .returning(*STARTED)
        )

    def start(
        self, record_id: int, *, kind: str, worker: str, task_id: str | None
    ) -> Record | StartRefused:
        """Move a record ``pending|retrying -> running`` if it is of ``kind``."""
        params = {"p_id": record_id, "p_kind": kind, "p_worker": worker, "p_task_id": task_id}
        params.update(self.clock_values(skewed=RETRY_CLOCK_SKEW))
        if kind != "pipeline_node":
            # One statement: on PostgreSQL its own transaction, with no BEGIN or COMMIT.
            with self.single_statement() as connection:
                row = connection.execute(self._start, params).first()
                if row is None:
                    return _refusal(connection, record_id, kind)
            return self._started(record_id, kind, row, worker)
        with self.write_tx() as session:
            row = session.connection().execute(self._start, params).first()
            if row is None:
                return _refusal(session, record_id, kind)
            record = self._started(record_id, kind, row, worker)
            if self.progress is not None and record.pipeline_run_id is not None:
                # A pipeline node: its context is read in the transaction that started it.
                record = self.progress.prepare(session, record)
            return record

    def start_many(
        self, record_ids: list[int], *, kind: str, worker: str, task_id: str | None
    ) -> list[Record]:
        """:meth:`start` for several records in one transaction (a batch of one pipeline
        run's nodes). Those that may not start are left out; the others come back in id
        order, each with its node's context."""
        if not record_ids:
            return []
        params: dict[str, Any] = {"p_ids": list(record_ids), "p_kind": kind}
        params.update(p_worker=worker, p_task_id=task_id)
        params.update(self.clock_values(skewed=RETRY_CLOCK_SKEW))
        with self.write_tx() as session:
            rows = session.connection().execute(self._start_many, params).all()
            records = [self._started(row.id, kind, row, worker) for row in sorted(rows, key=_by_id)]
            if self.progress is None:
                return records
            progress = self.progress
            return [
                progress.prepare(session, r) if r.pipeline_run_id is not None else r
                for r in records
            ]

    def _started(self, record_id: int, kind: str, row: Any, worker: str) -> Record:
        record = record_of(record_id, kind, row, dict(row.definition))
        opened = _Opened(row.attempts, row.started_at, worker, node=row.pipeline_run_id is not None)
        self._opened_put(record_id, row.attempt, opened)
        return record

    def _opened_put(self, record_id: int, attempt: int, opened: _Opened) -> None:
        with self._opened_lock:
            self._opened[(record_id, attempt)] = opened
            while len(self._opened) > MAX_OPENED:  # attempts never closed here (taken over)
                self._opened.pop(next(iter(self._opened)))

    def _opened_pop(self, record_id: int, attempt: int) -> _Opened | None:
        with self._opened_lock:
            return self._opened.pop((record_id, attempt), None)

    def _opened_carried(self, carrying: Carrying | None) -> None:
        """After the commit that started them: the attempts started for ``carrying``'s
        worker, as :meth:`start` keeps its own."""
        if carrying is None:
            return
        worker = carrying.carry.worker
        for record, started_at in carrying.started:
            self._opened_put(record.id, record.attempt, _Opened([], started_at, worker, node=True))

    def heartbeat(self, record_id: int, attempt: int) -> Pulse:
        """Record that the attempt's worker is alive, with the database clock."""
        params = {"p_id": record_id, "p_attempt": attempt, **self.clock_values()}
        with self.single_statement() as connection:
            row = connection.execute(self._heartbeat, params).first()
        if row is None:
            return Pulse(owned=False)
        return Pulse(owned=True, cancel_requested=row.cancel_requested_at is not None)

    def hand_back(self, records: list[Record]) -> set[int]:
        """Undo the start of records this process started and never began (they waited in a
        batch): ``pending`` again, with the attempt they had, for any worker to start. The
        attempt was never made, so it is not counted and leaves no history. Fenced by the
        attempt, ``running`` and no cancellation asked for. Returns the ids handed back."""
        back: set[int] = set()
        with self.write_tx() as session:
            connection = session.connection()
            for record in records:
                params = {"p_id": record.id, "p_attempt": record.attempt, **self.clock_values()}
                if connection.execute(self._hand_back, params).first() is not None:
                    back.add(record.id)
        for record in records:
            if record.id in back:
                self._opened_pop(record.id, record.attempt)
        return back

    def finish(
        self,
        record_id: int,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> bool:
        """Close an attempt with a final ``status`` (or ``waiting``: handed on to a pipeline).

        False: the attempt was taken over. A pipeline node's outcome moves its pipeline on in
        the same transaction; the records that became ready are added to ``followups``, to
        publish after commit (or, with ``carry``, to run: see :class:`Carry`).
        """
        finished = {"finished_at": DB_NOW} if status in FINAL else {}
        opened = self._opened_pop(record_id, attempt)
        if opened is not None and not opened.node:
            # Not a pipeline node (its start said so): one fenced UPDATE, its own transaction.
            with self.single_statement() as connection:
                return _close_fast(
                    self,
                    connection,
                    record_id=record_id,
                    attempt=attempt,
                    status=status,
                    error=error,
                    values={"result": result, **finished},
                    from_status="running",
                    opened=opened,
                )
        with self.write_tx() as session:
            node_of_run = (
                self.progress.lock_run_of(session, record_id)
                if self.progress is not None and status in FINAL
                else None
            )
            closed = close_attempt(
                self,
                session,
                record_id,
                attempt,
                status=status,
                error=error,
                values={"result": result, **finished},
                opened=opened,
            )
            carrying = _carrying(carry, {node_of_run[1]: result} if node_of_run else {})
            if closed and node_of_run is not None and self.progress is not None:
                ready = self.progress.advance_record(session, record_id, carrying=carrying)
                if followups is not None:
                    followups.extend(ready)
        if closed and node_of_run is not None and self.progress is not None:
            self._opened_carried(carrying)
            self.progress.settled(node_of_run, status, result)
        return closed

    def finish_many(
        self,
        closings: list[Closing],
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> set[int]:
        """:meth:`finish` for several attempts of one pipeline run's nodes (a batch), each
        with a final status, in one transaction: the run is locked once and moved on once,
        after all of them. Returns the ids whose attempt was closed (not taken over)."""
        if not closings:
            return set()
        runs = {c.record.pipeline_run_id for c in closings}
        if len(runs) != 1 or None in runs or any(c.status not in FINAL for c in closings):
            raise ValueError("a batch closes final outcomes of nodes of one pipeline run")
        first = closings[0].record.id
        closed: list[Closing] = []
        with self.write_tx() as session:
            progress = self.progress
            node_of_run = progress.lock_run_of(session, first) if progress is not None else None
            for c in closings:
                if close_attempt(
                    self,
                    session,
                    c.record.id,
                    c.record.attempt,
                    status=c.status,
                    error=c.error,
                    values={"result": c.result, "finished_at": DB_NOW},
                    opened=self._opened_pop(c.record.id, c.record.attempt),
                ):
                    closed.append(c)
            carrying = _carrying(carry, {str(c.record.node_id): c.result for c in closed})
            if closed and node_of_run is not None and progress is not None:
                nodes = [str(c.record.node_id) for c in closed]
                ready = progress.advance_record(session, first, nodes=nodes, carrying=carrying)
                if followups is not None:
                    followups.extend(ready)
        if node_of_run is not None and progress is not None:
            self._opened_carried(carrying)
            for c in closed:
                progress.settled((node_of_run[0], str(c.record.node_id)), c.status, c.result)
        return {c.record.id for c in closed}

    def schedule_retry(self, record_id: int, attempt: int, *, delay_s: float, error: str) -> bool:
        """Park a failed attempt as ``retrying`` until ``delay_s`` from now (database clock)."""
        with self.write_tx() as session:
            return close_attempt(
                self,
                session,
                record_id,
                attempt,
                status="retrying",
                error=error,
                values={"retry_at": self.now(timedelta(seconds=delay_s))},
                opened=self._opened_pop(record_id, attempt),
            )

    def state(self, record_id: int) -> tuple[int, str] | None:
        """The record's attempt and status (after a write whose reply was lost)."""
        e = Execution
        with self.factory() as session:
            row = session.execute(select(e.attempt, e.status).where(e.id == record_id)).first()
        return (row.attempt, row.status) if row else None

    def dispatch_of(self, record_id: int) -> Dispatch | None:
        e = Execution
        with self.factory() as session:
            row = session.execute(select(e.kind, e.definition).where(e.id == record_id)).first()
        return dispatch_for(record_id, row.kind, row.definition) if row else None

    def cancel(self, record_id: int) -> str:
        """Cancel a record: a queued one at once; a running one is asked to stop.

        Returns the record's status afterwards (``cancelled``, or ``running`` with the
        request recorded, or the final status it already had).
        """
        e = Execution
        with self.write_tx() as session:
            row = session.execute(
                self.for_update(
                    select(e.status, e.attempt, e.worker, e.started_at).where(e.id == record_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no run {record_id}")
            if row.status in ("pending", "retrying"):
                close_attempt(
                    self,
                    session,
                    record_id,
                    row.attempt,
                    status="cancelled",
                    error="cancelled before it started",
                    values={"finished_at": self.now(), "cancel_requested_at": self.now()},
                    from_status=row.status,
                )
                return "cancelled"
            if row.status == "running":
                session.execute(
                    update(e)
                    .where(e.id == record_id, e.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=self.now(), updated_at=self.now())
                )
            return str(row.status)

    # -- reading runs --------------------------------------------------------------------

    def get(self, record_id: int) -> dict[str, Any]:
        with self.factory() as session:
            row = session.get(Execution, record_id)
            if row is None:
                raise NotFound(f"no run {record_id}")
            return record_to_dict(row)

    def find(self, dedupe_key: str) -> dict[str, Any] | None:
        """The record made for ``dedupe_key`` (a trigger's key), or None while there is none."""
        with self.factory() as session:
            row = session.scalars(
                select(Execution).where(Execution.dedupe_key == dedupe_key)
            ).first()
            return record_to_dict(row) if row is not None else None

    def list_runs(
        self, *, action: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        e = Execution
        stmt = select(e).where(e.action_id.is_not(None)).order_by(e.id.desc()).limit(limit)
        if action:
            stmt = stmt.join(ScheduledAction, ScheduledAction.id == e.action_id).where(
                ScheduledAction.name == action
            )
        if status:
            stmt = stmt.where(e.status == status)
        with self.factory() as session:
            return [record_to_dict(row) for row in session.scalars(stmt)]

    def count_runs(
        self, statuses: Iterable[str] | None = None, *, since: datetime | None = None
    ) -> dict[str, int]:
        """Records by status (``since``: only those changed since then)."""
        e = Execution
        stmt = select(e.status, func.count()).group_by(e.status)
        if statuses:
            stmt = stmt.where(e.status.in_(list(statuses)))
        if since is not None:
            stmt = stmt.where(e.updated_at >= since)
        with self.factory() as session:
            return {status: count for status, count in session.execute(stmt).all()}


def _carrying(carry: Carry | None, results: dict[str, dict[str, Any] | None]) -> Carrying | None:
    return None if carry is None else Carrying(carry, results)


def _by_id(row: Any) -> int:
    return int(row.id)


def _refusal(session: Session | Connection, record_id: int, kind: str) -> StartRefused:
    e = Execution
    row = session.execute(select(e.kind, e.status).where(e.id == record_id)).first()
    if row is None:
        return StartRefused("missing")
    if row.kind != kind:
        return StartRefused("kind_mismatch", status=row.status, kind=row.kind)
    return StartRefused("not_startable", status=row.status, kind=row.kind)


def close_attempt(
    sql: Sql,
    session: Session,
    record_id: int,
    attempt: int,
    *,
    status: str,
    error: str | None,
    values: Mapping[str, Any],
    from_status: str = "running",
    stale_before: datetime | None = None,
    opened: _Opened | None = None,
) -> bool:
    """End attempt ``attempt`` with ``status`` and append it to the record's history.

    Fenced by attempt and ``from_status``; with ``stale_before`` (the sweeper) also by the
    heartbeat still being older than that, so a heartbeat that landed since means alive.
    ``opened``: the history and start the attempt's own ``start`` returned. While the fence
    holds they are still the row's (only closing an attempt appends to its history, and that
    moves it out of ``running``), so the row is not read first.
    """
    e = EX.c
    if stale_before is None and not any(isinstance(v, ClauseElement) for v in values.values()):
        return _close_fast(
            sql,
            session,
            record_id=record_id,
            attempt=attempt,
            status=status,
            error=error,
            values=values,
            from_status=from_status,
            opened=opened if from_status == "running" else None,
        )
    fence = [e.id == record_id, e.attempt == attempt, e.status == from_status]
    if stale_before is not None:
        fence.append(e.heartbeat_at < stale_before)
    row = session.execute(
        sql.for_update(select(e.attempts, e.started_at, e.worker).where(*fence))
    ).first()
    if row is None:
        return False
    history = _history(row, attempt, status, error)
    session.execute(
        update(EX)
        .where(*fence)
        .values(status=status, error=error, attempts=history, updated_at=sql.now(), **values)
    )
    return True


DB_NOW: Any = object()  # a value of close_attempt's ``values``: the database clock
MAX_OPENED = 1024  # attempts a process remembers having started (it runs a few at a time)


@dataclass(frozen=True)
class _Opened:
    """What :func:`_history` needs of a row, as the attempt's ``start`` returned it."""

    attempts: list[dict[str, Any]] | None
    started_at: datetime | None
    worker: str | None
    node: bool = False  # a pipeline node (its outcome moves its run on)


def _history(row: Any, attempt: int, status: str, error: str | None) -> list[dict[str, Any]]:
    # The history is for people; the host clock is good enough for its end times.
    entry = attempt_entry(attempt, status, row.worker, row.started_at, datetime.now(UTC))
    entry["error"] = error
    return [*(row.attempts or []), entry][-MAX_ATTEMPT_HISTORY:]


_CLOSE_STATEMENTS: dict[tuple[str, tuple[tuple[str, bool], ...]], tuple[Any, Any]] = {}


def _close_statements(sql: Sql, shape: tuple[tuple[str, bool], ...]) -> tuple[Any, Any]:
    """close_attempt's SELECT ... FOR UPDATE and UPDATE for one shape of ``values`` (their
    names, and which are the database clock), built once per dialect."""
    key = (sql.dialect, shape)
    if key not in _CLOSE_STATEMENTS:
        e = EX.c
        fence = (
            e.id == bindparam("p_id"),
            e.attempt == bindparam("p_attempt"),
            e.status == bindparam("p_from"),
        )
        select_ = sql.for_update(select(e.attempts, e.started_at, e.worker).where(*fence))
        extra = {
            name: sql.clock() if clock else bindparam(f"p_{name}", type_=EX.c[name].type)
            for name, clock in shape
        }
        update_ = (
            update(EX)
            .where(*fence)
            .values(
                status=bindparam("p_status"),
                error=bindparam("p_error"),
                attempts=bindparam("p_attempts", type_=e.attempts.type),
                updated_at=sql.clock(),
                **extra,
            )
        )
        _CLOSE_STATEMENTS[key] = (select_, update_)
    return _CLOSE_STATEMENTS[key]


def _close_fast(
    sql: Sql,
    session: Session | Connection,
    *,
    record_id: int,
    attempt: int,
    status: str,
    error: str | None,
    values: Mapping[str, Any],
    from_status: str,
    opened: _Opened | None = None,
) -> bool:
    shape = tuple(sorted((name, value is DB_NOW) for name, value in values.items()))
    select_, update_ = _close_statements(sql, shape)
    connection = session.connection() if isinstance(session, Session) else session
    fence = {"p_id": record_id, "p_attempt": attempt, "p_from": from_status}
    row: Any = opened
    if row is None:
        row = connection.execute(select_, fence).first()
        if row is None:
            return False
    params = {
        **fence,
        **sql.clock_values(),
        "p_status": status,
        "p_error": error,
        "p_attempts": _history(row, attempt, status, error),
        **{f"p_{name}": value for name, value in values.items() if value is not DB_NOW},
    }
    return connection.execute(update_, params).rowcount == 1


def _epoch_us(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def slot_key(action_id: int, slot: datetime) -> str:
    """The dedupe key of a scheduled slot: the same slot always gets the same key."""
    return f"slot:{action_id}:{_epoch_us(slot)}"


def trigger_key(action_id: int, key: str) -> str:
    """The dedupe key of a trigger from outside (a message id, or the caller's own key)."""
    return f"trigger:{action_id}:{key}"


def idempotency_key(dedupe_key: str) -> str:
    """The key every side effect of a record carries: stable across its attempts.

    Derived from the dedupe key, so it is known before the record is inserted and the same
    for a slot however often its claim is replayed. Callers' keys are hashed to keep the
    header short and free of odd characters.
    """
    scope, _, rest = dedupe_key.partition(":")
    if scope == "slot":
        return "gathering-slot-" + rest.replace(":", "-")
    if scope == "node":
        # node:<pipeline run>:<node id>: node ids are header-safe by validation
        return "gathering-node-" + rest.replace(":", "-", 1)
    digest = hashlib.sha256(dedupe_key.encode()).hexdigest()[:32]
    return f"gathering-{scope}-{digest}"
