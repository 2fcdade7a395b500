"""What ``gathering-tasks status`` reports: the beat leader, the workers, queues and runs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.exceptions import RedisError

from gathering_tasks import keys
from gathering_tasks.locks import holder

# kombu's Redis transport keeps a queue's messages of priority p > 0 in "<queue>\x06\x16<p>".
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Status:
    """A snapshot of the fleet, as JSON-friendly values (``--json`` prints :meth:`as_dict`)."""

    leader: dict[str, Any]  # {"held": bool, "expires_in_s": float | None, "holder": str | None}
    workers: list[str]  # names that answered a ping
    queues: dict[str, int | None]  # messages waiting (None: not a Redis broker)
    runs_last_hour: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def leader(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Is the beat leader lease held, by which beat (host:pid), and for how much longer?"""
    with client.pipeline(transaction=False) as pipe:
        pipe.pttl(keys.beat_leader(prefix))  # -2: no key, -1: no expiry
        pipe.get(keys.beat_leader(prefix))
        ttl_ms, token = pipe.execute()
    if int(ttl_ms) == -2:
        return {"held": False, "expires_in_s": None, "holder": None}
    expires = round(int(ttl_ms) / 1000, 1) if int(ttl_ms) >= 0 else None
    return {"held": True, "expires_in_s": expires, "holder": holder(token)}


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` on a Redis broker, over its priority lists."""
    names = [queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


def workers_seen(celery_app: Any, timeout_s: float) -> list[str]:
    """The workers that answer a ping within ``timeout_s``."""
    answers = celery_app.control.inspect(timeout=timeout_s).ping() or {}
    return sorted(answers)


def collect(
    *,
    celery_app: Any,
    redis_client: redis.Redis,
    broker_client: redis.Redis | None,
    prefix: str,
    queues: Iterable[str],
    runs_by_status: dict[str, int],
    ping_timeout_s: float,
) -> Status:
    depths: dict[str, int | None] = {}
    for queue in sorted(set(queues)):
        try:
            depths[queue] = queue_depth(broker_client, queue) if broker_client else None
        except RedisError:
            depths[queue] = None
    return Status(
        leader=leader(redis_client, prefix),
        workers=workers_seen(celery_app, ping_timeout_s),
        queues=depths,
        runs_last_hour=dict(sorted(runs_by_status.items())),
    )


def since(now: datetime) -> datetime:
    """The start of the window ``runs_last_hour`` counts."""
    return now - WINDOW
