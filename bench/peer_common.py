"""What the peers' beat drivers share: their Celery app, their entries, counting what they send.

Imports Celery and redis-py only (nothing of ours), so a peer's peak RSS is its own.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery, signals
from celery.beat import Scheduler, Service
from celery.schedules import crontab

from bench.measure import QUEUE, Counter

PEER_TASK = "demo.add"
# A last run this long ago makes every entry below due (the crontabs run monthly).
OVERDUE = timedelta(days=40)


def peer_app(config_json: str, name: str) -> Celery:
    """A plain Celery app on the benchmark's configuration (ours, less our beat's own)."""
    app = Celery(name, set_as_current=False)
    app.conf.update(json.loads(config_json))
    return app


def entry_name(i: int) -> str:
    return f"bench-{i:06d}"


def entry_schedule(i: int, now: datetime) -> Any:
    """Half interval entries (1 to 2 hours), half monthly crontabs on a day of the month 2 to
    21 days ahead, in the next hour (django-celery-beat loads only crontabs whose hour is
    within 2 hours of now): none falls due while a run measures, both kinds are evaluated."""
    if i % 2 == 0:
        return timedelta(seconds=3600 + i % 3600)
    return crontab(
        minute=str(i % 60),
        hour=str((now.hour + 1) % 24),
        day_of_month=str((now.day + 2 + i % 20) % 28 + 1),
    )


def crontab_fields(schedule: Any) -> dict[str, str]:
    """A crontab entry's fields, as the SQL peers store them."""
    return {
        "minute": str(schedule._orig_minute),
        "hour": str(schedule._orig_hour),
        "day_of_week": str(schedule._orig_day_of_week),
        "day_of_month": str(schedule._orig_day_of_month),
        "month_of_year": str(schedule._orig_month_of_year),
    }


def beat_schedule(n: int, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    now = now or datetime.now(UTC)
    return {
        entry_name(i): {"task": PEER_TASK, "schedule": entry_schedule(i, now), "args": (1, 2)}
        for i in range(n)
    }


def start_scheduler(app: Celery, scheduler_cls: type[Scheduler], **kwargs: Any) -> Scheduler:
    """The scheduler as ``celery beat`` builds it: ``Service.scheduler``, then ``beat_init``
    (RedBeat takes its lock on that signal)."""
    service = Service(app, scheduler_cls=scheduler_cls, **kwargs)
    scheduler = service.scheduler
    signals.beat_init.send(sender=service)
    return scheduler


class PeerBase:
    """Counting and settling, the same for every peer: ``apply_async`` calls are counted; the
    broker's queue is read and emptied after each dispatch."""

    name = "peer"
    scheduler: Scheduler

    def __init__(self, n: int, broker_url: str) -> None:
        self.n = n
        self.client = redis.Redis.from_url(broker_url)
        self.counter: Counter | None = None

    def count_sends(self) -> None:
        self.counter = Counter(self.scheduler.apply_async)
        self.scheduler.apply_async = self.counter  # type: ignore[method-assign]

    def tick(self) -> None:
        self.scheduler.tick()

    def published(self) -> int:
        return self.counter.calls if self.counter else 0

    def settle(self) -> int:
        queued = int(self.client.llen(QUEUE))
        self.client.delete(QUEUE)
        if self.counter:
            self.counter.calls = 0
        return queued

    def edit(self) -> bool:
        return False

    def extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.scheduler.close()
        self.client.close()
