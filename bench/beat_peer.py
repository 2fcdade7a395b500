"""Measure the PEER in a fresh process: Celery's own beat scheduler and a plain publish loop.

Run by ``bench/beat.py`` as ``python -m bench.beat_peer --n N --config JSON``: builds a
``beat_schedule`` of N interval entries (none due during the run) and times Celery's
``PersistentScheduler`` (what ``celery beat`` uses by default): start-up, idle tick, peak RSS.
Then times ``app.send_task`` x K with Celery's default producer handling (one producer
acquired per call), as the reference for publish throughput. Imports nothing of ours, so the
RSS is Celery's alone. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.beat import PersistentScheduler

from bench.measure import QUEUE, TickStats, emit, peak_rss_mb, ru_maxrss_mb, time_ticks

# Celery's tick is O(N) (it compares the whole schedule with its copy each time): cap the
# idle loop's wall time so N = 100k stays within the benchmark's budget.
IDLE_BUDGET_S = 8.0
IDLE_MIN_TICKS = 20


def beat_schedule(n: int) -> dict[str, dict[str, Any]]:
    """N interval entries, every 1 to 2 hours, so none falls due while we measure."""
    return {
        f"bench-{i:06d}": {
            "task": "demo.add",
            "schedule": timedelta(seconds=3600 + i % 3600),
            "args": (1, 2),
        }
        for i in range(n)
    }


def publish_loop(app: Celery, client: redis.Redis, count: int) -> dict[str, Any]:
    """``send_task`` ``count`` times, a producer acquired per call (Celery's default)."""
    client.delete(QUEUE)
    started = time.perf_counter()
    for _ in range(count):
        app.send_task("demo.add", args=[1, 2])
    total_s = time.perf_counter() - started
    return {"total_s": total_s, "published": count, "queued": client.llen(QUEUE)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args.config)
    client = redis.Redis.from_url(config["broker_url"])
    with tempfile.TemporaryDirectory(prefix="bench-beat-") as tmp:
        started = time.perf_counter()
        app = Celery("bench-peer", set_as_current=False)
        app.conf.update(config)
        app.conf.beat_schedule = beat_schedule(args.n)
        scheduler = PersistentScheduler(app, schedule_filename=str(Path(tmp) / "schedule"))
        try:
            scheduler.tick()
            startup_s = time.perf_counter() - started
            samples = time_ticks(
                lambda _i: scheduler.tick(),
                count=args.ticks,
                min_count=IDLE_MIN_TICKS,
                budget_s=IDLE_BUDGET_S,
            )
            rss_mb, ru_maxrss = peak_rss_mb(), ru_maxrss_mb()
            publish = [publish_loop(app, client, args.due) for _ in range(args.reps)]
        finally:
            scheduler.close()
            client.close()
    return {
        "n": args.n,
        "startup_s": startup_s,
        "idle": TickStats.of(samples).as_dict(),
        "peak_rss_mb": rss_mb,
        "ru_maxrss_mb": ru_maxrss,
        "publish": publish,
        "publish_median_s": statistics.median(p["total_s"] for p in publish),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, required=True, help="entries in beat_schedule")
    parser.add_argument("--due", type=int, default=1000, help="messages per publish loop")
    parser.add_argument("--ticks", type=int, default=500, help="idle ticks to time")
    parser.add_argument("--reps", type=int, default=5, help="timed publish loops")
    parser.add_argument("--config", required=True, help="the Celery config, as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    emit(measure(args))


if __name__ == "__main__":
    main()
