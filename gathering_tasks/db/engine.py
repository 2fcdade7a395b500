"""Engines and sessions. SQLite gets WAL, a busy timeout and real transactions."""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Executable, Row, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "gathering.idle_since"


@dataclass(frozen=True)
class DbTimeouts:
    """Bounds on every database call of a running service (settings derive them).

    A stalled database must not stall a worker indefinitely: a connect, a statement and a
    wait for a row lock each give up after these, and the caller retries or reports.
    """

    connect_s: int = 5
    statement_s: float = 5.0
    lock_s: float = 2.0


def _postgres_args(timeouts: DbTimeouts) -> dict[str, Any]:
    options = (
        f"-c statement_timeout={int(timeouts.statement_s * 1000)} "
        f"-c lock_timeout={int(timeouts.lock_s * 1000)} "
        "-c idle_in_transaction_session_timeout=60000"
    )
    return {
        "connect_timeout": max(1, timeouts.connect_s),
        "options": options,
        # A link that silently drops packets is noticed by TCP keepalives, not never.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN and breaks locking; take it over.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A claim takes the write lock up front (BEGIN IMMEDIATE): SQLite's stand-in for
        # SELECT ... FOR UPDATE, so two beats never plan the same due rows at once.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(database_url: str, timeouts: DbTimeouts | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``database_url`` (PostgreSQL or SQLite).

    ``timeouts`` bound every call (services); without them (migrations, tools) only
    SQLite's generous busy timeout applies.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        busy_ms = int(timeouts.statement_s * 1000) if timeouts else SQLITE_BUSY_TIMEOUT_MS
        _sqlite_setup(engine, busy_ms)
        return engine
    if timeouts is not None and url.get_driver_name() == "psycopg2":
        kwargs.setdefault("connect_args", _postgres_args(timeouts))
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    if url.get_driver_name() == "psycopg2":
        # An executemany UPDATE (beat's claim advances up to beat_batch_size actions) would
        # otherwise be one round trip per row; execute_batch sends pages of statements.
        kwargs.setdefault("executemany_mode", "values_plus_batch")
        kwargs.setdefault("executemany_batch_page_size", 500)
    engine = create_engine(url, **kwargs)
    if "pool_pre_ping" not in kwargs:  # a caller's explicit choice (True, or never) stands
        _ping_when_idle(engine, PING_AFTER_IDLE_S)
    _MADE_WITH[engine] = (database_url, timeouts)
    return engine


# engine -> how it was made (what its autocommit twin is made from), and its twin
_MADE_WITH: weakref.WeakKeyDictionary[Engine, tuple[str, DbTimeouts | None]] = (
    weakref.WeakKeyDictionary()
)
_TWINS: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


def autocommit_twin(engine: Engine) -> Engine:
    """A PostgreSQL engine's twin whose connections are in autocommit from the start (set
    once per connection, not per checkout): for writes that are one statement each, where a
    transaction would add a ``BEGIN`` and a ``COMMIT`` round trip. Same database, timeouts
    and ping after idle; a small pool of its own. Made on first use, per process."""
    twin = _TWINS.get(engine)
    if twin is None:
        database_url, timeouts = _MADE_WITH.get(
            engine, (engine.url.render_as_string(hide_password=False), None)
        )
        twin = make_engine(
            database_url, timeouts, isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=2
        )
        _TWINS[engine] = twin
    return twin


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pessimistic disconnect handling that costs a busy worker nothing: a connection back
    in use within ``idle_s`` is handed out as is (``pool_pre_ping`` would add a round trip
    to every transaction); one idle for longer is pinged first, and a dead one replaced.

    A database restarted under a busy process fails at most the statement in flight; that
    error marks every pooled connection stale, and the caller's retry gets a fresh one.
    """

    @event.listens_for(engine.pool, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_s:
            return  # just connected, or in use a moment ago
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except engine.dialect.loaded_dbapi.Error as error:
            # The pool drops this connection and checks out another (a fresh one).
            raise exc.DisconnectionError(str(error)) from error


def reads_engine(database_url: str, timeouts: DbTimeouts | None = None) -> Engine | None:
    """An engine for the statements a loop reads every tick (beat), PostgreSQL only.

    Its connections are in autocommit and are not pinged on checkout: a tick's read is then
    one round trip, where a pooled session costs a ``SELECT 1``, a ``BEGIN`` and a
    ``ROLLBACK`` around it. A connection found dead is retried (:func:`read_rows`). Writes
    never go through it. None for SQLite, which is in-process: nothing to save there.
    """
    if make_url(database_url).get_backend_name() == "sqlite":
        return None
    return make_engine(
        database_url,
        timeouts,
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=False,
        pool_size=1,
        max_overflow=1,
    )


def read_rows(
    engine: Engine, stmt: Executable, params: Mapping[str, Any] | None = None
) -> Sequence[Row[*tuple[Any, ...]]]:
    """Run one read on a pooled connection of ``engine``; once more if it was dead.

    Without a pre-ping a pooled connection that the server dropped (a restart, an idle
    timeout) is found by its first statement; the pool replaces it, and the read is repeated
    on the new one. A second failure is the caller's.
    """
    try:
        with engine.connect() as conn:
            return conn.execute(stmt, params).all()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with engine.connect() as conn:
        return conn.execute(stmt, params).all()


_FACTORIES: dict[str, sessionmaker[Session]] = {}


def session_factory(database_url: str, timeouts: DbTimeouts | None = None) -> sessionmaker[Session]:
    """One engine and session factory per database URL per process."""
    factory = _FACTORIES.get(database_url)
    if factory is None:
        factory = sessionmaker(make_engine(database_url, timeouts), expire_on_commit=False)
        _FACTORIES[database_url] = factory
    return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


def dispose(engine: Engine) -> None:
    """Close an engine's pooled connections, and its autocommit twin's."""
    twin = _TWINS.pop(engine, None)
    if twin is not None:
        twin.dispose()
    engine.dispose()


def dispose_all(*, close: bool = True) -> None:
    """Drop pooled connections: ``close=False`` after a fork leaves the parent's alone."""
    for factory in _FACTORIES.values():
        factory.kw["bind"].dispose(close=close)
    _FACTORIES.clear()
    for twin in list(_TWINS.values()):
        twin.dispose(close=close)
    _TWINS.clear()
