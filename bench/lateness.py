"""The lateness section: start minus slot through real beat and workers, and across a failover.

1,000 actions every 60 s, their slots spread evenly over the minute (1,000 due per minute,
one every 60 ms), run ``demo.add``. Two ``celery -A gathering_tasks beat`` processes and one
``celery worker`` (concurrency 2) run against the same PostgreSQL and Redis; the first beat
takes the leader lease, the second waits. After a steady phase the leader is SIGKILLed (its
whole process group): the other takes the lease once it expires (``leader_lease_ttl_s``) and
catches up. Lateness of a run = its ``started_at`` (the worker's ``pending -> running``
transaction, database clock) minus its slot; claim lateness = ``created_at`` (the claim's
transaction) minus the slot. Slots are grouped by when they fell due: warm-up (the first
2 s: the worker's pool processes are cold), steady (until 1 s before the kill), failover
(from 1 s before the kill, as a slot due then may have missed the leader's last tick, to TTL
+ 1 s after it), after (the rest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import text

from bench.beat import load_actions
from bench.common import ROOT, Log, Servers, flush, markdown
from bench.dataset import spread_rows
from bench.pipelines import Worker, base_env
from gathering_tasks import keys
from gathering_tasks.db.engine import make_engine
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.settings import Settings

ACTIONS = 1000
EVERY_S = 60.0
CONCURRENCY = 2
START_AFTER_S = 4.0  # the first slot: after the beats and the worker are up
LEADER_WAIT_S = 30.0
STOP_TIMEOUT_S = 15.0
TARGET_P99_S = 0.250
TAIL_S = 3.0  # slots this close to the end are left out (they may not have started yet)
WARM_UP_S = 2.0
FAILOVER_BEFORE_S = 1.0  # the first slots meet the pool processes cold: reported apart


@dataclass(frozen=True)
class Plan:
    steady_s: float  # after the first slot, before the kill
    after_kill_s: float


FULL = Plan(steady_s=60.0, after_kill_s=30.0)
QUICK = Plan(steady_s=6.0, after_kill_s=14.5)


class Beat:
    """One ``celery beat`` process in its own session (so SIGKILL reaches all of it)."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.env, self.workdir = name, env, workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "gathering_tasks",
            "beat",
            "--loglevel=WARNING",
            "-s",
            str(self.workdir / f"{self.name}.schedule"),
            "--pidfile=",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        self.kill()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50_s": quantile(values, 0.50),
        "p99_s": quantile(values, 0.99),
        "max_s": max(values),
    }


def _wait_for_leader(client: redis.Redis, key: str, beat: Beat) -> None:
    deadline = time.monotonic() + LEADER_WAIT_S
    while not client.exists(key):
        if beat.proc is None or beat.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"beat {beat.name} did not take the leader lease:\n"
                f"{beat.log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.05)


def _sleep_until(moment: datetime) -> None:
    delay = (moment - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)


def measure(servers: Servers, *, quick: bool, log: Log) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    pg = servers.pg
    dbname = pg.create_database()
    dsn, url = pg.dsn(dbname), servers.redis_url(0)
    flush(url)
    upgrade(dsn)
    settings = Settings(database_url=dsn, redis_url=url)
    ttl_s = settings.leader_lease_ttl_s
    first_at = datetime.now(UTC) + timedelta(seconds=START_AFTER_S)
    load_actions(pg, dbname, ACTIONS, spread_rows(ACTIONS, EVERY_S, first_at))
    workdir = Path(tempfile.mkdtemp(prefix="gt-latebench-"))
    env = base_env(GATHERING_DATABASE_URL=dsn, GATHERING_REDIS_URL=url)
    worker = Worker("late", "gathering_tasks", settings.default_queue, CONCURRENCY, env, workdir)
    leader, standby = Beat("beat-a", env, workdir), Beat("beat-b", env, workdir)
    client = redis.Redis.from_url(url)
    try:
        worker.start()
        leader.start()
        _wait_for_leader(client, keys.beat_leader(settings.key_prefix), leader)
        standby.start()
        kill_at = first_at + timedelta(seconds=plan.steady_s)
        log(f"lateness: {ACTIONS:,} due per minute; leader SIGKILLed at +{plan.steady_s:g} s")
        _sleep_until(kill_at)
        leader.kill()
        killed_at = datetime.now(UTC)
        log(f"lateness: leader killed; waiting {plan.after_kill_s:g} s (lease TTL {ttl_s:g} s)")
        end_at = killed_at + timedelta(seconds=plan.after_kill_s)
        _sleep_until(end_at)
        worker.check()
    finally:
        for process in (standby, leader, worker):
            process.stop()
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        rows = _records(dsn, first_at, end_at - timedelta(seconds=TAIL_S))
    finally:
        pg.drop_database(dbname)
    return summarize(rows, first_at, killed_at, ttl_s, plan)


def _records(dsn: str, first_at: datetime, last_slot: datetime) -> list[Any]:
    engine = make_engine(dsn)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT scheduled_for, created_at, started_at FROM executions"
                        " WHERE scheduled_for >= :first AND scheduled_for <= :last"
                    ),
                    {"first": first_at, "last": last_slot},
                ).all()
            )
    finally:
        engine.dispose()


def summarize(
    rows: list[Any], first_at: datetime, killed_at: datetime, ttl_s: float, plan: Plan
) -> dict[str, Any]:
    # A slot due just before the kill may have missed the leader's last tick.
    failover_start = killed_at - timedelta(seconds=FAILOVER_BEFORE_S)
    failover_end = killed_at + timedelta(seconds=ttl_s + 1)
    phases: dict[str, dict[str, list[float]]] = {
        p: {"start": [], "claim": []} for p in ("warm-up", "steady", "failover", "after")
    }
    warm_until = first_at + timedelta(seconds=WARM_UP_S)
    not_started = 0
    for slot, created, started in rows:
        phase = (
            "steady" if slot < failover_start else ("failover" if slot <= failover_end else "after")
        )
        phase = "warm-up" if slot < warm_until else phase
        phases[phase]["claim"].append((created - slot).total_seconds())
        if started is None:
            not_started += 1
            continue
        phases[phase]["start"].append((started - slot).total_seconds())
    last_slot = max((row[0] for row in rows), default=first_at)
    expected = int((last_slot - first_at).total_seconds() * ACTIONS / EVERY_S) + 1
    found = {p: {k: stats(v) for k, v in d.items()} for p, d in phases.items()}
    labels = {
        "warm-up": f"warm-up (the first {WARM_UP_S:g} s of slots)",
        "steady": "steady (before the kill)",
        "failover": f"failover (kill - {FAILOVER_BEFORE_S:g} s to kill + TTL {ttl_s:g} s + 1 s)",
        "after": "after the failover",
    }
    rows_out = []
    for phase, label in labels.items():
        for kind, what in (("start", "start - slot"), ("claim", "claim - slot")):
            s = found[phase][kind]
            if not s["count"]:
                continue
            rows_out.append(
                [
                    f"{label}: {what}",
                    str(s["count"]),
                    f"{s['p50_s'] * 1000:,.0f}",
                    f"{s['p99_s'] * 1000:,.0f}",
                    f"{s['max_s'] * 1000:,.0f}",
                ]
            )
    table = markdown(
        ["lateness, 1,000 actions due per minute", "runs", "p50 ms", "p99 ms", "max ms"], rows_out
    )
    steady, failover = found["steady"]["start"], found["failover"]["start"]
    targets = []
    if steady["count"]:
        targets.append(
            [
                "lateness p99 <= 250 ms outside failover",
                f"p99 {steady['p99_s'] * 1000:,.0f} ms (p50 {steady['p50_s'] * 1000:,.0f}, "
                f"max {steady['max_s'] * 1000:,.0f}; {steady['count']} runs)",
                "holds" if steady["p99_s"] <= TARGET_P99_S else "MISSED",
            ]
        )
    if failover["count"]:
        bound = ttl_s + 1
        targets.append(
            [
                f"lateness across a failover <= leader lease TTL + 1 s ({bound:g} s)",
                f"max {failover['max_s']:.2f} s (p99 {failover['p99_s']:.2f} s; "
                f"{failover['count']} runs)",
                "holds" if failover["max_s"] <= bound else "MISSED",
            ]
        )
    notes = [
        f"runs found {len(rows):,} (about {expected:,} slots fell due); not started by the "
        f"end: {not_started}; steady phase {plan.steady_s:g} s, after the kill "
        f"{plan.after_kill_s:g} s"
    ]
    return {
        "plan": plan.__dict__,
        "ttl_s": ttl_s,
        "killed_at": killed_at.isoformat(),
        "first_slot": first_at.isoformat(),
        "phases": found,
        "not_started": not_started,
        "runs": len(rows),
        "tables": [table, "", *notes],
        "targets": targets,
    }
