"""Slot claims: beat turns due slots into ledger records, and triggers add records on demand.

A claim inserts the records of due slots with ``ON CONFLICT (dedupe_key) DO NOTHING`` and
advances each action's ``next_run_at`` in the same transaction, so a replayed tick or a second
beat can never create a second record for a slot. The caller publishes after commit. One claim
transaction holds at most ``slot_budget`` slots, so a long outage is caught up in bounded
transactions, between which the leader re-checks its lease.

On PostgreSQL a claim's records go in as one ``INSERT ... SELECT FROM unnest(arrays)`` and its
actions advance in one ``UPDATE ... FROM unnest(arrays)``: a statement each, whatever the batch
size, where row-by-row statements cost the server a parse and a plan per row.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Integer,
    Row,
    String,
    and_,
    bindparam,
    cast,
    column,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.engine import read_rows
from gathering_tasks.db.ledger import (
    UNFINISHED,
    Dispatch,
    dispatch_for,
    idempotency_key,
    slot_key,
    trigger_key,
)
from gathering_tasks.db.models import Base, Execution, ScheduledAction
from gathering_tasks.db.sql import Sql
from gathering_tasks.db.types import UtcDateTime
from gathering_tasks.errors import NotFound

log = logging.getLogger(__name__)


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
    skipped_slots: int = 0  # due slots the catch-up policy did not run


Planner = Callable[[DueAction], SlotPlan]


@dataclass(frozen=True)
class TickState:
    """What beat reads every tick, in one round trip."""

    next_due_at: datetime | None  # the earliest next_run_at of an active action
    db_now: datetime  # the database clock (SQLite: the host clock)


@dataclass
class ClaimBatch:
    """One claim transaction's outcome."""

    dispatches: list[Dispatch] = field(default_factory=list)
    actions: int = 0  # due actions this batch advanced
    more: bool = False  # due actions may remain (the batch or the slot budget was full)


def definition_of(action: Any) -> dict[str, Any]:
    """The snapshot a record executes: taken when the record is made."""
    return {
        "name": action.name,
        "config": action.action_config,
        "retry_max_attempts": action.retry_max_attempts,
        "retry_backoff_s": action.retry_backoff_s,
        "retry_backoff_max_s": action.retry_backoff_max_s,
        "timeout_s": action.timeout_s,
        "queue": action.queue,
        "priority": action.priority,
    }


_a = ScheduledAction
_DUE_COLUMNS = (
    _a.id,
    _a.name,
    _a.schedule,
    _a.next_run_at,
    _a.run_count,
    _a.start_at,
    _a.end_at,
    _a.max_runs,
    _a.catchup_mode,
    _a.catchup_grace_s,
    _a.catchup_max,
    _a.overlap_policy,
    _a.action_type,
    _a.action_config,
    _a.retry_max_attempts,
    _a.retry_backoff_s,
    _a.retry_backoff_max_s,
    _a.timeout_s,
    _a.queue,
    _a.priority,
    _a.skipped_slots,
)

# An action with overlap "skip" is busy while a run of it is unfinished: read with the due
# rows, in the statement that locks them (one round trip, not two).
_BUSY = and_(
    _a.overlap_policy == "skip",
    exists().where(Execution.action_id == _a.id, Execution.status.in_(UNFINISHED)),
).label("busy")


class SlotClaims(Sql):
    """Beat's claims of due slots, and triggers outside the schedule.

    ``reads`` (:func:`~gathering_tasks.db.engine.reads_engine`) serves :meth:`tick_state`,
    beat's read of every tick; without it, that read takes a session like any other.
    """

    def __init__(self, factory: sessionmaker[Session], *, reads: Engine | None = None) -> None:
        super().__init__(factory)
        self.reads: Engine = reads or factory.kw["bind"]
        a = ScheduledAction
        # The database clock comes along, for the sweeper (SQLite: the host's, in Python).
        columns: list[Any] = [func.min(a.next_run_at)]
        if self.dialect == "postgresql":
            columns.append(self.now())
        self._tick = select(*columns).where(a.status == "active")

    def claim_due(
        self, now: datetime, *, limit: int, slot_budget: int, plan: Planner
    ) -> ClaimBatch:
        """Claim the due slots of up to ``limit`` actions, at most ``slot_budget`` slots."""
        a = ScheduledAction
        stmt = (
            select(*_DUE_COLUMNS, _BUSY)
            .where(a.status == "active", a.next_run_at <= now)
            .order_by(a.next_run_at)
            .limit(limit)
        )
        with self.write_tx() as session:
            rows = session.execute(self.skip_locked(stmt, a)).all()
            if not rows:
                return ClaimBatch()
            busy = {r.id for r in rows if r.busy}
            batch = self._claim_rows(
                session, rows, busy=busy, now=now, plan=plan, slot_budget=slot_budget
            )
            batch.more = batch.more or len(rows) == limit
            return batch

    def _claim_rows(
        self,
        session: Session,
        rows: Sequence[Row[Any]],
        *,
        busy: set[int],
        now: datetime,
        plan: Planner,
        slot_budget: int,
    ) -> ClaimBatch:
        batch = ClaimBatch()
        records: list[dict[str, Any]] = []
        decided: list[tuple[Row[Any], SlotPlan, bool]] = []
        definitions: dict[int, dict[str, Any]] = {}  # one snapshot per action, for all its slots
        for row in rows:
            is_busy = row.id in busy
            # A busy action's slots are recorded as skipped: they are not runs, so they
            # neither count towards max_runs nor complete the action.
            slot_plan = plan(_due_action(row, count_runs=not is_busy))
            if decided and len(records) + len(slot_plan.run_slots) > slot_budget:
                batch.more = True  # the rest stays due for the next transaction
                break
            status = "skipped" if is_busy else "pending"
            definition = definitions[row.id] = definition_of(row)
            records += [
                _new_record(row, slot, trig, status, now, definition=definition)
                for slot, trig in slot_plan.run_slots
            ]
            decided.append((row, slot_plan, is_busy))
        inserted = self._insert(session, records)
        accepted = Counter(action_id for _rid, action_id, st, _slot in inserted if st == "pending")
        self._advance_all(
            session, [_advance(row, p, busy_, accepted[row.id], now) for row, p, busy_ in decided]
        )
        kinds = {row.id: row.action_type for row, _p, _b in decided}
        batch.dispatches = [
            dispatch_for(rid, kinds[aid], definitions[aid], slot=slot, attempt=1)
            for rid, aid, st, slot in inserted
            if st == "pending"
        ]
        batch.actions = len(decided)
        return batch

    def _insert(
        self, session: Session, records: list[dict[str, Any]]
    ) -> list[tuple[int, int, str, datetime]]:
        if not records:
            return []
        if self.dialect == "postgresql":
            params = {**_columns_of(records, _RECORD_ARRAYS), "v_now": records[0]["created_at"]}
            # psycopg2 adapts no dict inside an array: the JSON goes as text, cast by the server
            params["v_definition"] = [json.dumps(d) for d in params["v_definition"]]
            result = session.connection().execute(_INSERT_UNNEST, params)
        else:
            table = _EXECUTIONS
            stmt = (
                self.insert(table)
                .on_conflict_do_nothing(index_elements=[table.c.dedupe_key])
                .returning(table.c.id, table.c.action_id, table.c.status, table.c.scheduled_for)
            )
            # executemany: one cached statement, sent as batched multi-row INSERTs.
            result = session.connection().execute(stmt, records)
        return [(row[0], row[1], row[2], row[3]) for row in result]

    def _advance_all(self, session: Session, values: list[dict[str, Any]]) -> None:
        if self.dialect == "postgresql":
            params = {**_columns_of(values, _ADVANCE_ARRAYS), "v_now": values[0]["updated_at"]}
            session.connection().execute(_ADVANCE_UNNEST, params)
        else:
            session.execute(update(ScheduledAction), values)

    def tick_state(self) -> TickState:
        """The earliest ``next_run_at`` of an active action (an index lookup) and the
        database clock, in one read (PostgreSQL: one round trip on ``reads``)."""
        row = read_rows(self.reads, self._tick)[0]
        if self.dialect == "postgresql":
            return TickState(next_due_at=row[0], db_now=row[1])
        return TickState(next_due_at=row[0], db_now=datetime.now(UTC))

    def next_due_at(self) -> datetime | None:
        """The earliest ``next_run_at`` of an active action (an index lookup)."""
        return self.tick_state().next_due_at

    def trigger(
        self, name: str, *, now: datetime, trigger: str = "manual", key: str | None = None
    ) -> tuple[Dispatch, str]:
        """A record outside the schedule, deduplicated on ``key`` (a message id, say).

        Returns the dispatch and the record's status: a repeated key gives the first
        record back, unchanged, so a redelivered trigger never makes a second run.
        """
        a = ScheduledAction
        with self.write_tx() as session:
            action = session.execute(
                select(*_DUE_COLUMNS).where(a.name == name, a.archived_at.is_(None))
            ).first()
            if action is None:
                raise NotFound(f"no action named {name!r}")
            dedupe = trigger_key(action.id, key or uuid.uuid4().hex)
            record = _new_record(action, now, trigger, "pending", now, dedupe_key=dedupe)
            inserted = self._insert(session, [record])
            if inserted:
                first = dispatch_for(
                    inserted[0][0], action.action_type, definition_of(action), slot=now, attempt=1
                )
                return first, "pending"
            e = Execution
            existing = session.execute(
                select(e.id, e.kind, e.definition, e.status).where(e.dedupe_key == dedupe)
            ).one()
            return dispatch_for(existing.id, existing.kind, existing.definition), existing.status


_EXECUTIONS = Base.metadata.tables[Execution.__tablename__]
_ACTIONS = Base.metadata.tables[ScheduledAction.__tablename__]

# A record's columns that vary per row, as arrays; the rest are constants of the insert.
_RECORD_ARRAYS: dict[str, Any] = {
    "kind": String,
    "dedupe_key": String,
    "idempotency_key": String,
    "action_id": Integer,
    "scheduled_for": UtcDateTime,
    "trigger": String,
    "definition": JSONB,
    "status": String,
    "finished_at": UtcDateTime,
}
# An action's new state, as arrays; ``updated_at`` is one value for all.
_ADVANCE_ARRAYS: dict[str, Any] = {
    "id": Integer,
    "next_run_at": UtcDateTime,
    "status": String,
    "run_count": Integer,
    "skipped_slots": Integer,
    "last_run_at": UtcDateTime,
}


def _unnest(arrays: dict[str, Any]) -> Any:
    """``unnest(CAST(:v_name AS type[]), ...) AS v(name, ...)``: one bound array per column
    (bound names differ from the columns': an insert or update reserves those)."""
    return (
        func.unnest(*[cast(bindparam(f"v_{name}"), ARRAY(type_)) for name, type_ in arrays.items()])
        .table_valued(*[column(name, type_) for name, type_ in arrays.items()])
        .render_derived()
    )


def _insert_unnest() -> Any:
    e, v = _EXECUTIONS, _unnest(_RECORD_ARRAYS)
    constants = {
        "attempt": literal(0),
        "publish_count": literal(0),
        "created_at": bindparam("v_now", type_=UtcDateTime),
        "updated_at": bindparam("v_now", type_=UtcDateTime),
    }
    names = [*_RECORD_ARRAYS, *constants]
    rows = select(*[v.c[name] for name in _RECORD_ARRAYS], *constants.values())
    return (
        pg_insert(e)
        .from_select(names, rows)
        .on_conflict_do_nothing(index_elements=[e.c.dedupe_key])
        .returning(e.c.id, e.c.action_id, e.c.status, e.c.scheduled_for)
    )


def _advance_unnest() -> Any:
    a, v = _ACTIONS, _unnest(_ADVANCE_ARRAYS)
    return (
        update(a)
        .where(a.c.id == v.c.id)
        .values(
            next_run_at=v.c.next_run_at,
            status=v.c.status,
            run_count=v.c.run_count,
            skipped_slots=v.c.skipped_slots,
            # an action that ran no slot this time keeps its last run
            last_run_at=func.coalesce(v.c.last_run_at, a.c.last_run_at),
            updated_at=bindparam("v_now", type_=UtcDateTime),
        )
    )


_INSERT_UNNEST = _insert_unnest()
_ADVANCE_UNNEST = _advance_unnest()


def _columns_of(rows: list[dict[str, Any]], arrays: dict[str, Any]) -> dict[str, list[Any]]:
    """Rows as one list per column: the parameters of an unnest statement."""
    return {f"v_{name}": [row.get(name) for row in rows] for name in arrays}


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


def _advance(
    row: Row[Any], plan: SlotPlan, busy: bool, accepted: int, now: datetime
) -> dict[str, Any]:
    """The action's new state: ``run_count`` counts the records the database accepted."""
    skipped = plan.skipped_slots + (len(plan.run_slots) if busy else 0)
    status = plan.status
    if busy and status == "completed" and row.run_count == 0:
        # Its only slots were skipped for overlap: it never ran, so it expired.
        status = "expired"
    if skipped:
        log.warning(
            "action %s: %d due slot(s) not run (%s)",
            row.name,
            skipped,
            "previous run unfinished" if busy else f"catch-up policy {row.catchup_mode}",
            extra={"action_id": row.id, "skipped_slots": skipped},
        )
    values: dict[str, Any] = {
        "id": row.id,
        "next_run_at": plan.next_run_at,
        "status": status,
        "run_count": row.run_count + accepted,
        "skipped_slots": row.skipped_slots + skipped,
        "updated_at": now,
    }
    if plan.run_slots:
        values["last_run_at"] = plan.run_slots[-1][0]
    return values


def _new_record(
    action: Any,
    slot: datetime,
    trigger: str,
    status: str,
    now: datetime,
    *,
    dedupe_key: str | None = None,
    definition: dict[str, Any] | None = None,
) -> dict[str, Any]:
    dedupe = dedupe_key or slot_key(action.id, slot)
    return {
        "kind": action.action_type,
        "dedupe_key": dedupe,
        "idempotency_key": idempotency_key(dedupe),
        "action_id": action.id,
        "scheduled_for": slot,
        "trigger": trigger,
        "definition": definition if definition is not None else definition_of(action),
        "status": status,
        "attempt": 0,
        "publish_count": 0,
        "created_at": now,
        "updated_at": now,
        "finished_at": now if status == "skipped" else None,
    }
