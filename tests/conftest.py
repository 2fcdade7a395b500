"""Shared fixtures: real Redis and PostgreSQL servers, throwaway databases on both backends."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from gathering_tasks.app import celery_config
from gathering_tasks.db.engine import dispose, session_factory
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.servers import (
    PostgresServer,
    RedisServer,
    ServerMissing,
    running_postgres,
    running_redis,
)

IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(exc: ServerMissing) -> None:
    # In CI a missing server is a broken setup, never a reason to skip.
    if IN_CI:
        pytest.fail(f"{exc} (CI=true: servers are required)")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    try:
        with running_redis() as server:
            yield server
    except ServerMissing as exc:
        _missing(exc)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with running_postgres() as server:
            yield server
    except ServerMissing as exc:
        _missing(exc)


@pytest.fixture(scope="session")
def pg_template(postgres_server: PostgresServer) -> str:
    """A migrated database that each test's database is copied from."""
    name = postgres_server.create_database()
    upgrade(postgres_server.dsn(name))
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "gathering.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database(template=request.getfixturevalue("pg_template"))
    try:
        yield server.dsn(name)
    finally:
        factory = session_factory(server.dsn(name))
        dispose(factory.kw["bind"])
        server.drop_database(name)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def repo(db_url: str) -> Repository:
    return Repository(session_factory(db_url))


@pytest.fixture
def settings(db_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        redis_url=redis_url,
        http_allow_networks=["127.0.0.1/32"],
        run_lease_ttl_s=3,
        pending_grace_s=2,
    )


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app configured like ours, publishing to the test Redis."""
    app = Celery("gathering-tests", set_as_current=False)
    app.conf.update(celery_config(settings))
    yield app
    app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A Redis client on the test server, answering text."""
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()
