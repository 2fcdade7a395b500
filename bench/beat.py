"""The beat section of the benchmark: our beat next to every peer, at N scheduled entries.

``bench/run.py`` calls :func:`measure_beat` (``bench/run.py --only beat`` runs it alone).
For each N and each scheduler the entries are written to that scheduler's own store (ours: a
fresh migrated PostgreSQL database, COPY, VACUUM ANALYZE; RedBeat: a Redis database;
sqlalchemy-celery-beat and django-celery-beat: a fresh PostgreSQL database with their own
tables; PersistentScheduler: ``beat_schedule`` in the process), then a fresh subprocess
measures it (``bench/beat_child.py`` says what, in which order). A peer whose package is
missing is skipped and says so. See bench/README.md for what each number means.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bench.common import ChildTimeout, Log, Servers, flush, run_child
from bench.dataset import COLUMNS, action_rows
from gathering_tasks.app import celery_config
from gathering_tasks.db.engine import make_engine
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.settings import Settings
from tests.servers import PostgresServer

COPY_CHUNK = 10_000
BROKER_DB = 0
REDBEAT_DB = 2


@dataclass(frozen=True)
class Scheduler:
    name: str
    module: str
    needs: str | None  # the module that must be importable
    store: str  # "ours", "redis", "postgres", "memory"
    package: str | None = None  # what to install when it is missing


SCHEDULERS = (
    Scheduler("ours", "bench.beat_ours", None, "ours"),
    Scheduler("RedBeat", "bench.beat_redbeat", "redbeat", "redis", "celery-redbeat"),
    Scheduler(
        "sqlalchemy-celery-beat",
        "bench.beat_sqla",
        "sqlalchemy_celery_beat",
        "postgres",
        "sqlalchemy-celery-beat",
    ),
    Scheduler(
        "django-celery-beat",
        "bench.beat_django",
        "django_celery_beat",
        "postgres",
        "django-celery-beat",
    ),
    Scheduler("PersistentScheduler", "bench.beat_peer", None, "memory"),
)
PEERS = tuple(s.name for s in SCHEDULERS if s.name != "ours")


@dataclass(frozen=True)
class BeatOptions:
    sizes: tuple[int, ...]
    dues: tuple[int, ...]
    cap_s: float  # a peer's dispatch or pick-up stops there ("> cap")
    reps: int
    ticks: int
    idle_budget_s: float
    child_timeout_s: float
    sql_sizes: tuple[int, ...] | None = None  # the SQL peers only at these N (quick mode)


def missing(scheduler: Scheduler) -> str | None:
    """Why this scheduler cannot run here, or None."""
    if scheduler.needs and importlib.util.find_spec(scheduler.needs) is None:
        return f"{scheduler.package} is not installed (make bench installs the bench extra)"
    return None


# -- our data ----------------------------------------------------------------------------------


def load_actions(
    pg: PostgresServer, dbname: str, n: int, rows: Iterator[tuple[object, ...]] | None = None
) -> float:
    """COPY N actions (default: ``action_rows``) into a migrated database, then VACUUM
    ANALYZE. Returns seconds taken."""
    started = time.perf_counter()
    rows = rows if rows is not None else action_rows(n, datetime.now(UTC))
    copy = f"COPY scheduled_actions ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv)"
    engine = make_engine(pg.dsn(dbname))
    try:
        with engine.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            # In chunks, in one transaction: keeps this process small.
            while chunk := list(itertools.islice(rows, COPY_CHUNK)):
                buffer = io.StringIO()
                csv.writer(buffer).writerows(chunk)
                buffer.seek(0)
                cursor.copy_expert(copy, buffer)
        # What autovacuum would have done by the time beat runs against a table this size.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE scheduled_actions")
    finally:
        engine.dispose()
    return time.perf_counter() - started


def peer_config(servers: Servers) -> str:
    """Our Celery configuration less what only our beat and worker use, as JSON: the peers
    publish with the same settings (JSON, acks late, task-sent events) to the same broker."""
    config = celery_config(Settings(database_url="sqlite://", redis_url=servers.redis.url))
    for ours_only in ("beat_scheduler", "beat_max_loop_interval", "imports", "task_queues"):
        config.pop(ours_only, None)
    return json.dumps(config)


# -- one measurement ---------------------------------------------------------------------------


def _child_args(n: int, opts: BeatOptions, config: str, url: str) -> list[str]:
    return [
        "--n",
        str(n),
        "--dues",
        ",".join(map(str, opts.dues)),
        "--ticks",
        str(opts.ticks),
        "--idle-budget",
        str(opts.idle_budget_s),
        "--reps",
        str(opts.reps),
        "--cap",
        str(opts.cap_s),
        "--config",
        config,
        "--url",
        url,
    ]


def measure_one(
    servers: Servers, scheduler: Scheduler, n: int, opts: BeatOptions, log: Log
) -> dict[str, Any]:
    """Write N entries to the scheduler's store, then measure it in a fresh process."""
    pg, config = servers.pg, peer_config(servers)
    dbname = pg.create_database() if scheduler.store in ("ours", "postgres") else None
    env: dict[str, str] = {}
    url = ""
    try:
        flush(servers.redis_url(BROKER_DB))
        if scheduler.store == "ours" and dbname:
            upgrade(pg.dsn(dbname))
            load_s = load_actions(pg, dbname, n)
            env = {
                "GATHERING_DATABASE_URL": pg.dsn(dbname),
                "GATHERING_REDIS_URL": servers.redis.url,
            }
        else:
            url = servers.redis_url(REDBEAT_DB) if scheduler.store == "redis" else ""
            url = pg.dsn(dbname) if dbname else url
            load_s = 0.0
            if scheduler.store != "memory":
                loaded = run_child(
                    scheduler.module,
                    *_child_args(n, opts, config, url),
                    "--load",
                    timeout_s=opts.child_timeout_s,
                )
                load_s = loaded["load_s"]
        log(f"beat N={n:,} {scheduler.name}: loaded in {load_s:.1f} s; measuring")
        started = time.monotonic()
        result = run_child(
            scheduler.module,
            *_child_args(n, opts, config, url),
            env=env,
            timeout_s=opts.child_timeout_s,
        )
        result["load_s"], result["wall_s"] = load_s, time.monotonic() - started
        return result
    except ChildTimeout as exc:
        log(f"beat N={n:,} {scheduler.name}: {exc}")
        return {"scheduler": scheduler.name, "n": n, "timeout_s": opts.child_timeout_s}
    finally:
        if dbname:
            pg.drop_database(dbname)


def runs_at(scheduler: Scheduler, n: int, opts: BeatOptions) -> bool:
    return scheduler.store != "postgres" or opts.sql_sizes is None or n in opts.sql_sizes


def measure_beat(servers: Servers, opts: BeatOptions, log: Log) -> dict[str, Any]:
    """Every scheduler at every N. Returns {"results": [...], "skipped": {name: reason}}."""
    skipped = {s.name: why for s in SCHEDULERS if (why := missing(s))}
    for name, why in skipped.items():
        log(f"beat: {name} skipped: {why}")
    results = [
        measure_one(servers, scheduler, n, opts, log)
        for n in opts.sizes
        for scheduler in SCHEDULERS
        if scheduler.name not in skipped and runs_at(scheduler, n, opts)
    ]
    return {"results": results, "skipped": skipped, "options": opts.__dict__}
