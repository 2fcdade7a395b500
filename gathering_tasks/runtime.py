"""Per-process wiring: the repository, Redis and guard built once from settings.

Imports stay light: ``gathering_tasks.db.repo`` brings every store (the pipelines' with
their definitions' models), which beat does not need; it is imported when a repository is
first opened.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.engine import DbTimeouts, dispose_all, session_factory
from gathering_tasks.errors import SchemaMissing
from gathering_tasks.settings import Settings, get_settings

if TYPE_CHECKING:
    from gathering_tasks.db.repo import Repository

UPGRADE_HINT = "run `gathering-tasks db upgrade` (with the same GATHERING_DATABASE_URL) first"


@functools.cache
def repository(database_url: str | None = None) -> Repository:
    from gathering_tasks.db.repo import Repository

    settings = get_settings()
    repo = Repository(sessions(database_url))
    repo.pipelines.max_input_bytes = settings.max_result_bytes
    return repo


@functools.cache
def sessions(database_url: str | None = None) -> sessionmaker[Session]:
    """The session factory of this process's database, checked as :func:`open_repository`
    checks it (what beat works with: it needs no repository)."""
    settings = get_settings()
    return checked_factory(database_url or settings.database_url, settings.db_timeouts)


def open_repository(database_url: str, timeouts: DbTimeouts | None = None) -> Repository:
    """The repository of a migrated database; :class:`SchemaMissing` (never a new empty
    SQLite file) when it was not migrated."""
    from gathering_tasks.db.repo import Repository

    return Repository(checked_factory(database_url, timeouts))


def checked_factory(database_url: str, timeouts: DbTimeouts | None = None) -> sessionmaker[Session]:
    """A session factory of a migrated database (see :func:`open_repository`)."""
    check_sqlite_file(database_url)
    factory = session_factory(database_url, timeouts)
    check_schema(factory, database_url)
    return factory


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
    sessions.cache_clear()
    redis_client.cache_clear()


def settings() -> Settings:
    return get_settings()
