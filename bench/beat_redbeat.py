"""Measure RedBeat (``redbeat.RedBeatScheduler``): a Celery beat scheduler that keeps each
entry in a Redis hash and a sorted set of due times, read each tick.

Run by ``bench/beat.py``: first ``python -m bench.beat_redbeat --load --n N --url REDIS``
writes N entries (what ``RedBeatSchedulerEntry.save()`` writes, pipelined), then a fresh
process measures the sequence of :func:`bench.beat_child.run`. K entries are made due the way
``RedBeatSchedulerEntry.reschedule`` does it (meta and score, pipelined); the edit is one
``RedBeatSchedulerEntry.from_key(...).reschedule(...)``. Imports nothing of ours.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis
from redbeat import RedBeatScheduler, RedBeatSchedulerEntry
from redbeat.decoder import RedBeatJSONEncoder, to_timestamp

from bench import beat_child
from bench.measure import spread_ids
from bench.peer_common import (
    OVERDUE,
    PEER_TASK,
    PeerBase,
    entry_name,
    entry_schedule,
    peer_app,
    start_scheduler,
)

PREFIX = "redbeat:"
BATCH = 2000


def redbeat_app(config_json: str, url: str) -> Any:
    app = peer_app(config_json, "bench-redbeat")
    app.conf.redbeat_redis_url = url
    app.conf.redbeat_key_prefix = PREFIX
    return app


def load(n: int, config_json: str, url: str) -> None:
    """Write N entries as ``RedBeatSchedulerEntry.save()`` does, last run now."""
    app = redbeat_app(config_json, url)
    client = redis.Redis.from_url(url)
    client.flushdb()
    now = datetime.now(UTC)
    schedule_key = PREFIX + ":schedule"
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        entry = RedBeatSchedulerEntry(
            entry_name(i), PEER_TASK, entry_schedule(i, now), args=(1, 2), app=app
        )
        entry.last_run_at = now
        definition = {
            "name": entry.name,
            "task": entry.task,
            "args": entry.args,
            "kwargs": entry.kwargs,
            "options": entry.options,
            "schedule": entry.schedule,
            "enabled": entry.enabled,
        }
        pipe.hset(entry.key, "definition", json.dumps(definition, cls=RedBeatJSONEncoder))
        pipe.hset(entry.key, "meta", json.dumps({"last_run_at": now}, cls=RedBeatJSONEncoder))
        pipe.zadd(schedule_key, {entry.key: entry.score})
        if i % BATCH == BATCH - 1:
            pipe.execute()
    pipe.execute()
    client.close()


class RedBeat(PeerBase):
    name = "RedBeat"

    def __init__(self, n: int, config_json: str, url: str) -> None:
        self.app = redbeat_app(config_json, url)
        self.redbeat = redis.Redis.from_url(url)
        super().__init__(n, self.app.conf.broker_url)

    def start(self) -> None:
        self.scheduler = start_scheduler(self.app, RedBeatScheduler)
        if self.scheduler.lock is None:
            raise RuntimeError("RedBeat did not take its lock")
        self.count_sends()
        self.scheduler.tick()

    def make_due(self, k: int) -> None:
        overdue = datetime.now(UTC) - OVERDUE
        meta = json.dumps({"last_run_at": overdue}, cls=RedBeatJSONEncoder)
        score = to_timestamp(overdue)
        pipe = self.redbeat.pipeline(transaction=False)
        for i in spread_ids(self.n, k):
            key = PREFIX + entry_name(i)
            pipe.hset(key, "meta", meta)
            pipe.zadd(PREFIX + ":schedule", {key: score})
        pipe.execute()

    def edit(self) -> bool:
        key = RedBeatSchedulerEntry.generate_key(self.app, entry_name(self.n // 2))
        entry = RedBeatSchedulerEntry.from_key(key, app=self.app)
        entry.reschedule(last_run_at=datetime.now(UTC) - OVERDUE)
        return True

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.redbeat.close()


def main() -> None:
    args = beat_child.parse_args(__doc__)
    if args.load:
        started = time.perf_counter()
        load(args.n, args.config, args.url)
        print(json.dumps({"load_s": time.perf_counter() - started}))
        return
    beat_child.run(RedBeat(args.n, args.config, args.url), args)


if __name__ == "__main__":
    main()
