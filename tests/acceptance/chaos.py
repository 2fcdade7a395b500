"""Chaos run: real beat and worker processes are killed and restarted, Redis is bounced.

``call_api`` actions POST to a local sink that records every request with its
``Idempotency-Key``. Meanwhile each chaos round, in order:

1. SIGKILLs a worker while it is in the middle of an HTTP call, and starts a new one;
2. SIGKILLs the leader beat while a second beat stands by (failover time is measured: leader
   killed -> first slot claimed by the standby), and starts a new standby;
3. stops Redis (no persistence: every message and lease is gone) and starts it again;
4. stops every beat for several intervals, then starts two again (missed slots catch up).

After the schedule window it checks, slot by slot: every expected slot has exactly one run
record, which succeeded; the sink received every slot's key; distinct keys == slots; and the
only repeated deliveries are of runs that a worker kill interrupted mid-call.

``python -m tests.acceptance.chaos [--long]`` starts its own throwaway Redis and PostgreSQL;
``tests/acceptance/test_chaos.py`` runs :data:`CI` against the test session's PostgreSQL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.api import ActionService
from gathering_tasks.db.engine import session_factory
from gathering_tasks.db.ledger import FINAL, UNFINISHED
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.db.models import ScheduledAction, ScheduledActionRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.acceptance.procs import CeleryProcess, Stack, running_stack, stack_env
from tests.servers import RedisServer, free_port, running_postgres, wait_for

Out = Callable[[str], None]
LEADER_LINES = ("beat is now the leader", "beat lost the leader lease")


@dataclass(frozen=True)
class ChaosConfig:
    """The size and pace of a chaos run. Half the actions are slow: the sink holds them."""

    actions: int
    window_s: float  # slots run from the anchor to anchor + window_s
    rounds: int | None  # chaos rounds; None: as many as fit in the window
    workers: int = 2
    concurrency: int = 4
    fast_every_s: float = 1.0
    slow_every_s: float = 2.0
    slow_hold_s: float = 1.5  # how long the sink holds a slow request (kills land mid-call)
    redis_down_s: float = 3.0  # longer than the run lease TTL and than one interval
    beat_down_s: float = 6.0  # several intervals
    between_rounds_s: float = 0.0  # normal operation between two rounds
    calm_s: float = 8.0  # normal operation after the last round, before the window ends
    step_timeout_s: float = 30.0
    drain_timeout_s: float = 60.0


# One round takes about 30 s on a 2-core machine; the window leaves it more than half as much
# again before the calm end (a round that does not fit fails the run, it is never cut short).
CI = ChaosConfig(actions=6, window_s=50, rounds=1)
LONG = ChaosConfig(
    actions=16, window_s=600, rounds=None, workers=3, concurrency=8, between_rounds_s=10
)


# -- the sink ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    path: str
    key: str | None
    at: float


class Sink:
    """A local HTTP receiver that records every request and its idempotency key, answers 200.

    Requests to ``/hook/slow-*`` are held ``hold_s`` before the answer, so that at any moment
    some runs are in the middle of their call: that is where a worker kill must land.
    """

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.deliveries: list[Delivery] = []
        self._in_flight: dict[str, list[float]] = {}  # key -> when each open request came
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sink")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key")
                sink.received(self.path, key)
                try:
                    sink.hold(self.path)
                    body = b'{"ok":true}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the caller was killed mid-call: nobody is listening any more
                finally:
                    sink.answered(key)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the sink's record is the log."""

        return Handler

    def received(self, path: str, key: str | None) -> None:
        with self._lock:
            self.deliveries.append(Delivery(path, key, time.time()))
            self._in_flight.setdefault(key or "", []).append(time.monotonic())

    def hold(self, path: str) -> None:
        """Keep a slow request waiting (cut short when the sink closes)."""
        if "/slow-" in path:
            self._closing.wait(self.hold_s)

    def answered(self, key: str | None) -> None:
        with self._lock:
            self._in_flight[key or ""].pop(0)

    def in_flight(self, *, max_age_s: float | None = None) -> set[str]:
        """Keys of requests that reached the sink and still wait for their answer.

        ``max_age_s`` keeps only requests that arrived that recently, so a kill that follows
        at once still lands before the answer.
        """
        oldest = time.monotonic() - max_age_s if max_age_s is not None else float("-inf")
        with self._lock:
            return {
                k
                for k, times in self._in_flight.items()
                if k and max(times, default=oldest - 1) >= oldest
            }

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def url(self, action_name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{action_name}"

    def __enter__(self) -> Sink:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# -- reading the database -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunRow:
    id: int
    action_id: int
    scheduled_for: datetime
    status: str
    attempt: int
    trigger: str
    idempotency_key: str


class Probe:
    """The harness's read-only view of the run records."""

    def __init__(self, database_url: str) -> None:
        self._factory: sessionmaker[Session] = session_factory(database_url)

    def _scalars(self, stmt: Any) -> list[Any]:
        with self._factory() as session:
            return list(session.scalars(stmt))

    def runs(self) -> list[RunRow]:
        r = ScheduledActionRun
        stmt = select(
            r.id, r.action_id, r.scheduled_for, r.status, r.attempt, r.trigger, r.idempotency_key
        )
        with self._factory() as session:
            return [RunRow(*row) for row in session.execute(stmt).all()]

    def ids_of_keys(self, keys: set[str]) -> set[int]:
        """The runs whose idempotency key is one of ``keys`` (what the sink saw)."""
        r = ScheduledActionRun
        return (
            set(self._scalars(select(r.id).where(r.idempotency_key.in_(keys)))) if keys else set()
        )

    def running_on(self, worker: CeleryProcess) -> set[int]:
        r = ScheduledActionRun
        stmt = select(r.id).where(r.status == "running", r.worker.startswith(f"{worker.name}@"))
        return set(self._scalars(stmt))

    def workers_of(self, run_ids: set[int]) -> dict[int, str]:
        """The worker of each of these runs that is ``running``."""
        r = ScheduledActionRun
        stmt = select(r.id, r.worker).where(r.id.in_(run_ids), r.status == "running")
        with self._factory() as session:
            return {row.id: row.worker or "" for row in session.execute(stmt).all()}

    def unfinished(self) -> set[int]:
        r = ScheduledActionRun
        return set(self._scalars(select(r.id).where(r.status.in_(UNFINISHED))))

    def all_final(self, run_ids: set[int]) -> bool:
        r = ScheduledActionRun
        stmt = select(func.count()).where(r.id.in_(run_ids), r.status.in_(FINAL))
        return bool(self._scalars(stmt)[0] == len(run_ids))

    def first_claim_after(self, at: datetime) -> datetime | None:
        r = ScheduledActionRun
        found: datetime | None = self._scalars(
            select(func.min(r.created_at)).where(r.created_at > at)
        )[0]
        return found

    def succeeded_since(self, at: datetime, *, trigger: str | None = None) -> bool:
        r = ScheduledActionRun
        stmt = select(r.id).where(r.created_at > at, r.status == "succeeded").limit(1)
        if trigger:
            stmt = stmt.where(r.trigger == trigger)
        return bool(self._scalars(stmt))

    def started_on_since(self, worker: CeleryProcess, at: datetime) -> bool:
        r = ScheduledActionRun
        stmt = (
            select(r.id).where(r.worker.startswith(f"{worker.name}@"), r.started_at > at).limit(1)
        )
        return bool(self._scalars(stmt))

    def settled(self) -> bool:
        """Every action's window is over and every run is final."""
        a = ScheduledAction
        active = self._scalars(select(a.id).where(a.status == "active").limit(1))
        return not active and not self.unfinished()


# -- the actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedAction:
    id: int
    name: str
    anchor: datetime
    every_s: float
    end_at: datetime

    def slots(self) -> list[datetime]:
        """Every slot of the schedule window: ``anchor + k * every_s`` up to ``end_at``."""
        step = timedelta(seconds=self.every_s)
        count = int((self.end_at - self.anchor) / step) + 1
        return [self.anchor + k * step for k in range(count)]


def action_service(database_url: str, redis_url: str) -> ActionService:
    settings = Settings(
        database_url=database_url, redis_url=redis_url, http_allow_networks=["127.0.0.1/32"]
    )
    repo = Repository(session_factory(database_url))
    return ActionService(repo, settings, task_allowed=lambda _n: False)


def create_action(
    service: ActionService,
    sink: Sink,
    name: str,
    *,
    anchor: datetime,
    every_s: float,
    window_s: float,
) -> PlannedAction:
    """A ``call_api`` action POSTing to the sink every ``every_s`` for ``window_s``."""
    # Half an interval past the last slot: no slot sits on the boundary.
    end_at = anchor + timedelta(seconds=window_s + every_s / 2)
    row = service.create(
        {
            "name": name,
            "action_type": "call_api",
            "config": {"method": "POST", "url": sink.url(name), "json": {"action": name}},
            "schedule": {"kind": "interval", "every_s": every_s, "anchor": anchor.isoformat()},
            "end_at": end_at,
            "catchup_mode": "all",
            "overlap_policy": "allow",
            "retry_max_attempts": 5,
            "retry_backoff_s": 1,
        }
    )
    return PlannedAction(row["id"], name, anchor, every_s, end_at)


def create_actions(
    service: ActionService, config: ChaosConfig, sink: Sink, anchor: datetime
) -> list[PlannedAction]:
    """``config.actions`` actions, every other one slow, their slots spread over a second."""
    planned = []
    for i in range(config.actions):
        slow = i % 2 == 1
        planned.append(
            create_action(
                service,
                sink,
                f"{'slow' if slow else 'fast'}-{i:02}",
                anchor=anchor + timedelta(milliseconds=100 * (i % 10)),
                every_s=config.slow_every_s if slow else config.fast_every_s,
                window_s=config.window_s,
            )
        )
    return planned


# -- the processes ----------------------------------------------------------------------------


class Cluster:
    """The workers and beats of the run, each incarnation under a new name."""

    def __init__(self, stack: Stack, config: ChaosConfig) -> None:
        self.stack = stack
        self.config = config
        self.workers: list[CeleryProcess] = []
        self.beats: list[CeleryProcess] = []
        self.killed: set[str] = set()

    def start_worker(self) -> CeleryProcess:
        proc = self.stack.worker(f"w{len(self.workers) + 1}", self.config.concurrency)
        self.workers.append(proc)
        return proc

    def start_beat(self) -> CeleryProcess:
        proc = self.stack.beat(f"b{len(self.beats) + 1}")
        self.beats.append(proc)
        return proc

    def live_workers(self) -> list[CeleryProcess]:
        return [p for p in self.workers if p.alive]

    def live_beats(self) -> list[CeleryProcess]:
        return [p for p in self.beats if p.alive]

    def kill(self, proc: CeleryProcess) -> None:
        self.killed.add(proc.name)
        proc.kill()

    def stop(self, proc: CeleryProcess) -> None:
        self.killed.add(proc.name)
        proc.stop()

    def leader(self) -> CeleryProcess | None:
        """The one live beat whose latest leadership line says it leads (None if unclear)."""
        leaders = [p for p in self.live_beats() if _last_leadership_line(p) == LEADER_LINES[0]]
        return leaders[0] if len(leaders) == 1 else None

    def check_alive(self) -> None:
        """A process that died without being killed is a product bug, not chaos."""
        for proc in (*self.workers, *self.beats):
            if proc.name not in self.killed and not proc.alive:
                raise AssertionError(f"{proc.name} died on its own:\n{proc.log_text()[-3000:]}")


def _last_leadership_line(proc: CeleryProcess) -> str | None:
    last = None
    for line in proc.log_text().splitlines():
        for marker in LEADER_LINES:
            if marker in line:
                last = marker
    return last


# -- the chaos ------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ChaosLog:
    """What the chaos did, for the checks and the report."""

    interrupted: set[int] = field(default_factory=set)  # runs a worker kill cut mid-call
    failovers_s: list[float] = field(default_factory=list)
    rounds: int = 0


class Chaos:
    """The four disruptions, each followed by a check that the system recovered."""

    def __init__(
        self,
        cluster: Cluster,
        probe: Probe,
        sink: Sink,
        redis_server: RedisServer,
        config: ChaosConfig,
        out: Out,
    ) -> None:
        self.cluster, self.probe, self.sink = cluster, probe, sink
        self.redis, self.config, self.out = redis_server, config, out
        self.log = ChaosLog()
        self._t0 = time.monotonic()

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self._t0:7.1f}s] {text}")

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float | None = None) -> Any:
        """Poll ``predicate`` until it holds; a process dying on its own fails at once."""
        limit_s = timeout_s or self.config.step_timeout_s
        deadline = time.monotonic() + limit_s
        while True:
            self.cluster.check_alive()
            try:
                return wait_for(predicate, 1.0, what, interval_s=0.1)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"timed out after {limit_s}s waiting for {what}") from None

    def hold(self, seconds: float, what: str) -> None:
        """Let ``seconds`` of an outage (or of normal operation) pass, watching the processes."""
        until = time.monotonic() + seconds
        self.wait(lambda: time.monotonic() >= until, what, timeout_s=seconds + 5)

    def round(self) -> None:
        self.log.rounds += 1
        self.say(f"round {self.log.rounds}")
        self.kill_worker_mid_call()
        self.kill_leader_beat()
        self.restart_redis()
        self.stop_beats()

    def kill_worker_mid_call(self) -> None:
        victim = self.wait(self._worker_in_a_call, "a worker in the middle of an HTTP call")
        self.cluster.kill(victim)
        # Nothing new can start on a dead worker, so what it left running it left mid-run.
        interrupted = self.probe.running_on(victim)
        self.log.interrupted |= interrupted
        replacement = self.cluster.start_worker()
        self.say(
            f"SIGKILLed worker {victim.name} mid-call (runs {sorted(interrupted)} interrupted); "
            f"started {replacement.name}"
        )
        self.wait(lambda: self.probe.all_final(interrupted), "the interrupted runs to finish")
        self.say(f"interrupted runs {sorted(interrupted)} recovered and finished")

    def _worker_in_a_call(self) -> CeleryProcess | None:
        keys = self.sink.in_flight(max_age_s=self.sink.hold_s / 2)
        ids = self.probe.ids_of_keys({key for key in keys if key})
        busy = set(self.probe.workers_of(ids).values()) if ids else set()
        for proc in self.cluster.live_workers():
            if any(name.startswith(f"{proc.name}@") for name in busy):
                return proc
        return None

    def kill_leader_beat(self) -> None:
        leader = self.wait(self.cluster.leader, "one beat to lead")
        standbys = [p.name for p in self.cluster.live_beats() if p is not leader]
        assert standbys, "no standby beat to take over"
        killed_at = utcnow()
        self.cluster.kill(leader)
        claimed_at = self.wait(
            lambda: self.probe.first_claim_after(killed_at), "the standby to claim a slot"
        )
        failover_s = (claimed_at - killed_at).total_seconds()
        self.log.failovers_s.append(failover_s)
        fresh = self.cluster.start_beat()
        self.say(
            f"SIGKILLed leader beat {leader.name}; standby {standbys} claimed the first slot "
            f"after {failover_s:.2f}s; started standby {fresh.name}"
        )

    def restart_redis(self) -> None:
        # Stop while runs are mid-call: their leases vanish with Redis, their heartbeats live on.
        self.wait(self.sink.in_flight, "a run in the middle of its call")
        unfinished = self.probe.unfinished()
        self.redis.stop()
        self.say(f"stopped Redis ({len(unfinished)} runs unfinished)")
        self.hold(self.config.redis_down_s, "Redis to stay down")
        self.redis.start()
        up_at = utcnow()
        self.say("started Redis again (empty: messages and leases are gone)")
        self.wait(lambda: self.probe.succeeded_since(up_at), "a slot claimed after the restart")
        for worker in self.cluster.live_workers():
            self.wait(
                lambda w=worker: self.probe.started_on_since(w, up_at),
                f"worker {worker.name} to run again after the restart",
            )
        self.wait(lambda: self.probe.all_final(unfinished), "the runs caught by the outage")
        self.say("every worker runs again; the runs caught by the outage finished")

    def stop_beats(self) -> None:
        beats = self.cluster.live_beats()
        for beat in beats:
            self.cluster.stop(beat)
        self.say(f"stopped beats {[b.name for b in beats]}")
        self.hold(self.config.beat_down_s, "beat to stay down")
        started = [self.cluster.start_beat(), self.cluster.start_beat()]
        back_at = utcnow()
        self.say(f"started beats {[b.name for b in started]}")
        self.wait(
            lambda: self.probe.succeeded_since(back_at, trigger="recovery"),
            "the missed slots to be caught up",
        )
        self.say("missed slots caught up")


# -- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosReport:
    slots: int
    succeeded: int
    missing: int
    duplicate_runs: int
    deliveries: int
    distinct_keys: int
    interrupted: int
    failovers_s: tuple[float, ...]
    rounds: int
    problems: tuple[str, ...]

    @property
    def duplicate_deliveries(self) -> int:
        return self.deliveries - self.distinct_keys

    def summary(self) -> str:
        return (
            f"slots={self.slots} succeeded={self.succeeded} missing={self.missing} "
            f"duplicate_runs={self.duplicate_runs} "
            f"duplicate_deliveries={self.duplicate_deliveries} "
            f"(deliveries={self.deliveries} distinct_keys={self.distinct_keys} "
            f"interrupted_runs={self.interrupted} rounds={self.rounds})"
        )

    def failover(self) -> str:
        times = self.failovers_s
        if not times:
            return "failover: not measured"
        text = "failover (leader beat SIGKILLed -> first slot claimed by the standby): "
        if len(times) == 1:
            return text + f"{times[0]:.2f}s"
        return text + (
            f"median {statistics.median(times):.2f}s max {max(times):.2f}s "
            f"min {min(times):.2f}s over {len(times)} kills"
        )


def check(
    planned: list[PlannedAction], runs: list[RunRow], deliveries: list[Delivery], log: ChaosLog
) -> ChaosReport:
    """Slot by slot: one succeeded run each, every key delivered, repeats only where killed."""
    problems: list[str] = []
    expected = {(a.id, slot) for a in planned for slot in a.slots()}
    by_slot: dict[tuple[int, datetime], list[RunRow]] = {}
    for run in runs:
        by_slot.setdefault((run.action_id, run.scheduled_for), []).append(run)
    duplicate_runs = len(runs) - len(by_slot)
    succeeded = {s for s in expected if [r.status for r in by_slot.get(s, [])] == ["succeeded"]}
    missing = expected - succeeded
    for action_id, slot in sorted(missing)[:10]:
        found = [(r.id, r.status) for r in by_slot.get((action_id, slot), [])]
        problems.append(f"slot {action_id}@{slot.isoformat()} has runs {found}")
    unexpected = set(by_slot) - expected
    if unexpected:
        problems.append(f"{len(unexpected)} run(s) outside the schedule: {sorted(unexpected)[:5]}")
    if duplicate_runs:
        problems.append(f"{duplicate_runs} slot(s) have more than one run record")
    problems += _check_deliveries(planned, runs, deliveries, log, slots=len(expected))
    return ChaosReport(
        slots=len(expected),
        succeeded=len(succeeded),
        missing=len(missing),
        duplicate_runs=duplicate_runs,
        deliveries=len(deliveries),
        distinct_keys=len({d.key for d in deliveries}),
        interrupted=len(log.interrupted),
        failovers_s=tuple(log.failovers_s),
        rounds=log.rounds,
        problems=tuple(problems),
    )


def _check_deliveries(
    planned: list[PlannedAction],
    runs: list[RunRow],
    deliveries: list[Delivery],
    log: ChaosLog,
    *,
    slots: int,
) -> list[str]:
    problems = []
    run_by_key = {run.idempotency_key: run for run in runs}
    names = {a.id: a.name for a in planned}
    counts = Counter(d.key for d in deliveries)
    for delivery in deliveries:
        run = run_by_key.get(delivery.key or "")
        if run is None:
            problems.append(f"a delivery carries an unknown key {delivery.key!r}")
        elif not delivery.path.endswith(f"/{names[run.action_id]}"):
            problems.append(f"run {run.id} was delivered to {delivery.path}")
    undelivered = [r.id for r in runs if r.idempotency_key not in counts]
    if undelivered:
        problems.append(f"the sink never received runs {undelivered[:10]}")
    if len(counts) != slots:
        problems.append(f"distinct keys {len(counts)} != slots {slots}")
    repeated = {run_by_key[key].id for key, n in counts.items() if n > 1 and key in run_by_key}
    unexplained = repeated - log.interrupted
    if unexplained:
        problems.append(f"runs delivered twice without a kill mid-call: {sorted(unexplained)}")
    # The sink never fails a call: only a kill may give a run a second attempt.
    reattempted = {r.id for r in runs if r.attempt > 1} - log.interrupted
    if reattempted:
        problems.append(f"runs attempted twice without a kill: {sorted(reattempted)[:10]}")
    return problems[:20]


# -- one whole run --------------------------------------------------------------------------


def run_chaos(
    config: ChaosConfig,
    *,
    database_url: str,
    redis_server: RedisServer,
    workdir: Path,
    out: Out = print,
) -> ChaosReport:
    """Run ``config`` against a migrated database and a Redis this run may stop and start."""
    service = action_service(database_url, redis_server.url)
    probe = Probe(database_url)
    started = time.monotonic()
    with (
        Sink(config.slow_hold_s) as sink,
        running_stack(stack_env(database_url, redis_server.url), workdir) as stack,
    ):
        cluster = Cluster(stack, config)
        chaos = Chaos(cluster, probe, sink, redis_server, config, out)
        try:
            planned = _run_window(chaos, service, config)
        except BaseException:
            out(stack.logs())
            raise
        runs = probe.runs()
        report = check(planned, runs, sink.snapshot(), chaos.log)
    out(f"chaos finished in {time.monotonic() - started:.0f}s")
    for problem in report.problems:
        out(f"PROBLEM: {problem}")
    out(report.failover())
    out(report.summary())
    return report


def _run_window(chaos: Chaos, service: ActionService, config: ChaosConfig) -> list[PlannedAction]:
    cluster = chaos.cluster
    for _ in range(config.workers):
        cluster.start_worker()
    cluster.start_beat()
    cluster.start_beat()
    anchor = utcnow().replace(microsecond=0) + timedelta(seconds=4)
    planned = create_actions(service, config, chaos.sink, anchor)
    window_end = max(a.end_at for a in planned)
    chaos.say(
        f"{len(planned)} actions, window {config.window_s:.0f}s, "
        f"{len(cluster.workers)} workers x {config.concurrency}, 2 beats"
    )
    chaos.wait(lambda: chaos.probe.succeeded_since(anchor - timedelta(seconds=60)), "a first run")
    for _ in _rounds(config, window_end):
        chaos.round()
        chaos.hold(config.between_rounds_s, "normal operation between rounds")
    if utcnow() > window_end - timedelta(seconds=config.calm_s):
        raise AssertionError("the chaos did not fit in the schedule window; make it longer")
    chaos.say("chaos over; waiting for the window to end and every run to finish")
    remaining_s = (window_end - utcnow()).total_seconds()
    chaos.wait(
        chaos.probe.settled, "every slot to be run", timeout_s=remaining_s + config.drain_timeout_s
    )
    return planned


def _rounds(config: ChaosConfig, window_end: datetime) -> Iterator[int]:
    """Round numbers: ``config.rounds``, or as many as fit before the calm end of the window."""
    done, longest_s = 0, 0.0
    while config.rounds is None or done < config.rounds:
        left_s = (window_end - utcnow()).total_seconds() - config.calm_s
        if config.rounds is None and left_s < 1.5 * longest_s + 10:
            return
        began = time.monotonic()
        yield done
        done += 1
        longest_s = max(longest_s, time.monotonic() - began)


# -- command line -----------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_services() -> Iterator[tuple[str, RedisServer]]:
    """A migrated PostgreSQL database and a Redis of our own, both gone afterwards."""
    redis_server = RedisServer(free_port())
    with running_postgres() as postgres:
        try:
            redis_server.start()
            database_url = postgres.dsn(postgres.create_database())
            upgrade(database_url)
            yield database_url, redis_server
        finally:
            redis_server.stop()
            shutil.rmtree(redis_server.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.acceptance.chaos", description=__doc__)
    parser.add_argument("--long", action="store_true", help="10 minutes, more actions and rounds")
    parser.add_argument("--workdir", type=Path, help="keep the process logs here")
    args = parser.parse_args(argv)
    config = LONG if args.long else CI
    print(f"chaos config: {json.dumps(config.__dict__)}", flush=True)
    with contextlib.ExitStack() as stack:
        database_url, redis_server = stack.enter_context(throwaway_services())
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(
            config,
            database_url=database_url,
            redis_server=redis_server,
            workdir=workdir,
            out=lambda line: print(line, flush=True),
        )
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
