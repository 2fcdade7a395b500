"""The workers section: guarded ``run_task`` runs against a raw Celery no-op, real workers.

For each concurrency (pool processes) and each side, M messages are queued while no worker
runs, then one ``celery worker`` (prefork, prefetch 1, acks late, events on: the same settings
on both sides, ``bench.pipelines.Worker``) is started and the queue is watched every 10 ms:

* ours: M active ``run_task`` actions (``demo.add``, a handler that returns at once) made due
  and claimed by our beat's own ``BeatEngine.dispatch_due`` (run rows, then messages); each
  message goes through the full path: schema check, Redis lease, ``pending -> running``,
  the handler, the outcome, lease release. Every run is checked ``succeeded`` at the end;
* raw: M ``bench.noop`` messages (``bench.canvas_app``) on their own Redis database.

Throughput is measured once a tenth of the messages has been taken (worker start-up and
warm-up excluded) until the queue and the broker's unacked set are empty. Over the same window
the CPU time of every process involved is read from /proc: the worker's pool processes, its
main process, PostgreSQL, Redis, this process, and the whole machine (other users included).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy import text

from bench import canvas_app
from bench.beat import load_actions
from bench.common import Log, Servers, flush, markdown
from bench.dataset import slot_at_or_before
from bench.pipelines import Worker, base_env
from gathering_tasks import keys
from gathering_tasks.app import celery_config
from gathering_tasks.beat import BeatEngine
from gathering_tasks.db.engine import session_factory
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.db.repo import Repository
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings

OURS_DB, RAW_DB = 0, 1
RAW_QUEUE = "raw"
POLL_S = 0.01
WARM_FRACTION = 0.1
RUN_TIMEOUT_S = 240.0
TARGET_SHARE = 0.70
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...]
    ours_tasks: int
    raw_tasks: int


FULL = Plan((1, 2, 4), ours_tasks=1200, raw_tasks=5000)
QUICK = Plan((2,), ours_tasks=250, raw_tasks=1000)


# -- CPU accounting ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _all_stats() -> dict[int, tuple[int, float]]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            stats[int(entry)] = found
    return stats


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every user)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def postmaster_pid(servers: Servers) -> int:
    return int((Path(servers.pg.datadir) / "postmaster.pid").read_text().split()[0])


class CpuSample:
    """CPU seconds so far of each group of processes."""

    def __init__(self, worker_pid: int, servers: Servers) -> None:
        stats = _all_stats()
        pg = postmaster_pid(servers)
        redis_pid = servers.redis.proc.pid if servers.redis.proc else -1

        def sum_of(pids: list[int]) -> float:
            return sum(stats[p][1] for p in pids if p in stats)

        pool = [p for p, (ppid, _) in stats.items() if ppid == worker_pid]
        self.at = time.monotonic()
        self.groups = {
            "pool processes": sum_of(pool),
            "worker main": sum_of([worker_pid]),
            "PostgreSQL": sum_of([pg, *(p for p, (ppid, _) in stats.items() if ppid == pg)]),
            "Redis": sum_of([redis_pid]),
            "this harness": sum_of([os.getpid()]),
        }
        self.machine = _machine_busy_s()
        self.pool_each = sorted(stats[p][1] for p in pool)


def cores_used(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU cores each group kept busy over the window (1.0 = one core all the time)."""
    wall = after.at - before.at
    used = {k: (after.groups[k] - before.groups.get(k, 0.0)) / wall for k in after.groups}
    used["machine (all processes, every user)"] = (after.machine - before.machine) / wall
    used["of which others"] = used["machine (all processes, every user)"] - sum(
        v for k, v in used.items() if k in after.groups
    )
    return used


# -- the two sides -----------------------------------------------------------------------------


@dataclass
class Run:
    side: str  # "guarded" or "raw"
    concurrency: int
    tasks: int
    measured: int  # messages finished inside the window
    window_s: float
    tasks_per_s: float
    cores: dict[str, float]
    pool_cores_each: list[float]
    verified: str


def watch(
    client: redis.Redis, queue: str, total: int, worker: Worker, servers: Servers
) -> tuple[int, float, dict[str, float], list[float]]:
    """Wait for the warm-up tenth, then time the rest until queue and unacked are empty."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    warm = max(1, int(total * WARM_FRACTION))

    def left() -> int:
        pipe = client.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.hlen("unacked")
        waiting, unacked = pipe.execute()
        return int(waiting) + int(unacked)

    while client.llen(queue) > total - warm:
        worker.check()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{worker.name}: nothing consumed after {RUN_TIMEOUT_S:g} s\n{worker.tail()}"
            )
        time.sleep(POLL_S)
    assert worker.proc is not None
    before, remaining = CpuSample(worker.proc.pid, servers), left()
    started = time.monotonic()
    while left() > 0:
        worker.check()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{worker.name}: not drained after {RUN_TIMEOUT_S:g} s\n{worker.tail()}"
            )
        time.sleep(POLL_S)
    window_s = time.monotonic() - started
    after = CpuSample(worker.proc.pid, servers)
    pool_each = [
        (a - b) / window_s for a, b in zip(after.pool_each, before.pool_each, strict=False)
    ]
    return remaining, window_s, cores_used(before, after), pool_each


class Bench:
    def __init__(self, servers: Servers, workdir: Path, log: Log, actions: int) -> None:
        self.servers, self.workdir, self.log = servers, workdir, log
        self.dbname = servers.pg.create_database()
        self.dsn = servers.pg.dsn(self.dbname)
        upgrade(self.dsn)
        load_actions(servers.pg, self.dbname, actions)
        self.ours_url, self.raw_url = servers.redis_url(OURS_DB), servers.redis_url(RAW_DB)
        self.settings = Settings(database_url=self.dsn, redis_url=self.ours_url)
        self.repo = Repository(session_factory(self.dsn))
        self.engine = self.repo.factory.kw["bind"]
        self.ours_app = Celery("bench-workers-ours", set_as_current=False)
        self.ours_app.conf.update(celery_config(self.settings))
        self.raw_config = raw_config(self.settings, self.raw_url)
        self.raw_app = Celery("bench-workers-raw", set_as_current=False)
        self.raw_app.conf.update(self.raw_config)

    def close(self) -> None:
        self.ours_app.close()
        self.raw_app.close()
        self.engine.dispose()
        self.servers.pg.drop_database(self.dbname)

    def queue_ours(self, m: int) -> None:
        """M due actions claimed and published by our beat's engine (run rows first)."""
        flush(self.ours_url)
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM executions"))
            conn.execute(
                text("UPDATE scheduled_actions SET next_run_at = :slot"),
                {"slot": slot_at_or_before(datetime.now(UTC))},
            )
        client = redis.Redis.from_url(self.ours_url)
        lease = Lease(client, keys.beat_leader(self.settings.key_prefix), 60)
        engine = BeatEngine(self.settings, self.repo, lease, self.ours_app)
        try:
            if not engine.lead():
                raise RuntimeError("the benchmark could not take the beat lease")
            sent = engine.dispatch_due(datetime.now(UTC))
            engine.stop()
        finally:
            client.close()
        if sent != m:
            raise RuntimeError(f"queued {sent} of {m} guarded runs")

    def queue_raw(self, m: int) -> None:
        flush(self.raw_url)
        with self.raw_app.producer_or_acquire() as producer:
            for _ in range(m):
                self.raw_app.send_task(canvas_app.NOOP_TASK, producer=producer)

    def verify_ours(self, m: int) -> str:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT status, count(*) FROM executions GROUP BY status")
            ).all()
        counts = {status: int(count) for status, count in rows}
        if counts.get("succeeded") != m:
            raise RuntimeError(f"guarded runs: expected {m} succeeded, found {counts}")
        return f"{m} runs succeeded"

    def run(self, side: str, concurrency: int, m: int) -> Run:
        if side == "guarded":
            self.queue_ours(m)
            worker = Worker(
                f"ours-c{concurrency}",
                "gathering_tasks",
                self.settings.default_queue,
                concurrency,
                base_env(GATHERING_DATABASE_URL=self.dsn, GATHERING_REDIS_URL=self.ours_url),
                self.workdir,
            )
            url, queue = self.ours_url, self.settings.default_queue
        else:
            self.queue_raw(m)
            env = base_env(**{canvas_app.CONFIG_ENV: json.dumps(self.raw_config)})
            worker = Worker(
                f"raw-c{concurrency}", "bench.canvas_app", RAW_QUEUE, concurrency, env, self.workdir
            )
            url, queue = self.raw_url, RAW_QUEUE
        client = redis.Redis.from_url(url)
        try:
            worker.start()
            measured, window_s, cores, pool_each = watch(client, queue, m, worker, self.servers)
        finally:
            worker.stop()
            client.close()
        verified = self.verify_ours(m) if side == "guarded" else f"{m} messages drained"
        rate = measured / window_s
        self.log(
            f"workers: {side}, concurrency {concurrency}: {rate:,.0f} tasks/s "
            f"({measured} in {window_s:.2f} s)"
        )
        return Run(side, concurrency, m, measured, window_s, rate, cores, pool_each, verified)


def raw_config(settings: Settings, url: str) -> dict[str, Any]:
    """Our worker's Celery settings for the raw side, less our app's own, on its own queue."""
    config = celery_config(Settings(database_url=settings.database_url, redis_url=url))
    for ours_only in ("beat_scheduler", "beat_max_loop_interval", "imports", "task_queues"):
        config.pop(ours_only, None)
    config.update(
        task_default_queue=RAW_QUEUE,
        task_default_exchange=RAW_QUEUE,
        task_default_routing_key=RAW_QUEUE,
    )
    return config


# -- report ------------------------------------------------------------------------------------


def fmt_cores(cores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cores.items())


def saturation(run: Run, cores_available: int) -> str:
    """What the CPU figures say is the limit of this run."""
    machine = run.cores["machine (all processes, every user)"]
    pool = run.cores["pool processes"]
    pg = run.cores["PostgreSQL"]
    parts = []
    if machine >= 0.9 * cores_available:
        parts.append(f"CPU: the machine is {machine / cores_available:.0%} busy")
    if run.pool_cores_each and min(run.pool_cores_each) >= 0.85:
        parts.append("every pool process on a core")
    top = max(
        ("pool processes", pool),
        ("PostgreSQL", pg),
        ("worker main", run.cores["worker main"]),
        ("Redis", run.cores["Redis"]),
        key=lambda kv: kv[1],
    )
    parts.append(f"largest share: {top[0]} ({top[1]:.2f} cores)")
    return "; ".join(parts)


def tables(runs: list[Run], cores_available: int) -> tuple[list[str], list[list[str]]]:
    by = {(r.side, r.concurrency): r for r in runs}
    rows, cpu_rows, targets = [], [], []
    for c in sorted({r.concurrency for r in runs}):
        ours, raw = by.get(("guarded", c)), by.get(("raw", c))
        if not ours or not raw:
            continue
        share = ours.tasks_per_s / raw.tasks_per_s
        rows.append(
            [
                f"concurrency {c}",
                f"{ours.tasks_per_s:,.1f}",
                f"{raw.tasks_per_s:,.1f}",
                f"{share:.3f}x",
                f"{1000 / ours.tasks_per_s * c:.2f}",
                f"{1000 / raw.tasks_per_s * c:.2f}",
            ]
        )
        targets.append(
            [
                f"guarded runs >= 70% of raw Celery no-op throughput, concurrency {c}",
                f"{ours.tasks_per_s:,.1f} vs {raw.tasks_per_s:,.1f} tasks/s = {share:.1%}",
                "holds" if share >= TARGET_SHARE else "MISSED",
            ]
        )
        for r in (ours, raw):
            cpu_rows.append(
                [
                    f"{r.side}, concurrency {c}",
                    f"{r.tasks_per_s:,.1f}",
                    *(f"{r.cores[k]:.2f}" for k in CPU_COLUMNS),
                    " / ".join(f"{x:.2f}" for x in r.pool_cores_each),
                    saturation(r, cores_available),
                ]
            )
    guarded = sorted((r for r in runs if r.side == "guarded"), key=lambda r: r.concurrency)
    if len(guarded) > 1:
        targets.append(scaling_target(guarded, cores_available))
    main = markdown(
        [
            "workers (same settings, same run)",
            "ours guarded tasks/s",
            "raw Celery no-op tasks/s",
            "ratio",
            "ours ms per task per process",
            "raw ms per task per process",
        ],
        rows,
    )
    cpu = markdown(
        [
            "CPU cores kept busy over the window",
            "tasks/s",
            *CPU_COLUMNS,
            "each pool process",
            "what saturates",
        ],
        cpu_rows,
    )
    return [main, "", cpu], targets


def scaling_target(guarded: list[Run], cores_available: int) -> list[str]:
    """Does each doubling of pool processes add >= 20% throughput until the CPU is full?"""
    steps = " -> ".join(f"{r.tasks_per_s:,.1f}" for r in guarded)
    procs = ", ".join(str(r.concurrency) for r in guarded)
    ok: bool | None = True
    note = ""
    for before, after in pairwise(guarded):
        busy = before.cores["machine (all processes, every user)"] / cores_available
        if busy >= 0.9:
            note = f"CPU full from {before.concurrency} processes ({busy:.0%} busy)"
            break
        if after.tasks_per_s < 1.2 * before.tasks_per_s:
            after_busy = after.cores["machine (all processes, every user)"] / cores_available
            others = after.cores["of which others"]
            note = (
                f"{before.concurrency} -> {after.concurrency} processes: "
                f"{after.tasks_per_s / before.tasks_per_s - 1:+.0%}; at {after.concurrency} "
                f"the machine is {after_busy:.0%} busy (other work: {others:.2f} cores)"
            )
            ok = None if after_busy >= 0.9 else False
            break
    measured = f"{steps} tasks/s at {procs} processes; {note or 'scales'}"
    verdict = "n/a (CPU full)" if ok is None else ("holds" if ok else "MISSED")
    return [
        "guarded runs scale with worker processes until a resource saturates",
        measured,
        verdict,
    ]


CPU_COLUMNS = (
    "pool processes",
    "worker main",
    "PostgreSQL",
    "Redis",
    "this harness",
    "machine (all processes, every user)",
    "of which others",
)


def measure(servers: Servers, *, quick: bool, log: Log) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="gt-workerbench-"))
    bench = Bench(servers, workdir, log, plan.ours_tasks)
    runs: list[Run] = []
    try:
        for c in plan.concurrencies:
            runs.append(bench.run("guarded", c, plan.ours_tasks))
            runs.append(bench.run("raw", c, plan.raw_tasks))
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
        flush(servers.redis_url(OURS_DB))
        flush(servers.redis_url(RAW_DB))
    cores = len(os.sched_getaffinity(0))
    table_lines, targets = tables(runs, cores)
    return {
        "plan": asdict(plan),
        "runs": [asdict(r) for r in runs],
        "tables": table_lines,
        "targets": targets,
    }
