"""Pipeline benchmark: per-node overhead of our distributed executor next to Celery canvas.

    .venv/bin/python bench/pipelines.py [--quick] [--reps N] [--concurrency 2|1,2] [--json F]

Starts a throwaway PostgreSQL (migrated) and Redis on loopback ports, and two real worker
processes with the same concurrency, prefetch (1), acks_late and JSON settings:

* ours: ``celery -A gathering_tasks worker``; each pipeline node is a ledger record run under
  a Redis lease, its successors inserted in the outcome's transaction;
* the peer: ``celery -A bench.canvas_app worker``, a plain Celery app with one no-op task and
  the Redis result backend (a chord needs one).

Workloads, each of no-op steps: a chain of 100 (ours: trigger + 99 ``run_task`` nodes calling
``demo.add``, each after the previous; canvas: ``chain`` of 100 tasks) and a 100-wide fan-out
and fan-in (ours: trigger -> parallel -> 100 ``run_task`` nodes -> join; canvas: ``chord`` of
100 tasks with a no-op callback). Each run is timed from the call that starts it until the
client sees it finished (both polled every 5 ms); per-node overhead = wall time / 100, the work
being nothing. Runs of ours and of the peer alternate, after one untimed warm-up of each.

Prints a markdown table with the targets (chain: ours <= 2x canvas; fan-in: ours <= canvas),
what our node records say about the runs, and where our time goes: the same pipelines drained
in this process (the real guard, ledger and executor; the broker replaced by a queue), each
phase timed (wall and CPU) and PostgreSQL round trips counted. Everything started here is
stopped on exit, Ctrl-C and SIGTERM included. Loopback only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

# Run as a script, the repo root (gathering_tasks, tests, bench) is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from celery import Celery, chain, chord
from sqlalchemy import Engine, event, text

from bench import canvas_app
from bench.common import Servers, machine_info, start_servers, stop_on_sigterm
from gathering_tasks import guard as guard_module
from gathering_tasks import keys
from gathering_tasks.api import PipelineService
from gathering_tasks.app import celery_config
from gathering_tasks.db import pipelines as db_pipelines
from gathering_tasks.db.engine import session_factory
from gathering_tasks.db.ledger import Dispatch, Record, SqlLedger
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.db.pipelines import PipelineStore
from gathering_tasks.db.repo import Repository
from gathering_tasks.guard import ExecutionGuard, GuardConfig
from gathering_tasks.locks import Lease
from gathering_tasks.pipelines import executor as node_executor
from gathering_tasks.publish import publish
from gathering_tasks.settings import Settings
from gathering_tasks.work import NODE_SKILLS, task_allowed

ROOT = Path(__file__).resolve().parent.parent
# A batch as large as a worker's largest (gathering_tasks.tasks.actions.MAX_BATCH).
BATCH = 32
STEPS = 100
QUICK_STEPS = 50  # bench/run.py --quick
HARNESS_REPS = 3  # bench/run.py's full mode: the whole harness within ~15 minutes
FULL_REPS = 5
QUICK_REPS = 2
POLL_S = 0.005
RUN_TIMEOUT_S = 120.0  # a run (the warm-up includes the workers' start-up)
STOP_TIMEOUT_S = 15.0
CANVAS_QUEUE = "canvas"
FINAL = ("succeeded", "failed", "timed_out", "cancelled")
LOG_TAIL_CHARS = 3000


class BenchFailed(RuntimeError):
    """A run did not finish, or did not succeed: the numbers would mean nothing."""


# -- workloads ---------------------------------------------------------------------------------


def _noop_node(node_id: str) -> dict[str, Any]:
    # demo.add with constants: a registered handler that returns at once.
    call = {"action_type": "run_task", "config": {"task": "demo.add", "args": [1, 2]}}
    return {"id": node_id, "type": "action", "config": call}


def chain_definition(steps: int) -> dict[str, Any]:
    """A trigger, then ``steps - 1`` no-op nodes, each after the previous."""
    ids = ["start", *(f"step-{i:03d}" for i in range(1, steps))]
    nodes = [{"id": "start", "type": "trigger"}, *(_noop_node(i) for i in ids[1:])]
    edges = [{"from": a, "to": b} for a, b in pairwise(ids)]
    return {"nodes": nodes, "edges": edges}


def fan_definition(width: int) -> dict[str, Any]:
    """trigger -> parallel -> ``width`` no-op nodes -> join (policy all)."""
    ids = [f"leaf-{i:03d}" for i in range(width)]
    nodes = [
        {"id": "start", "type": "trigger"},
        {"id": "split", "type": "parallel"},
        *(_noop_node(i) for i in ids),
        {"id": "gather", "type": "join", "config": {"policy": "all"}},
    ]
    edges = [
        {"from": "start", "to": "split"},
        *({"from": "split", "to": i} for i in ids),
        *({"from": i, "to": "gather"} for i in ids),
    ]
    return {"nodes": nodes, "edges": edges}


def canvas_chain(steps: int) -> Any:
    return chain(canvas_app.noop.si() for _ in range(steps))


def canvas_chord(width: int) -> Any:
    return chord([canvas_app.noop.si() for _ in range(width)], canvas_app.noop.si())


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    steps: int
    definition: dict[str, Any]
    canvas: Callable[[int], Any]
    canvas_tasks: int
    linear: bool  # each node after the previous: hand-off times are meaningful
    target_ratio: float  # ours per-node <= this x canvas per-node
    target: str

    @property
    def records(self) -> int:
        return len(self.definition["nodes"])


def workloads(steps: int) -> tuple[Workload, ...]:
    chain_of = Workload(
        name="bench-chain",
        label=f"chain of {steps}",
        steps=steps,
        definition=chain_definition(steps),
        canvas=canvas_chain,
        canvas_tasks=steps,
        linear=True,
        target_ratio=2.0,
        target="ours <= 2x canvas",
    )
    fan_of = Workload(
        name="bench-fan",
        label=f"fan-out/fan-in of {steps}",
        steps=steps,
        definition=fan_definition(steps),
        canvas=canvas_chord,
        canvas_tasks=steps + 1,  # and the callback
        linear=False,
        target_ratio=1.0,
        target="ours <= canvas",
    )
    return chain_of, fan_of


# -- worker processes --------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATHERING_", "BENCH_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


class Worker:
    """One ``celery worker`` process in its own session (Ctrl-C reaches only us; we stop it)."""

    def __init__(
        self, name: str, app: str, queue: str, concurrency: int, env: dict[str, str], workdir: Path
    ) -> None:
        self.name, self.app, self.queue, self.concurrency = name, app, queue, concurrency
        self.env, self.log_path = env, workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--pool=prefork",
            f"--concurrency={self.concurrency}",
            "--prefetch-multiplier=1",
            "-Q",
            self.queue,
            "-n",
            f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
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

    def check(self) -> None:
        """Raise if the process has exited (a run would otherwise wait for its timeout)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchFailed(f"worker {self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def stop(self) -> None:
        """SIGTERM the process group (warm shutdown), then SIGKILL whatever is left of it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)
        self.proc = None


def wait_until(done: Callable[[], bool], worker: Worker, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not done():
        worker.check()
        if time.monotonic() > deadline:
            raise BenchFailed(f"{what}: not finished after {RUN_TIMEOUT_S:g}s\n{worker.tail()}")
        time.sleep(POLL_S)


# -- one run of each side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One timed run. The ``ours`` breakdown comes from the node records (database clock)."""

    side: str
    workload: str
    concurrency: int
    wall_s: float
    executed: int  # node records (ours) or tasks (canvas)
    span_s: float | None = None  # first node's started_at -> last node's finished_at
    in_node_s: float | None = None  # mean started_at -> finished_at of a node
    handoff_s: float | None = None  # chain: mean finished_at -> the next node's started_at

    def per_node_ms(self, steps: int) -> float:
        return self.wall_s / steps * 1000


class Ours:
    """Starts pipelines the way the API does, and reads how they ran."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("bench-pipelines", set_as_current=False)
        self.app.conf.update(celery_config(settings))
        repo = Repository(session_factory(settings.database_url))
        self.engine: Engine = repo.factory.kw["bind"]
        self.service = PipelineService(
            repo, settings, task_allowed=task_allowed, publish=self._publish
        )

    def _publish(self, dispatches: list[Dispatch]) -> None:
        publish(self.app, dispatches, default_queue=self.settings.default_queue)

    def create(self, workload: Workload) -> None:
        self.service.create(workload.name, workload.definition)

    def run(self, workload: Workload, worker: Worker) -> Sample:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            started = time.perf_counter()
            run_id = self.service.run(workload.name)
            status = text("SELECT status FROM pipeline_runs WHERE id = :id")

            def final() -> bool:
                return conn.execute(status, {"id": run_id}).scalar_one() in FINAL

            wait_until(final, worker, f"ours, {workload.label}, pipeline run {run_id}")
            wall_s = time.perf_counter() - started
            return self._sample(conn, run_id, workload, worker, wall_s)

    def _sample(
        self, conn: Any, run_id: int, workload: Workload, worker: Worker, wall_s: float
    ) -> Sample:
        run_status = conn.execute(
            text("SELECT status, error FROM pipeline_runs WHERE id = :id"), {"id": run_id}
        ).one()
        nodes = conn.execute(
            text(
                "SELECT status, started_at, finished_at FROM executions"
                " WHERE pipeline_run_id = :id ORDER BY id"
            ),
            {"id": run_id},
        ).all()
        ok = [n for n in nodes if n.status == "succeeded"]
        if run_status.status != "succeeded" or len(ok) != workload.records:
            raise BenchFailed(
                f"ours, {workload.label}: run {run_id} {run_status.status} ({run_status.error}),"
                f" {len(ok)}/{workload.records} nodes succeeded"
            )
        span_s = (max(n.finished_at for n in ok) - min(n.started_at for n in ok)).total_seconds()
        in_node = [(n.finished_at - n.started_at).total_seconds() for n in ok]
        handoff = None
        if workload.linear:
            gaps = [(b.started_at - a.finished_at).total_seconds() for a, b in pairwise(ok)]
            handoff = statistics.mean(gaps)
        return Sample(
            side="ours",
            workload=workload.name,
            concurrency=worker.concurrency,
            wall_s=wall_s,
            executed=len(ok),
            span_s=span_s,
            in_node_s=statistics.mean(in_node),
            handoff_s=handoff,
        )


class Canvas:
    """Applies chains and chords on the peer app."""

    def __init__(self, config: dict[str, Any]) -> None:
        canvas_app.app.conf.update(config)
        canvas_app.app.set_current()

    def close(self) -> None:
        """Forget every result and subscription while Redis is still up: a result collected
        later (say, from an interrupted run's traceback) then has nothing to unsubscribe,
        instead of retrying against a stopped server at exit."""
        release_results()
        consumer = canvas_app.app.backend.result_consumer
        consumer.stop()
        consumer.subscribed_to.clear()
        canvas_app.app.close()

    def run(self, workload: Workload, worker: Worker) -> Sample:
        signature = workload.canvas(workload.steps)
        started = time.perf_counter()
        result = signature.apply_async()
        wait_until(result.ready, worker, f"canvas, {workload.label}, result {result.id}")
        wall_s = time.perf_counter() - started
        if not result.successful():
            raise BenchFailed(f"canvas, {workload.label}: {result.state} {result.result!r}")
        release_results()
        return Sample("canvas", workload.name, worker.concurrency, wall_s, workload.canvas_tasks)


def release_results() -> None:
    """Let go of the results the peer's client still tracks, and of their subscriptions, now.

    Celery keeps the result of every chord header task the client applied, subscribed,
    until its message is drained, which polling ``ready()`` never does; left there, they
    would unsubscribe at interpreter exit, through a connection already gone.
    """
    for waiting in canvas_app.app.backend._pending_results:
        waiting.clear()


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Bench:
    ours: Ours
    canvas: Canvas
    workloads: tuple[Workload, ...]
    log: Callable[[str], None]
    workdir: Path
    ours_env: dict[str, str]
    canvas_env: dict[str, str]

    @contextlib.contextmanager
    def workers(self, concurrency: int) -> Iterator[tuple[Worker, Worker]]:
        ours = Worker(
            f"ours-c{concurrency}",
            "gathering_tasks",
            self.ours.settings.default_queue,
            concurrency,
            self.ours_env,
            self.workdir,
        )
        peer = Worker(
            f"canvas-c{concurrency}",
            "bench.canvas_app",
            CANVAS_QUEUE,
            concurrency,
            self.canvas_env,
            self.workdir,
        )
        try:
            ours.start()
            peer.start()
            yield ours, peer
        finally:
            # Each is stopped even if the other's stop fails.
            try:
                ours.stop()
            finally:
                peer.stop()

    def measure(self, concurrency: int, reps: int) -> list[Sample]:
        """One warm-up run of each, then ``reps`` rounds; ours and the peer alternate."""
        samples: list[Sample] = []
        with self.workers(concurrency) as (ours_worker, peer_worker):
            for rep in range(reps + 1):
                for workload in self.workloads:
                    ours = self.ours.run(workload, ours_worker)
                    peer = self.canvas.run(workload, peer_worker)
                    what = "warm-up" if rep == 0 else f"run {rep}/{reps}"
                    self.log(
                        f"concurrency {concurrency}, {workload.label}, {what}: "
                        f"ours {ours.per_node_ms(workload.steps):.2f} ms/node, "
                        f"canvas {peer.per_node_ms(workload.steps):.2f} ms/node"
                    )
                    if rep > 0:
                        samples += [ours, peer]
        return samples


# -- where our time goes: the same pipelines drained in this process ---------------------------


@dataclass(frozen=True)
class Phase:
    """A function timed during the drain."""

    owner: Any  # a class or a module
    attribute: str
    label: str
    summed: bool = True  # False: the whole record, or a part of another phase


WHOLE = "whole record (ExecutionGuard.execute)"
PHASES = (
    Phase(ExecutionGuard, "execute", WHOLE, summed=False),
    Phase(Lease, "acquire", "Redis lease: acquire"),
    Phase(SqlLedger, "start", "ledger.start: pending -> running + the node's context"),
    Phase(
        PipelineStore,
        "prepare",
        "  of which the context: run row, states it reads, input",
        summed=False,
    ),
    Phase(guard_module._Keepers, "__enter__", "start the lease-keeper and heartbeat threads"),
    Phase(PipelineStore, "circuit_open_until", "executor: circuit-breaker read (own session)"),
    Phase(node_executor, "_compute", "executor: the node's work (demo.add)"),
    Phase(SqlLedger, "finish", "ledger.finish: outcome + advance (one transaction)"),
    Phase(
        PipelineStore,
        "advance_record",
        "  of which advance: statuses, plan, INSERT",
        summed=False,
    ),
    Phase(
        db_pipelines,
        "node_states",
        "  every node's status (in advance)",
        summed=False,
    ),
    Phase(guard_module._Keepers, "__exit__", "stop the keeper threads"),
    Phase(Lease, "release", "Redis lease: release"),
)


def _timer(fn: Callable[..., Any], slot: list[float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            slot[0] += time.perf_counter() - started
            slot[1] += 1
            slot[2] += time.process_time() - cpu_started

    return timed


@contextlib.contextmanager
def timed_phases() -> Iterator[dict[str, list[float]]]:
    """Wrap every phase in a timer while the block runs: label -> [seconds, calls, CPU s].

    CPU is this process's, all threads; during a short record the keeper threads only wait.
    """
    spent = {phase.label: [0.0, 0.0, 0.0] for phase in PHASES}
    originals = [(phase, getattr(phase.owner, phase.attribute)) for phase in PHASES]
    for phase, original in originals:
        setattr(phase.owner, phase.attribute, _timer(original, spent[phase.label]))
    try:
        yield spent
    finally:
        for phase, original in reversed(originals):
            setattr(phase.owner, phase.attribute, original)


@contextlib.contextmanager
def round_trips(engine: Engine) -> Iterator[Counter[str]]:
    """Count what goes to PostgreSQL while the block runs."""
    counts: Counter[str] = Counter()
    hooks = [
        (engine, "before_cursor_execute", "statements"),
        (engine, "commit", "commits"),
        (engine, "rollback", "rollbacks"),
        (engine.pool, "checkout", "pool checkouts (pinged only after 1 s idle)"),
    ]

    def counter(name: str) -> Callable[..., None]:
        return lambda *_args, **_kwargs: counts.update([name])

    listeners = [(target, name, counter(label)) for target, name, label in hooks]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    try:
        yield counts
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)


class Drain:
    """Our pipelines run in this process, one record after another: the real guard (Redis
    lease, keeper threads), ledger, store and executor on the benchmark's PostgreSQL and
    Redis, with the broker and Celery replaced by a queue in memory."""

    def __init__(self, ours: Ours) -> None:
        settings = ours.settings
        self.queue: deque[Dispatch] = deque()
        self.client = redis.Redis.from_url(settings.redis_url)
        self.repo = ours.service.repo
        self.repo.pipelines.max_input_bytes = settings.max_result_bytes
        self.guard = ExecutionGuard(
            self.repo.ledger,
            lambda record_id: Lease(
                self.client, keys.run_lock(settings.key_prefix, record_id), settings.run_lease_ttl_s
            ),
            GuardConfig(
                lease_ttl_s=settings.run_lease_ttl_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
                max_result_bytes=settings.max_result_bytes,
                outcome_retry_s=settings.outcome_retry_s,
            ),
            publish_retry=lambda dispatch, _delay_s: self.queue.append(dispatch),
            publish_many=self.queue.extend,
        )
        self.service = PipelineService(
            self.repo, settings, task_allowed=task_allowed, publish=self.queue.extend
        )

    def _node(self, record: Record, abort: Any) -> Any:
        return node_executor.execute_node(
            self.repo.pipelines,
            record,
            abort,
            skills=NODE_SKILLS,
            task_allowed=task_allowed,
        )

    def run(self, workload: Workload) -> int:
        """Start one run and execute its records until none is queued. Returns how many."""
        run_id = self.service.run(workload.name)
        executed = 0
        while self.queue:
            dispatch = self.queue.popleft()
            self.guard.execute(
                dispatch.record_id, dispatch.kind, self._node, worker="bench-drain", task_id=None
            )
            executed += 1
        return self._checked(workload, run_id, executed)

    def run_batched(self, workload: Workload) -> int:
        """:meth:`run`, the queued records taken as a worker takes a run's ready nodes: in
        batches of up to ``BATCH`` (``ExecutionGuard.run_many``), what a batch makes ready
        kept for the next one (a chain's next node then comes started, see ``Carry``)."""
        run_id = self.service.run(workload.name)
        executed = 0
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
            reports, kept = self.guard.run_many(
                [d.record_id for d in batch],
                "pipeline_node",
                self._node,
                worker="bench-drain",
                task_id=None,
                keep=lambda _dispatch: True,
                started=[d.started for d in batch if d.started is not None],
            )
            self.queue.extendleft(reversed(kept))
            executed += sum(report.status != "dropped" for report in reports)
        return self._checked(workload, run_id, executed)

    def _checked(self, workload: Workload, run_id: int, executed: int) -> int:
        status = self.service.get_run(run_id)["status"]
        if status != "succeeded" or executed != workload.records:
            raise BenchFailed(f"drain, {workload.label}: run {run_id} {status}, {executed} records")
        return executed

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class Breakdown:
    """Mean time per record in each phase of the in-process drain, and its round trips."""

    workload: str
    label: str
    records: int
    ms_per_record: dict[str, float]
    calls_per_record: dict[str, float]
    round_trips_per_record: dict[str, float]
    cpu_ms_per_record: dict[str, float]  # the rest of a phase's wall time is waiting
    # The same runs drained in batches (Drain.run_batched), no phase timers.
    batched_ms_per_record: float
    batched_round_trips_per_record: dict[str, float]


def breakdown(drain: Drain, workload: Workload, reps: int) -> Breakdown:
    drain.run(workload)  # warm: the spec cache, the connection pool
    with timed_phases() as spent, round_trips(drain.repo.factory.kw["bind"]) as counts:
        records = sum(drain.run(workload) for _ in range(reps))
    with round_trips(drain.repo.factory.kw["bind"]) as batched_counts:
        started = time.perf_counter()
        batched = sum(drain.run_batched(workload) for _ in range(reps))
        batched_s = time.perf_counter() - started
    return Breakdown(
        workload=workload.name,
        label=workload.label,
        records=records,
        ms_per_record={label: wall / records * 1000 for label, (wall, _, _) in spent.items()},
        calls_per_record={label: calls / records for label, (_, calls, _) in spent.items()},
        round_trips_per_record={name: count / records for name, count in counts.items()},
        cpu_ms_per_record={label: cpu / records * 1000 for label, (_, _, cpu) in spent.items()},
        batched_ms_per_record=batched_s / batched * 1000,
        batched_round_trips_per_record={k: v / batched for k, v in batched_counts.items()},
    )


def breakdown_table(found: list[Breakdown]) -> str:
    header = [
        "in-process drain, per record",
        *(f"{b.label}: wall / CPU ms" for b in found),
        "calls",
    ]
    rows = []
    for phase in PHASES:
        cells = [
            f"{b.ms_per_record[phase.label]:.2f} / {b.cpu_ms_per_record[phase.label]:.2f}"
            for b in found
        ]
        rows.append([phase.label, *cells, f"{found[0].calls_per_record[phase.label]:.2f}"])
    summed = [p.label for p in PHASES if p.summed]

    def rest(per_record: dict[str, float]) -> float:
        return per_record[WHOLE] - sum(per_record[label] for label in summed)

    cells = [f"{rest(b.ms_per_record):.2f} / {rest(b.cpu_ms_per_record):.2f}" for b in found]
    rows.append(["rest of the guard (verdict, logging, thread joins)", *cells, ""])
    table = markdown(header, rows, right=set(range(1, len(header))))
    trips = [
        f"PostgreSQL round trips per record, {b.label}: {_trips(b.round_trips_per_record)}"
        for b in found
    ]
    batched = [
        f"In batches of up to {BATCH} (as a worker takes a run's ready nodes), {b.label}:"
        f" {b.batched_ms_per_record:.2f} ms per record (wall, no timers);"
        f" round trips per record: {_trips(b.batched_round_trips_per_record)}"
        for b in found
    ]
    return "\n".join([table, "", *trips, "", *batched])


def _trips(per_record: dict[str, float]) -> str:
    return " + ".join(f"{v:.2f} {k}" for k, v in sorted(per_record.items()))


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    workload: str
    label: str
    concurrency: int
    runs: int
    ours_ms: float
    canvas_ms: float
    ratio: float
    target: str
    ok: bool
    ours_wall_s: list[float]
    canvas_wall_s: list[float]
    ours_span_ms: float  # per step, medians over the runs
    ours_in_node_ms: float
    ours_handoff_ms: float | None


def _median_of(samples: list[Sample], pick: Callable[[Sample], float | None]) -> float | None:
    values = [v for v in map(pick, samples) if v is not None]
    return statistics.median(values) if values else None


def summarize(samples: list[Sample], workload: Workload, concurrency: int) -> Summary:
    mine = [s for s in samples if s.workload == workload.name and s.concurrency == concurrency]
    ours = [s for s in mine if s.side == "ours"]
    peer = [s for s in mine if s.side == "canvas"]
    ours_ms = statistics.median(s.per_node_ms(workload.steps) for s in ours)
    canvas_ms = statistics.median(s.per_node_ms(workload.steps) for s in peer)
    ratio = ours_ms / canvas_ms
    span = _median_of(ours, lambda s: s.span_s) or 0.0
    handoff = _median_of(ours, lambda s: s.handoff_s)
    return Summary(
        workload.name,
        workload.label,
        concurrency,
        len(ours),
        ours_ms,
        canvas_ms,
        ratio,
        workload.target,
        ratio <= workload.target_ratio,
        [s.wall_s for s in ours],
        [s.wall_s for s in peer],
        span / workload.steps * 1000,
        (_median_of(ours, lambda s: s.in_node_s) or 0.0) * 1000,
        handoff * 1000 if handoff is not None else None,
    )


def markdown(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def verdict_table(summaries: list[Summary]) -> str:
    header = ["workload", "ours per-node ms", "canvas per-node ms", "ratio", "target", "verdict"]
    rows = [
        [
            f"{s.label}, concurrency {s.concurrency}",
            f"{s.ours_ms:.2f}",
            f"{s.canvas_ms:.2f}",
            f"{s.ratio:.2f}x",
            s.target,
            "ok" if s.ok else "MISSED",
        ]
        for s in summaries
    ]
    return markdown(header, rows, right={1, 2, 3})


def detail_table(summaries: list[Summary]) -> str:
    def walls(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    header = [
        "workload",
        "runs",
        "ours wall s, median (min-max)",
        "canvas wall s",
        "ours records span / step ms",
        "ours in-node mean ms",
        "ours hand-off mean ms",
    ]
    rows = [
        [
            f"{s.label}, concurrency {s.concurrency}",
            str(s.runs),
            walls(s.ours_wall_s),
            walls(s.canvas_wall_s),
            f"{s.ours_span_ms:.2f}",
            f"{s.ours_in_node_ms:.2f}",
            "-" if s.ours_handoff_ms is None else f"{s.ours_handoff_ms:.2f}",
        ]
        for s in summaries
    ]
    return markdown(header, rows, right={1, 2, 3, 4, 5, 6})


# -- main --------------------------------------------------------------------------------------


def canvas_config(database_url: str, redis_url: str) -> dict[str, Any]:
    """Our Celery settings for the peer, minus our app's own, plus the result backend."""
    config = celery_config(Settings(database_url=database_url, redis_url=redis_url))
    # task_queues: our worker's queues, kombu objects (not JSON), and not the peer's
    for ours_only in ("beat_scheduler", "beat_max_loop_interval", "imports", "task_queues"):
        config.pop(ours_only)
    config.update(
        result_backend=redis_url,
        task_ignore_result=False,
        # Celery's default: a STARTED state would cost the peer a result write per task,
        # which ours (no result backend) never pays.
        task_track_started=False,
        task_default_queue=CANVAS_QUEUE,
        task_default_exchange=CANVAS_QUEUE,
        task_default_routing_key=CANVAS_QUEUE,
    )
    return config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-node overhead of our pipeline executor next to Celery canvas."
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} runs instead of 5")
    parser.add_argument("--reps", type=int, help=f"timed runs of each (default {FULL_REPS})")
    parser.add_argument(
        "--concurrency",
        type=lambda value: tuple(int(part) for part in value.split(",")),
        default=(2,),
        help="comma-separated worker concurrencies (default 2; e.g. 1,2)",
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="chain length and fan width")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument(
        "--drain-only",
        action="store_true",
        help="only the in-process breakdown (no worker processes, no comparison)",
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Result:
    info: list[str]
    workloads: tuple[Workload, ...]
    samples: list[Sample]
    breakdowns: list[Breakdown]


def run_bench(
    args: argparse.Namespace,
    stack: ExitStack,
    log: Callable[[str], None],
    servers: Servers | None = None,
) -> Result:
    if servers is None:
        log("starting PostgreSQL and Redis")
        servers = start_servers(stack)
    pg, broker = servers.pg, servers.redis
    workdir = Path(tempfile.mkdtemp(prefix="gt-pipebench-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    info = machine_info(pg, broker)
    dsn = pg.dsn(pg.create_database())
    upgrade(dsn)
    ours_redis, canvas_redis = broker.url, broker.url.rsplit("/", 1)[0] + "/1"
    ours = Ours(Settings(database_url=dsn, redis_url=ours_redis))
    stack.callback(ours.engine.dispose)
    stack.callback(ours.app.close)
    config = canvas_config(dsn, canvas_redis)
    chosen = workloads(args.steps)
    for workload in chosen:
        ours.create(workload)
    canvas = Canvas(config)
    stack.callback(canvas.close)
    bench = Bench(
        ours,
        canvas,
        chosen,
        log,
        workdir,
        ours_env=base_env(GATHERING_DATABASE_URL=dsn, GATHERING_REDIS_URL=ours_redis),
        canvas_env=base_env(**{canvas_app.CONFIG_ENV: json.dumps(config)}),
    )
    reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)
    samples: list[Sample] = []
    for concurrency in () if getattr(args, "drain_only", False) else args.concurrency:
        log(f"concurrency {concurrency}: starting both workers")
        samples += bench.measure(concurrency, reps)
    if not getattr(args, "drain", True):
        return Result(info, chosen, samples, [])
    log("workers stopped; draining the same pipelines in this process, with timers")
    drain = Drain(ours)
    stack.callback(drain.close)
    found = [breakdown(drain, workload, reps) for workload in chosen]
    return Result(info, chosen, samples, found)


def measure_for_harness(
    servers: Servers, stack: ExitStack, quick: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """``bench/run.py``'s pipelines section on its servers: full mode like ``bench/pipelines.py``
    (3 runs, concurrency 1 and 2, the in-process drain); quick: 1 run of 50 steps, concurrency
    2, no drain."""
    args = argparse.Namespace(
        quick=quick,
        reps=1 if quick else HARNESS_REPS,
        concurrency=(2,) if quick else (1, 2),
        steps=QUICK_STEPS if quick else STEPS,
        drain=not quick,
    )
    with ExitStack() as own:  # this section's workers and connections end with it
        result = run_bench(args, own, log, servers)
    chosen = [(w, c) for c in args.concurrency for w in result.workloads]
    summaries = [summarize(result.samples, w, c) for w, c in chosen]
    tables = [verdict_table(summaries), "", detail_table(summaries)]
    if result.breakdowns:
        tables += ["", breakdown_table(result.breakdowns)]
    targets = [
        [
            f"pipeline per-node overhead, {s.label}, concurrency {s.concurrency}: {s.target}",
            f"{s.ours_ms:.2f} vs {s.canvas_ms:.2f} ms per node = {s.ratio:.2f}x",
            "holds" if s.ok else "MISSED",
        ]
        for s in summaries
    ]
    return {
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "samples": [dataclasses.asdict(s) for s in result.samples],
        "drain": [dataclasses.asdict(b) for b in result.breakdowns],
        "tables": tables,
        "targets": targets,
    }


def main() -> int:
    args = parse_args()
    stop_on_sigterm()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        with ExitStack() as stack:
            result = run_bench(args, stack, log)
    except KeyboardInterrupt:
        log("interrupted; workers and servers stopped")
        return 130
    except BenchFailed as exc:
        log(f"FAILED: {exc}")
        return 1
    concurrencies = () if args.drain_only else args.concurrency
    summaries = [summarize(result.samples, w, c) for c in concurrencies for w in result.workloads]
    print("\n".join(result.info))
    print(f"total run time: {time.monotonic() - started:.0f} s\n")
    if summaries:
        print(verdict_table(summaries))
        print()
        print(detail_table(summaries))
        print()
    print(breakdown_table(result.breakdowns))
    if args.json:
        raw = {
            "machine": result.info,
            "summaries": [dataclasses.asdict(s) for s in summaries],
            "samples": [dataclasses.asdict(s) for s in result.samples],
            "drain": [dataclasses.asdict(b) for b in result.breakdowns],
        }
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
