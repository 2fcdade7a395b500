"""Per-process wiring: the repository, Redis and guard built once from settings."""

from __future__ import annotations

import functools
from pathlib import Path

import redis
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.engine import DbTimeouts, dispose_all, session_factory
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import SchemaMissing
from gathering_tasks.settings import Settings, get_settings

UPGRADE_HINT = "run `gathering-tasks db upgrade` (with the same GATHERING_DATABASE_URL) first"


@functools.cache
def repository(database_url: str | None = None) -> Repository:
    settings = get_settings()
    repo = open_repository(database_url or settings.database_url, settings.db_timeouts)
    repo.pipelines.max_input_bytes = settings.max_result_bytes
    return repo


def open_repository(database_url: str, timeouts: DbTimeouts | None = None) -> Repository:
    """The repository of a migrated database; :class:`SchemaMissing` (never a new empty
    SQLite file) when it was not migrated."""
    check_sqlite_file(database_url)
    factory = session_factory(database_url, timeouts)
    check_schema(factory, database_url)
    return Repository(factory)


def check_sqlite_file(database_url: str) -> None:
    """Refuse a SQLite file that does not exist: opening it would create an empty one."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(str(url.database)).expanduser().resolve()
    if not path.is_file():
        raise SchemaMissing(f"no database at {path}: {UPGRADE_HINT}")


def check_schema(factory: sessionmaker[Session], database_url: str) -> None:
    """Refuse a database that was never migrated, naming it (without its password)."""
    engine = factory.kw["bind"]
    with engine.connect() as conn:
        migrated = inspect(conn).has_table("alembic_version")
    if not migrated:
        where = make_url(database_url).render_as_string(hide_password=True)
        raise SchemaMissing(f"the database at {where} has no schema: {UPGRADE_HINT}")


@functools.cache
def redis_client(redis_url: str | None = None) -> redis.Redis:
    url = redis_url or get_settings().redis_url
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def reset(*, after_fork: bool = False) -> None:
    """Forget per-process clients (after fork; in tests)."""
    dispose_all(close=not after_fork)
    repository.cache_clear()
    redis_client.cache_clear()


def settings() -> Settings:
    return get_settings()
