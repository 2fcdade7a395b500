"""Measure django-celery-beat (``django_celery_beat.schedulers:DatabaseScheduler``): Celery's
heap scheduler over Django-model periodic tasks, reloaded whenever a change marker moves.

Django is set up with ``settings.configure()`` on the benchmark's throwaway PostgreSQL
database (``--url``), no project needed. Run by ``bench/beat.py``: first
``python -m bench.beat_django --load --n N --url DSN`` migrates ``django_celery_beat`` and
bulk-creates N periodic tasks (half intervals, half crontabs, last run now), then a fresh
process measures the sequence of :func:`bench.beat_child.run`. K entries are made due with
one ``QuerySet.update`` of ``last_run_at`` and ``PeriodicTasks.update_changed()``; the edit is
one ``PeriodicTask.save()`` (its signal moves the marker). Imports nothing of ours.
"""

from __future__ import annotations

import importlib
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import django
from django.conf import settings

from bench import beat_child
from bench.measure import spread_ids
from bench.peer_common import (
    OVERDUE,
    PEER_TASK,
    PeerBase,
    crontab_fields,
    entry_name,
    entry_schedule,
    peer_app,
    start_scheduler,
)

CHUNK = 5000


def setup_django(url: str) -> None:
    """Django on the benchmark's database: only what django-celery-beat needs."""
    parts = urlsplit(url)
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": parts.path.lstrip("/"),
                "USER": parts.username or "postgres",
                "HOST": parts.hostname,
                "PORT": str(parts.port),
            }
        },
        INSTALLED_APPS=["django_celery_beat", "django.contrib.contenttypes"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()


def models() -> Any:
    """django_celery_beat.models, which can be imported only once Django is set up."""
    return importlib.import_module("django_celery_beat.models")


def load(n: int) -> None:
    importlib.import_module("django.core.management").call_command("migrate", verbosity=0)
    m = models()
    now = datetime.now(UTC)
    intervals: dict[int, Any] = {}
    crons: dict[tuple[str, ...], Any] = {}
    tasks = []
    for i in range(n):
        schedule = entry_schedule(i, now)
        task = m.PeriodicTask(
            name=entry_name(i), task=PEER_TASK, args="[1, 2]", kwargs="{}", last_run_at=now
        )
        if i % 2 == 0:
            every = int(schedule.total_seconds())
            if every not in intervals:
                intervals[every] = m.IntervalSchedule.objects.create(every=every, period="seconds")
            task.interval = intervals[every]
        else:
            fields = crontab_fields(schedule)
            key = tuple(fields.values())
            if key not in crons:
                crons[key] = m.CrontabSchedule.objects.create(**fields, timezone="UTC")
            task.crontab = crons[key]
        tasks.append(task)
    m.PeriodicTask.objects.bulk_create(tasks, batch_size=CHUNK)
    m.PeriodicTasks.update_changed()


class Django(PeerBase):
    name = "django-celery-beat"

    def __init__(self, n: int, config_json: str) -> None:
        self.app = peer_app(config_json, "bench-django")
        super().__init__(n, self.app.conf.broker_url)
        self.m = models()

    def start(self) -> None:
        scheduler_cls = importlib.import_module("django_celery_beat.schedulers").DatabaseScheduler
        self.scheduler = start_scheduler(self.app, scheduler_cls)
        self.count_sends()
        self.scheduler.tick()

    def make_due(self, k: int) -> None:
        ids = [i + 1 for i in spread_ids(self.n, k)]
        overdue = datetime.now(UTC) - OVERDUE
        self.m.PeriodicTask.objects.filter(id__in=ids).update(last_run_at=overdue)
        self.m.PeriodicTasks.update_changed()

    def settle(self) -> int:
        # What beat does every few minutes: write the dispatched entries' last runs, so that
        # the next reload does not bring the old ones back.
        self.scheduler.sync()
        return super().settle()

    def edit(self) -> bool:
        task = self.m.PeriodicTask.objects.get(id=self.n // 2 + 1)
        task.last_run_at = datetime.now(UTC) - OVERDUE
        task.save()
        return True


def main() -> None:
    args = beat_child.parse_args(__doc__)
    setup_django(args.url)
    if args.load:
        started = time.perf_counter()
        load(args.n)
        print(json.dumps({"load_s": time.perf_counter() - started}))
        return
    beat_child.run(Django(args.n, args.config), args)


if __name__ == "__main__":
    main()
