"""The action store: definitions of scheduled actions, and race-free changes to them.

Every change is a read-modify-write inside ONE transaction that holds the action's row lock
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write lock, taken up front), so a pause
that lands while an update is being validated is never overwritten. Deleting archives: the
action stops, its history stays, and its name is free for a new action.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gathering_tasks.db.ledger import close_attempt
from gathering_tasks.db.models import Execution, ScheduledAction
from gathering_tasks.db.sql import Sql
from gathering_tasks.errors import InvalidInput, NotFound

ACTION_FIELDS = (
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
STATE_FIELDS = ("status", "run_count", "next_run_at", "last_run_at", "skipped_slots")
Change = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Insert:
    """A new action: validated definition columns and its first slot."""

    values: dict[str, Any]
    next_run_at: datetime | None


@dataclass(frozen=True)
class Replace:
    """A change to the live action ``name``, applied under its row lock (see ``mutate``)."""

    name: str
    change: Change


def action_to_dict(action: ScheduledAction) -> dict[str, Any]:
    """A JSON-friendly view of an action row."""
    out: dict[str, Any] = {"id": action.id}
    for name in (*ACTION_FIELDS, *STATE_FIELDS, "archived_at"):
        value = getattr(action, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


class ActionStore(Sql):
    """Reads and changes action definitions."""

    def create(
        self, values: dict[str, Any], *, next_run_at: datetime | None, now: datetime
    ) -> dict[str, Any]:
        """Insert a validated action. A name taken by a live action is an InvalidInput."""
        with self.write_tx() as session:
            row = _insert(session, Insert(values, next_run_at), now)
        return action_to_dict(row)

    def write_all(
        self,
        writes: Sequence[Insert | Replace],
        *,
        now: datetime,
        on_write: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Insert and replace actions in ONE transaction: every write is stored, or none.

        The first failure (a name taken meanwhile: InvalidInput; a replaced action gone:
        NotFound; anything ``on_write(done)`` raises) rolls back every write before it.
        """
        out = []
        with self.write_tx() as session:
            for write in writes:
                if isinstance(write, Insert):
                    row = _insert(session, write, now)
                else:
                    row = _apply(session, _live(session, write.name, lock=self), write.change, now)
                out.append(action_to_dict(row))
                if on_write is not None:
                    on_write(len(out))
        return out

    def get(self, name: str) -> dict[str, Any]:
        with self.factory() as session:
            return action_to_dict(_live(session, name))

    def list_actions(self, status: str | None = None) -> list[dict[str, Any]]:
        """Live actions (or, with ``status='archived'``, the archived ones), by name."""
        a = ScheduledAction
        stmt = select(a).order_by(a.name, a.id)
        if status == "archived":
            stmt = stmt.where(a.archived_at.is_not(None))
        else:
            stmt = stmt.where(a.archived_at.is_(None))
            if status:
                stmt = stmt.where(a.status == status)
        with self.factory() as session:
            return [action_to_dict(row) for row in session.scalars(stmt)]

    def mutate(self, name: str, change: Change, *, now: datetime) -> dict[str, Any]:
        """Apply ``change(current) -> new values`` to an action under its row lock.

        ``change`` sees the committed state and may raise (nothing is written then); the
        values it returns (definition fields and ``status``/``next_run_at``) are written in
        the same transaction.
        """
        with self.write_tx() as session:
            row = _apply(session, _live(session, name, lock=self), change, now)
            return action_to_dict(row)

    def archive(self, name: str, *, now: datetime) -> dict[str, Any]:
        """Stop an action for good and keep its history. Queued runs are cancelled;
        a run in flight finishes and is recorded."""
        with self.write_tx() as session:
            row = _live(session, name, lock=self)
            row.status, row.archived_at, row.next_run_at, row.updated_at = (
                "archived",
                now,
                None,
                now,
            )
            e = Execution
            queued = session.execute(
                select(e.id, e.attempt, e.status).where(
                    e.action_id == row.id, e.status.in_(("pending", "retrying"))
                )
            ).all()
            for record in queued:
                close_attempt(
                    self,
                    session,
                    record.id,
                    record.attempt,
                    status="cancelled",
                    error="action deleted before the run started",
                    values={"finished_at": self.now()},
                    from_status=record.status,
                )
            session.flush()
            return action_to_dict(row)

    def set_next_run(self, name: str, next_run_at: datetime | None, *, now: datetime) -> None:
        """Move an action's next slot (operators and tests; beat moves it by claiming)."""
        a = ScheduledAction
        with self.write_tx() as session:
            session.execute(
                update(a)
                .where(a.name == name, a.archived_at.is_(None))
                .values(next_run_at=next_run_at, updated_at=now)
            )


def _insert(session: Session, write: Insert, now: datetime) -> ScheduledAction:
    values = write.values
    row = ScheduledAction(
        **{k: values[k] for k in ACTION_FIELDS if k in values},
        status="active" if write.next_run_at else "completed",
        run_count=0,
        skipped_slots=0,
        next_run_at=write.next_run_at,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError as exc:
        raise InvalidInput(f"an action named {values['name']!r} exists", field="name") from exc
    return row


def _apply(
    session: Session, row: ScheduledAction, change: Change, now: datetime
) -> ScheduledAction:
    values = change(action_to_dict(row))
    for key, value in values.items():
        if key not in (*ACTION_FIELDS, "status", "next_run_at"):
            raise ValueError(f"not a changeable action field: {key}")
        setattr(row, key, value)
    row.updated_at = now
    session.flush()
    return row


def _live(session: Session, name: str, *, lock: Sql | None = None) -> ScheduledAction:
    a = ScheduledAction
    stmt = select(a).where(a.name == name, a.archived_at.is_(None))
    if lock is not None:
        stmt = lock.for_update(stmt)
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"no action named {name!r}")
    return row
