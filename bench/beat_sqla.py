"""Measure sqlalchemy-celery-beat (``sqlalchemy_celery_beat.schedulers:DatabaseScheduler``):
Celery's heap scheduler over periodic-task rows, reloaded whenever a change marker moves.

Run by ``bench/beat.py``: first ``python -m bench.beat_sqla --load --n N --url DSN`` creates
its tables (its own ``SessionManager``) and inserts N periodic tasks (half intervals, half
crontabs, last run now), then a fresh process measures the sequence of
:func:`bench.beat_child.run`. K entries are made due with one UPDATE of ``last_run_at`` and
its change marker moved (``PeriodicTaskChanged.update_from_session``); the edit is one
``PeriodicTask`` changed through its ORM session (its listener moves the marker). Imports
nothing of ours.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy_celery_beat.models import (
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    PeriodicTaskChanged,
)
from sqlalchemy_celery_beat.schedulers import DatabaseScheduler
from sqlalchemy_celery_beat.session import SessionManager

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


def session(url: str) -> Any:
    return SessionManager().session_factory(url)


def _schedule_rows(s: Any, n: int, now: datetime) -> list[tuple[str, int]]:
    """(discriminator, schedule id) of each entry; schedule rows shared, as an admin would."""
    intervals: dict[int, int] = {}
    crons: dict[tuple[str, ...], int] = {}
    out: list[tuple[str, int]] = []
    for i in range(n):
        schedule = entry_schedule(i, now)
        if i % 2 == 0:
            every = int(schedule.total_seconds())
            if every not in intervals:
                row = IntervalSchedule(every=every, period="seconds")
                s.add(row)
                s.flush()
                intervals[every] = row.id
            out.append(("intervalschedule", intervals[every]))
        else:
            fields = crontab_fields(schedule)
            key = tuple(fields.values())
            if key not in crons:
                row = CrontabSchedule(**fields, timezone="UTC")
                s.add(row)
                s.flush()
                crons[key] = row.id
            out.append(("crontabschedule", crons[key]))
    return out


def load(n: int, url: str) -> None:
    now = datetime.now(UTC)
    s = session(url)
    try:
        refs = _schedule_rows(s, n, now)
        table = PeriodicTask.__table__
        rows = [
            {
                "name": entry_name(i),
                "task": PEER_TASK,
                "args": "[1, 2]",
                "kwargs": "{}",
                "headers": "{}",
                "one_off": False,
                "enabled": True,
                "last_run_at": now,
                "total_run_count": 0,
                "date_changed": now,
                "description": "",
                "discriminator": kind,
                "schedule_id": ref,
            }
            for i, (kind, ref) in enumerate(refs)
        ]
        for start in range(0, n, CHUNK):
            s.execute(sa.insert(table), rows[start : start + CHUNK])
        s.add(PeriodicTaskChanged(id=1, last_update=now))
        s.commit()
        s.execute(sa.text(f"ANALYZE {table.name}"))
        s.commit()
    finally:
        s.close()


class Sqla(PeerBase):
    name = "sqlalchemy-celery-beat"

    def __init__(self, n: int, config_json: str, url: str) -> None:
        self.app = peer_app(config_json, "bench-sqla")
        self.app.conf.beat_dburi = self.url = url
        super().__init__(n, self.app.conf.broker_url)

    def start(self) -> None:
        self.scheduler = start_scheduler(self.app, DatabaseScheduler)
        self.count_sends()
        self.scheduler.tick()

    def make_due(self, k: int) -> None:
        ids = [i + 1 for i in spread_ids(self.n, k)]
        s = session(self.url)
        try:
            s.execute(
                sa.update(PeriodicTask.__table__)
                .where(PeriodicTask.__table__.c.id.in_(ids))
                .values(last_run_at=datetime.now(UTC) - OVERDUE)
            )
            PeriodicTaskChanged.update_from_session(s)
        finally:
            s.close()

    def settle(self) -> int:
        # What beat does every few minutes: write the dispatched entries' last runs, so that
        # the next reload does not bring the old ones back.
        self.scheduler.sync()
        return super().settle()

    def edit(self) -> bool:
        s = session(self.url)
        try:
            task = s.get(PeriodicTask, self.n // 2 + 1)
            task.last_run_at = datetime.now(UTC) - OVERDUE
            s.commit()
        finally:
            s.close()
        return True


def main() -> None:
    args = beat_child.parse_args(__doc__)
    if args.load:
        started = time.perf_counter()
        load(args.n, args.url)
        print(json.dumps({"load_s": time.perf_counter() - started}))
        return
    beat_child.run(Sqla(args.n, args.config, args.url), args)


if __name__ == "__main__":
    main()
