"""Per-process wiring: the repository, Redis and guard built once from settings."""

from __future__ import annotations

import functools

import redis

from gathering_tasks.db.engine import dispose_all, session_factory
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings, get_settings


@functools.cache
def repository(database_url: str | None = None) -> Repository:
    settings = get_settings()
    factory = session_factory(database_url or settings.database_url, settings.db_timeouts)
    return Repository(factory)


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
