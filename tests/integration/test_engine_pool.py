"""Pooled PostgreSQL connections: a busy worker pays no ping, an idle connection is checked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from gathering_tasks.db import engine as engine_module
from gathering_tasks.db.engine import DbTimeouts, make_engine
from tests.servers import PostgresServer


@pytest.fixture
def pg_engine(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Engine, PostgresServer, str]]:
    name = postgres_server.create_database()
    dsn = postgres_server.dsn(name)
    # Every connection back in the pool counts as idle: each checkout is checked.
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.0)
    engine = make_engine(dsn, DbTimeouts(), pool_size=1, max_overflow=0)
    try:
        yield engine, postgres_server, dsn
    finally:
        engine.dispose()
        postgres_server.drop_database(name)


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_an_idle_connection_killed_under_the_pool_is_replaced_before_use(pg_engine):
    engine, server, _dsn = pg_engine
    # Given a pooled connection, idle
    first = backend_pid(engine)
    # When the server ends its backend (a restart, an idle timeout, a proxy dropping it)
    killer = make_engine(server.dsn("postgres"))
    try:
        with killer.connect() as conn:
            assert conn.execute(text(f"SELECT pg_terminate_backend({first})")).scalar_one()
    finally:
        killer.dispose()
    # Then the next use gets a working connection, not an error
    second = backend_pid(engine)
    assert second != first


def last_query(server: PostgresServer, pid: int) -> str:
    """What the backend ``pid`` last ran, as the server saw it."""
    observer = make_engine(server.dsn("postgres"))
    try:
        with observer.connect() as conn:
            query = conn.execute(
                text("SELECT query FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar_one()
    finally:
        observer.dispose()
    return str(query)


@pytest.mark.parametrize(("idle_s", "pinged"), [(3600.0, False), (0.0, True)])
def test_only_a_connection_idle_past_the_threshold_is_pinged(
    pg_engine, monkeypatch, idle_s: float, pinged: bool
):
    _engine, server, dsn = pg_engine
    # Given the idle threshold (a connection in use a moment ago, or one idle too long)
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", idle_s)
    fresh = make_engine(dsn, DbTimeouts(), pool_size=1, max_overflow=0)
    try:
        pid = backend_pid(fresh)  # a pooled connection, back in the pool
        # When the connection is checked out again, before any work of the caller's
        with fresh.connect() as conn:
            assert conn.connection.dbapi_connection is not None
            seen = last_query(server, pid)
        # Then the server saw a ping only from the idle one (else the pool's reset, last)
        assert (seen == "SELECT 1") is pinged, seen
    finally:
        fresh.dispose()
