"""What every store of the SQL layer shares: write transactions, row locks, the database clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, bindparam, func, literal, select, type_coerce
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.selectable import GenerativeSelect

from gathering_tasks.db.engine import autocommit_twin
from gathering_tasks.db.types import UtcDateTime

_Sel = TypeVar("_Sel", bound=GenerativeSelect)


class Sql:
    """A session factory and its dialect's ways: the base of every store."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.dialect: str = factory.kw["bind"].dialect.name

    @contextmanager
    def write_tx(self) -> Iterator[Session]:
        """A transaction that takes its write locks up front (SQLite: BEGIN IMMEDIATE)."""
        with self.factory() as session:
            if self.dialect == "sqlite":
                session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def single_statement(self) -> Iterator[Connection]:
        """A connection for writes that are each their own transaction: on PostgreSQL in
        autocommit (one round trip a statement, where a transaction adds a ``BEGIN`` and a
        ``COMMIT``); on SQLite a write transaction (:meth:`write_tx`) around them."""
        if self.dialect != "postgresql":
            with self.write_tx() as session:
                yield session.connection()
            return
        with autocommit_twin(self.factory.kw["bind"]).connect() as connection:
            yield connection

    def skip_locked(self, stmt: _Sel, of: Any) -> _Sel:
        """Lock the selected rows, passing over rows another transaction holds (PostgreSQL).

        SQLite has no row locks: there the write transaction itself (BEGIN IMMEDIATE) is
        the lock, and a second claimer waits for it instead of skipping.
        """
        if self.dialect != "postgresql":
            return stmt
        return stmt.with_for_update(skip_locked=True, of=of)

    def for_update(self, stmt: _Sel) -> _Sel:
        """Lock the selected rows until commit (SQLite: the write transaction already does)."""
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_nothing``."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def now(self, plus: timedelta | None = None) -> ColumnElement[datetime]:
        """The database clock, as SQL: liveness is judged by one clock, not each host's.

        PostgreSQL's ``now()``; SQLite lives on the host of every process that opens it, so
        the host clock is the database clock there.
        """
        if self.dialect == "postgresql":
            value = func.now() if plus is None else func.now() + literal(plus)
            return type_coerce(value, UtcDateTime)
        moment = datetime.now(UTC) + (plus or timedelta(0))
        return literal(moment, UtcDateTime)

    def clock(self, name: str = "now", plus: timedelta | None = None) -> ColumnElement[datetime]:
        """:meth:`now` in a statement built once and executed many times: PostgreSQL's
        ``now()``; on SQLite the bind parameter ``name``, which :meth:`clock_values` fills
        (``plus`` then goes with the value: pass the same to both)."""
        if self.dialect == "postgresql":
            return self.now(plus)
        return bindparam(name, type_=UtcDateTime)

    def clock_values(self, **offsets: timedelta) -> dict[str, datetime]:
        """The parameters of :meth:`clock`: ``now``, and one per named offset."""
        if self.dialect == "postgresql":
            return {}
        moment = datetime.now(UTC)
        return {"now": moment, **{name: moment + plus for name, plus in offsets.items()}}

    def read_now(self) -> datetime:
        """The database clock's current time (one round trip on PostgreSQL)."""
        if self.dialect != "postgresql":
            return datetime.now(UTC)
        with self.factory() as session:
            value: datetime = session.execute(select(self.now())).scalar_one()
        return value
