"""The execution ledger in memory: a twin of :class:`~gathering_tasks.db.ledger.SqlLedger`.

:class:`MemoryLedger` answers the :class:`~gathering_tasks.db.ledger.LedgerPort` calls with
the same semantics as the SQL ledger (the contract suite in
``tests/integration/test_ledger_contract.py`` runs against both), so the guard can be tested
without services. Differences, all on purpose:

* the clock is injected instead of the database's, so a test decides what "now" is;
* records are inserted with :meth:`MemoryLedger.add` (the SQL side inserts through claims);
* :meth:`MemoryLedger.fail_next` makes the next calls of a method raise, to play a database
  that is unreachable (before the write) or that dropped the connection after committing.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy.exc import OperationalError

from gathering_tasks.clock import utcnow
from gathering_tasks.db.ledger import (
    FINAL,
    Carry,
    Closing,
    Dispatch,
    Pulse,
    Record,
    StartRefused,
    attempt_entry,
    dispatch_for,
    idempotency_key,
    record_of,
)
from gathering_tasks.db.models import RUN_STATUSES, RUN_TRIGGERS, Execution
from gathering_tasks.errors import NotFound
from gathering_tasks.keys import MAX_ATTEMPT_HISTORY, RETRY_CLOCK_SKEW_S
from gathering_tasks.kinds import EXECUTION_KINDS

LedgerMethod = Literal[
    "add",
    "start",
    "heartbeat",
    "hand_back",
    "finish",
    "schedule_retry",
    "dispatch_of",
    "cancel",
    "get",
    "requeue_lost",
    "state",
]
ExcFactory = Callable[[], BaseException]


def database_down() -> OperationalError:
    """The error a driver raises when the database cannot be reached."""
    return OperationalError("stmt", {}, Exception("down"))


def _json(value: Any) -> Any:
    """A copy of ``value`` as a JSON column would hand it back (and a check that it is JSON)."""
    return None if value is None else json.loads(json.dumps(value))


@dataclass
class _Row:
    """One record: the columns of ``executions``, changed in place under the ledger's lock."""

    id: int
    kind: str
    dedupe_key: str
    idempotency_key: str
    definition: dict[str, Any]
    trigger: str
    status: str
    created_at: datetime
    updated_at: datetime
    action_id: int | None = None
    scheduled_for: datetime | None = None
    attempt: int = 0
    celery_task_id: str | None = None
    worker: str | None = None
    retry_at: datetime | None = None
    publish_count: int = 0
    republish_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] | None = None
    pipeline_run_id: int | None = None
    node_id: str | None = None
    input: dict[str, Any] | None = None


@dataclass
class _Fault:
    times: int
    exc_factory: ExcFactory
    after_write: bool


@dataclass
class _Faults:
    """Scripted failures by method; consumed one per call."""

    pending: dict[str, _Fault] = field(default_factory=dict)

    def take(self, method: str, *, after_write: bool) -> BaseException | None:
        fault = self.pending.get(method)
        if fault is None or fault.after_write != after_write:
            return None
        fault.times -= 1
        if fault.times <= 0:
            del self.pending[method]
        return fault.exc_factory()


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    # The database's CHECK constraints, as the twin's own.
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


class MemoryLedger:
    """:class:`~gathering_tasks.db.ledger.LedgerPort` in memory, thread-safe, clock injected."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._rows: dict[int, _Row] = {}
        self._by_dedupe: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._faults = _Faults()

    # -- test hooks ------------------------------------------------------------------------

    def fail_next(
        self,
        method: LedgerMethod,
        times: int = 1,
        exc_factory: ExcFactory = database_down,
        *,
        after_write: bool = False,
    ) -> None:
        """Make the next ``times`` calls of ``method`` raise ``exc_factory()`` (replacing
        any failures still scripted for it).

        By default the call fails before it changes anything (the database was unreachable);
        with ``after_write`` the change is made and then the call raises (the connection
        dropped after the commit, so the caller cannot know it landed).
        """
        if method not in get_args(LedgerMethod):
            raise ValueError(f"no ledger method {method!r}")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.pending[method] = _Fault(times, exc_factory, after_write)

    @contextmanager
    def atomically(self) -> Iterator[MemoryLedger]:
        """Hold the ledger across several calls, as one transaction would hold its rows:
        no other thread's call lands in between (a sweeper's requeue and restart, say)."""
        with self._lock:
            yield self

    @contextmanager
    def _call(self, method: LedgerMethod) -> Iterator[None]:
        with self._lock:
            before = self._faults.take(method, after_write=False)
            if before is not None:
                raise before
            yield
            after = self._faults.take(method, after_write=True)
            if after is not None:
                raise after

    def _now(self, plus: timedelta | None = None) -> datetime:
        moment = self._clock()
        if moment.tzinfo is None:
            raise ValueError("the ledger's clock must return aware datetimes")
        return moment.astimezone(UTC) + (plus or timedelta(0))

    # -- inserting -------------------------------------------------------------------------

    def add(
        self,
        kind: str,
        dedupe_key: str,
        definition: Mapping[str, Any],
        *,
        status: str = "pending",
        trigger: str = "manual",
        action_id: int | None = None,
        scheduled_for: datetime | None = None,
    ) -> int:
        """Insert a record; its id. A repeated ``dedupe_key`` inserts nothing and returns the
        first record's id (the SQL side's ``ON CONFLICT (dedupe_key) DO NOTHING``)."""
        _check(kind, EXECUTION_KINDS, "kind")
        _check(status, RUN_STATUSES, "status")
        _check(trigger, RUN_TRIGGERS, "trigger")
        with self._call("add"):
            existing = self._by_dedupe.get(dedupe_key)
            if existing is not None:
                return existing
            now = self._now()
            record_id = next(self._ids)
            self._rows[record_id] = _Row(
                id=record_id,
                kind=kind,
                dedupe_key=dedupe_key,
                idempotency_key=idempotency_key(dedupe_key),
                definition=_json(dict(definition)),
                trigger=trigger,
                status=status,
                action_id=action_id,
                scheduled_for=scheduled_for or now,
                created_at=now,
                updated_at=now,
                finished_at=now if status == "skipped" else None,
            )
            self._by_dedupe[dedupe_key] = record_id
            return record_id

    # -- the port --------------------------------------------------------------------------

    def start(
        self, record_id: int, *, kind: str, worker: str, task_id: str | None
    ) -> Record | StartRefused:
        """Move a record ``pending|retrying -> running`` if it is of ``kind``."""
        with self._call("start"):
            now = self._now()
            row = self._rows.get(record_id)
            if row is None:
                return StartRefused("missing")
            if row.kind != kind:
                return StartRefused("kind_mismatch", status=row.status, kind=row.kind)
            if not _startable(row, now):
                return StartRefused("not_startable", status=row.status, kind=row.kind)
            row.status = "running"
            row.attempt += 1
            row.worker = worker
            row.celery_task_id = task_id
            row.started_at = row.heartbeat_at = row.updated_at = now
            row.retry_at = row.republish_at = None
            row.publish_count = 0
            return record_of(record_id, kind, row, _json(row.definition))

    def start_many(
        self, record_ids: list[int], *, kind: str, worker: str, task_id: str | None
    ) -> list[Record]:
        """:meth:`start` for several records; those that may not start are left out."""
        started = (self.start(i, kind=kind, worker=worker, task_id=task_id) for i in record_ids)
        return sorted((r for r in started if isinstance(r, Record)), key=lambda r: r.id)

    def hand_back(self, records: list[Record]) -> set[int]:
        """Started records that never began go back to ``pending`` with their former attempt
        (fenced by attempt, ``running`` and no cancellation asked for)."""
        with self._call("hand_back"):
            back: set[int] = set()
            for record in records:
                row = self._rows.get(record.id)
                if (
                    row is None
                    or (row.attempt, row.status) != (record.attempt, "running")
                    or row.cancel_requested_at is not None
                ):
                    continue
                row.status, row.attempt = "pending", row.attempt - 1
                row.worker = row.celery_task_id = None
                row.started_at = row.heartbeat_at = None
                row.updated_at = self._now()
                back.add(record.id)
            return back

    def finish_many(
        self,
        closings: list[Closing],
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> set[int]:
        """:meth:`finish` for several attempts; the ids whose attempt was closed."""
        return {
            c.record.id
            for c in closings
            if self.finish(
                c.record.id, c.record.attempt, status=c.status, result=c.result, error=c.error
            )
        }

    def heartbeat(self, record_id: int, attempt: int) -> Pulse:
        """Record that the attempt's worker is alive (with the injected clock)."""
        with self._call("heartbeat"):
            row = self._rows.get(record_id)
            if row is None or row.attempt != attempt or row.status != "running":
                return Pulse(owned=False)
            row.heartbeat_at = self._now()
            return Pulse(owned=True, cancel_requested=row.cancel_requested_at is not None)

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
        """Close an attempt with a final ``status`` (or ``waiting``). False: taken over.

        The twin holds no pipelines: ``followups`` stays as given, and ``carry`` has nothing
        to carry."""
        _check(status, RUN_STATUSES, "status")
        with self._call("finish"):
            row = self._close(record_id, attempt, status=status, error=error)
            if row is None:
                return False
            row.result = _json(result)
            if status in FINAL:
                row.finished_at = self._now()
            return True

    def schedule_retry(self, record_id: int, attempt: int, *, delay_s: float, error: str) -> bool:
        """Park a failed attempt as ``retrying`` until ``delay_s`` from now."""
        with self._call("schedule_retry"):
            row = self._close(record_id, attempt, status="retrying", error=error)
            if row is None:
                return False
            row.retry_at = self._now(timedelta(seconds=delay_s))
            return True

    def state(self, record_id: int) -> tuple[int, str] | None:
        with self._call("state"):
            row = self._rows.get(record_id)
            return (row.attempt, row.status) if row else None

    def dispatch_of(self, record_id: int) -> Dispatch | None:
        with self._call("dispatch_of"):
            row = self._rows.get(record_id)
            return dispatch_for(record_id, row.kind, _json(row.definition)) if row else None

    def cancel(self, record_id: int) -> str:
        """Cancel a record: a queued one at once; a running one is asked to stop.

        Returns the record's status afterwards, like :meth:`SqlLedger.cancel`.
        """
        with self._call("cancel"):
            row = self._rows.get(record_id)
            if row is None:
                raise NotFound(f"no run {record_id}")
            now = self._now()
            if row.status in ("pending", "retrying"):
                self._close(
                    record_id,
                    row.attempt,
                    status="cancelled",
                    error="cancelled before it started",
                    from_status=row.status,
                )
                row.finished_at = row.cancel_requested_at = now
                return "cancelled"
            if row.status == "running" and row.cancel_requested_at is None:
                row.cancel_requested_at = row.updated_at = now
            return row.status

    # -- the sweeper's side, and reads -------------------------------------------------------

    def requeue_lost(
        self, record_id: int, attempt: int, *, error: str, stale_before: datetime
    ) -> Dispatch | None:
        """Put a lost attempt back to ``pending``, like ``Sweeps.requeue_lost``; its dispatch.

        Fenced by attempt and by the heartbeat still being older than ``stale_before``.
        """
        with self._call("requeue_lost"):
            current = self._rows.get(record_id)
            if current is not None and current.cancel_requested_at is not None:
                # Cancelled while it ran: its worker is gone, and so is the run.
                row = self._close(
                    record_id,
                    attempt,
                    status="cancelled",
                    error="cancelled; its worker was lost",
                    stale_before=stale_before,
                )
                if row is not None:
                    row.finished_at = row.updated_at
                return None
            row = self._close(
                record_id, attempt, status="pending", error=error, stale_before=stale_before
            )
            return dispatch_for(record_id, row.kind, _json(row.definition)) if row else None

    def get(self, record_id: int) -> dict[str, Any]:
        """The record as :func:`~gathering_tasks.db.ledger.record_to_dict` shows it."""
        with self._call("get"):
            row = self._rows.get(record_id)
            if row is None:
                raise NotFound(f"no run {record_id}")
            out: dict[str, Any] = {}
            for column in Execution.__table__.columns:
                value = getattr(row, column.key)
                out[column.key] = value.isoformat() if isinstance(value, datetime) else value
            for key in ("definition", "result", "attempts"):
                out[key] = _json(out[key])
            return out

    def _close(
        self,
        record_id: int,
        attempt: int,
        *,
        status: str,
        error: str | None,
        from_status: str = "running",
        stale_before: datetime | None = None,
    ) -> _Row | None:
        """``close_attempt`` of the SQL ledger: the fenced row, closed, or None."""
        row = self._rows.get(record_id)
        if row is None or row.attempt != attempt or row.status != from_status:
            return None
        if stale_before is not None and not (
            row.heartbeat_at is not None and row.heartbeat_at < stale_before
        ):
            return None
        now = self._now()
        entry = attempt_entry(attempt, status, row.worker, row.started_at, now)
        entry["error"] = error
        row.attempts = [*(row.attempts or []), entry][-MAX_ATTEMPT_HISTORY:]
        row.status, row.error, row.updated_at = status, error, now
        return row


def _startable(row: _Row, now: datetime) -> bool:
    if row.cancel_requested_at is not None:
        return False  # cancelled while it ran: it never starts again
    if row.status not in ("pending", "retrying"):
        return False
    # A retry waits out its backoff, a delay its countdown: an early copy is dropped.
    return row.retry_at is None or row.retry_at <= now + timedelta(seconds=RETRY_CLOCK_SKEW_S)
