"""Beat benchmark: our database-backed beat next to Celery's own beat, at N scheduled actions.

    .venv/bin/python bench/beat.py [--sizes 1000,10000,100000] [--due 1000] [--quick] [--json F]

Starts a throwaway PostgreSQL and Redis on loopback ports, and for each N loads a fresh,
migrated database with N active actions (COPY), then measures in fresh subprocesses, so that
each peak RSS is independent:

* ours (``bench/beat_ours.py``): start-up of a Celery app + ``DatabaseScheduler`` + first tick,
  idle tick cost, time to claim and publish K due slots, peak RSS, and the plans of the tick's
  queries;
* the peer (``bench/beat_peer.py``): Celery's ``PersistentScheduler`` with N entries in
  ``beat_schedule`` (start-up, idle tick, peak RSS), and a plain ``send_task`` loop of K
  messages (publish throughput).

Prints one table with the spec's targets. Everything started here is stopped on exit, Ctrl-C
included. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

# Run as a script, the repo root (gathering_tasks, tests, bench) is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.dataset import COLUMNS, action_rows
from gathering_tasks.app import celery_config
from gathering_tasks.db.engine import make_engine
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.settings import Settings
from tests.servers import PostgresServer, RedisServer, free_port, running_postgres

ROOT = Path(__file__).resolve().parent.parent
FULL_SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (1_000, 10_000)
CHILD_TIMEOUT_S = 240
COPY_CHUNK = 10_000

IDLE_TICK_TARGET_MS = 5.0
DISPATCH_TARGET_S = 1.0
RSS_TARGET_MB = 150.0
RSS_FLAT_MB = 10.0  # "flat in N": the peak varies by no more than this across the sizes

# -- setup -------------------------------------------------------------------------------------


def load_actions(pg: PostgresServer, dbname: str, n: int) -> float:
    """COPY N actions into a migrated database, then VACUUM ANALYZE. Returns seconds taken."""
    started = time.perf_counter()
    rows = action_rows(n, datetime.now(UTC))
    copy = f"COPY scheduled_actions ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv)"
    engine = make_engine(pg.dsn(dbname))
    try:
        with engine.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            # In chunks, in one transaction: keeps this process small (see README, RSS).
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


# -- subprocesses ------------------------------------------------------------------------------


def run_child(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` from the repo root; return its last stdout line (JSON)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
        # Out of the terminal's process group: Ctrl-C reaches only this process, which
        # then kills the child (subprocess.run does on any exception) and stops the servers.
        start_new_session=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@dataclass(frozen=True)
class SizeResult:
    n: int
    load_s: float
    ours: dict[str, Any]
    peer: dict[str, Any]


def measure_size(
    pg: PostgresServer, broker: RedisServer, n: int, due: int, log: Callable[[str], None]
) -> SizeResult:
    """Load N actions into a fresh database and measure both schedulers against it."""
    dbname = pg.create_database()
    try:
        upgrade(pg.dsn(dbname))
        load_s = load_actions(pg, dbname, n)
        log(f"N={n:,}: loaded in {load_s:.1f}s; measuring ours")
        flush(broker)
        common = ["--n", str(n), "--due", str(min(due, n))]
        ours = run_child(
            "bench.beat_ours",
            *common,
            env={"GATHERING_DATABASE_URL": pg.dsn(dbname), "GATHERING_REDIS_URL": broker.url},
        )
        log(f"N={n:,}: measuring the peer")
        flush(broker)
        config = celery_config(Settings(database_url=pg.dsn(dbname), redis_url=broker.url))
        # what only our worker or beat uses (task_queues holds kombu objects, not JSON)
        for ours_only in ("beat_scheduler", "imports", "task_queues"):
            config.pop(ours_only, None)
        peer = run_child("bench.beat_peer", *common, "--config", json.dumps(config))
    finally:
        pg.drop_database(dbname)
    return SizeResult(n, load_s, ours, peer)


def flush(broker: RedisServer) -> None:
    client = redis.Redis.from_url(broker.url)
    try:
        client.flushall()
    finally:
        client.close()


# -- report ------------------------------------------------------------------------------------


class Row(NamedTuple):
    metric: str
    n: str
    ours: str
    peer: str = "-"
    target: str = ""
    check: str = ""


HEADER = Row("metric", "N", "ours", "peer", "target", "ours vs target")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def startup_rows(r: SizeResult) -> list[Row]:
    ours, peer = ms(r.ours["startup_s"]), ms(r.peer["startup_s"])
    return [Row("start-up: app + scheduler + tick 1", f"{r.n:,}", ours, peer)]


def idle_rows(r: SizeResult) -> list[Row]:
    ours, peer, n = r.ours["idle"], r.peer["idle"], f"{r.n:,}"
    target = f"<= {IDLE_TICK_TARGET_MS:g} ms"
    counts = f"(ours {ours['count']}, peer {peer['count']} ticks)"
    rows = [
        Row(f"idle tick {stat} {counts}", n, f"{ours[key]:.2f} ms", f"{peer[key]:.2f} ms",
            target, verdict(ours[key] <= IDLE_TICK_TARGET_MS))
        for stat, key in (("median", "median_ms"), ("p99", "p99_ms"))
    ]  # fmt: skip
    for kind in ("plain", "sweep"):
        stats = ours[kind]
        label = f"  ours, {kind} ticks ({stats['count']}): median / p99"
        rows.append(Row(label, n, f"{stats['median_ms']:.2f} / {stats['p99_ms']:.2f} ms"))
    return rows


def dispatch_rows(r: SizeResult) -> list[Row]:
    samples, loops, n = r.ours["dispatch"], r.peer["publish"], f"{r.n:,}"
    due = samples[0]["published"]
    median, worst = r.ours["dispatch_median_s"], max(s["total_s"] for s in samples)
    best = min(samples, key=lambda s: s["total_s"])
    verified = all(s["published"] == s["queued"] == s["run_rows"] == due for s in samples)
    queued = f"{samples[-1]['queued']} / {samples[-1]['run_rows']}"
    return [
        Row(f"claim+publish {due:,} due, median of {len(samples)}", n,
            ms(median), ms(r.peer["publish_median_s"]),
            f"<= {DISPATCH_TARGET_S:g} s", verdict(median <= DISPATCH_TARGET_S)),
        Row("  worst run", n, ms(worst), ms(max(p["total_s"] for p in loops))),
        Row("  best run: CPU time of the beat process", n, ms(best["cpu_s"])),
        Row("  best run: claim_due (SQL + planning)", n, ms(best["claim_s"])),
        Row("  best run: of which planning", n, ms(best["plan_s"])),
        Row("  best run: publish", n, ms(best["total_s"] - best["claim_s"]),
            ms(min(p["total_s"] for p in loops))),
        Row("  messages in Redis / run rows", n, queued, str(loops[-1]["queued"]),
            f"{due} / {due}", verdict(verified)),
    ]  # fmt: skip


def rss_rows(results: list[SizeResult]) -> list[Row]:
    rows = [
        Row("peak RSS (VmHWM)", f"{r.n:,}", f"{r.ours['peak_rss_mb']:.1f} MB",
            f"{r.peer['peak_rss_mb']:.1f} MB", f"<= {RSS_TARGET_MB:g} MB",
            verdict(r.ours["peak_rss_mb"] <= RSS_TARGET_MB))
        for r in results
    ]  # fmt: skip
    ours = [r.ours["peak_rss_mb"] for r in results]
    peer = [r.peer["peak_rss_mb"] for r in results]
    spread = max(ours) - min(ours)
    rows.append(
        Row("peak RSS spread over N (max - min)", "all", f"{spread:.1f} MB",
            f"{max(peer) - min(peer):.1f} MB", f"flat: <= {RSS_FLAT_MB:g} MB",
            verdict(spread <= RSS_FLAT_MB))
    )  # fmt: skip
    return rows


def render(rows: list[Row]) -> str:
    widths = [max(len(row[i]) for row in (HEADER, *rows)) for i in range(len(HEADER))]

    def line(row: Row) -> str:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:5], widths[1:5], strict=True)),
            row[5],
        ]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(HEADER), rule, *(line(row) for row in rows)])


def plan_lines(results: list[SizeResult]) -> list[str]:
    """The tick's query plans at the largest N, and whether the due query uses its index."""
    largest = max(results, key=lambda r: r.n)
    out: list[str] = []
    for name, plan in largest.ours["plans"].items():
        out.append(f"EXPLAIN ANALYZE of the {name} query at N={largest.n:,}:")
        out.extend(f"    {line}" for line in plan)
    due_plan = largest.ours["plans"].get("due_query", [])
    uses_index = any("ix_scheduled_actions_due" in line for line in due_plan)
    out.append(f"due query uses ix_scheduled_actions_due: {'yes' if uses_index else 'NO'}")
    return out


def machine_info(pg: PostgresServer, broker: RedisServer) -> list[str]:
    engine = make_engine(pg.dsn())
    try:
        with engine.connect() as conn:
            pg_version = conn.exec_driver_sql("SHOW server_version").scalar_one()
    finally:
        engine.dispose()
    client = redis.Redis.from_url(broker.url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    return [
        f"date:     {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine:  {platform.machine()}, {cpu_model()}, nproc={os.cpu_count()}, "
        f"usable={len(os.sched_getaffinity(0))}, {platform.system()} {platform.release()}",
        f"load:     {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min average at start; "
        "other work on the machine shows up in the p99s)",
        f"software: Python {platform.python_version()}, PostgreSQL {pg_version}, "
        f"Redis {redis_version}, Celery {version('celery')}, kombu {version('kombu')}, "
        f"SQLAlchemy {version('sqlalchemy')}, psycopg2 {version('psycopg2-binary')}",
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark our beat against Celery's beat at N scheduled actions."
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=FULL_SIZES,
        help="comma-separated numbers of actions (default: 1000,10000,100000)",
    )
    parser.add_argument("--due", type=int, default=1000, help="due slots to claim (default 1000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: sizes 1000,10000 only")
    parser.add_argument("--json", type=Path, help="also write the raw measurements to this file")
    return parser.parse_args()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that the finally blocks stop the servers."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> int:
    args = parse_args()
    sizes = QUICK_SIZES if args.quick else args.sizes
    stop_on_sigterm()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        with ExitStack() as stack:
            log("starting PostgreSQL and Redis")
            pg = stack.enter_context(running_postgres())
            # Not running_redis(): it starts the server outside its try, so an interrupt
            # while Redis boots would leave it running.
            # RedisServer.stop() leaves its directory behind: remove it after the stop.
            broker = RedisServer(free_port(), dir=tempfile.mkdtemp(prefix="gt-redis-"))
            stack.callback(shutil.rmtree, broker.dir, ignore_errors=True)
            stack.callback(broker.stop)
            broker.start()
            info = machine_info(pg, broker)
            results = [measure_size(pg, broker, n, args.due, log) for n in sizes]
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        return 130
    rows: list[Row] = []
    for section in (startup_rows, idle_rows, dispatch_rows):
        for result in results:
            rows.extend(section(result))
    rows.extend(rss_rows(results))
    print("\n".join(info))
    print(f"total run time: {time.monotonic() - started:.0f} s\n")
    print(render(rows))
    print()
    print("\n".join(plan_lines(results)))
    if args.json:
        raw = {"machine": info, "results": [dataclasses.asdict(r) for r in results]}
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
