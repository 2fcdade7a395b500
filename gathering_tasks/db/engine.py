"""Engines and sessions. SQLite gets WAL, a busy timeout and real transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling defers BEGIN and breaks locking; take it over.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A claim takes the write lock up front (BEGIN IMMEDIATE): SQLite's stand-in for
        # SELECT ... FOR UPDATE, so two beats never plan the same due rows at once.
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``database_url`` (PostgreSQL or SQLite)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        _sqlite_setup(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    if url.get_driver_name() == "psycopg2":
        # An executemany UPDATE (beat's claim advances up to beat_batch_size actions) would
        # otherwise be one round trip per row; execute_batch sends pages of statements.
        kwargs.setdefault("executemany_mode", "values_plus_batch")
        kwargs.setdefault("executemany_batch_page_size", 500)
    return create_engine(url, **kwargs)


_FACTORIES: dict[str, sessionmaker[Session]] = {}


def session_factory(database_url: str) -> sessionmaker[Session]:
    """One engine and session factory per database URL per process."""
    factory = _FACTORIES.get(database_url)
    if factory is None:
        factory = sessionmaker(make_engine(database_url), expire_on_commit=False)
        _FACTORIES[database_url] = factory
    return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


def dispose_all(*, close: bool = True) -> None:
    """Drop pooled connections: ``close=False`` after a fork leaves the parent's alone."""
    for factory in _FACTORIES.values():
        factory.kw["bind"].dispose(close=close)
    _FACTORIES.clear()
