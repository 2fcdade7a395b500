"""Pipelines in the database: versioned definitions, runs, and a run's progress.

A pipeline run's nodes are ledger records (kind ``pipeline_node``). When a node's outcome is
recorded, :func:`advance` runs in THE SAME transaction: it locks the run's row, asks the pure
planner what became ready or skipped, inserts those records (``ON CONFLICT (dedupe_key) DO
NOTHING``) and returns their dispatches, to publish after commit. The row lock serialises the
completions of one run, so two predecessors finishing at the same instant on two workers
neither enqueue a successor twice nor forget it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.ledger import (
    FINAL,
    STARTED,
    UNFINISHED,
    Carrying,
    Dispatch,
    Record,
    close_attempt,
    dispatch_for,
    idempotency_key,
    record_of,
)
from gathering_tasks.db.models import (
    Execution,
    Pipeline,
    PipelineNodeHealth,
    PipelineRun,
    PipelineVersion,
)
from gathering_tasks.db.sql import Sql
from gathering_tasks.errors import InvalidInput, NotFound
from gathering_tasks.pipelines.definition import PipelineSpec, parse_pipeline
from gathering_tasks.pipelines.planner import (
    NodeState,
    Ready,
    given_input,
    sink_outputs,
    split_record_id,
)
from gathering_tasks.pipelines.planner import advance as plan_advance
from gathering_tasks.policy import bounded_result

log = logging.getLogger(__name__)

FAILED = ("failed", "timed_out")
_SPECS: dict[tuple[str, int, int], PipelineSpec] = {}
MAX_CACHED_SPECS = 256
MAX_SETTLED = 256  # final node states a process keeps (each output at most max_result_bytes)
# session.info: the runs this transaction locked (by node record), and those it ended
_LOCKED = "gathering.locked_runs"
_ENDED = "gathering.ended_runs"

EX = cast(Table, Execution.__table__)
RUNS = cast(Table, PipelineRun.__table__)
PIPES = cast(Table, Pipeline.__table__)


@dataclass(frozen=True)
class RunInfo:
    """What moving a run on needs of its row (and its pipeline's name)."""

    id: int
    status: str
    pipeline_id: int
    version: int
    name: str
    action_run_id: int | None


_RUN_INFO = (
    RUNS.c.id,
    RUNS.c.status,
    RUNS.c.pipeline_id,
    RUNS.c.pipeline_version.label("version"),
    PIPES.c.name,
    RUNS.c.action_run_id,
)


def _run_info(row: Any) -> RunInfo:
    return RunInfo(row.id, row.status, row.pipeline_id, row.version, row.name, row.action_run_id)


# Built once: a node record's start and outcome run these.
_LOCK_RUN_OF = (
    select(*_RUN_INFO, EX.c.node_id)
    .select_from(
        EX.join(RUNS, RUNS.c.id == EX.c.pipeline_run_id).join(
            PIPES, PIPES.c.id == RUNS.c.pipeline_id
        )
    )
    .where(EX.c.id == bindparam("p_id"))
)
_LOCK_RUN_OF_PG = _LOCK_RUN_OF.with_for_update(of=RUNS)
_TRIGGER_DATA = select(RUNS.c.trigger_data).where(RUNS.c.id == bindparam("p_run"))
_RECORD_INPUT = (
    update(EX)
    .where(EX.c.id == bindparam("p_id"), EX.c.attempt == bindparam("p_attempt"))
    .values(input=bindparam("p_input", type_=EX.c.input.type))
)
_OF_RUN = EX.c.pipeline_run_id == bindparam("p_run")
_STATES = select(EX.c.node_id, EX.c.status, EX.c.result).where(_OF_RUN)
_STATES_OF = _STATES.where(EX.c.node_id.in_(bindparam("p_nodes", expanding=True)))
_STATUSES = select(
    EX.c.node_id,
    EX.c.status,
    case((EX.c.node_id.in_(bindparam("p_nodes", expanding=True)), EX.c.result)).label("result"),
).where(_OF_RUN)


@dataclass(frozen=True)
class NodeContext:
    """What a node record runs with, read in the transaction that started it: the spec,
    the states of the records its input is built from (``PipelineSpec.reads``), and the
    run's input data when the node reads it."""

    spec: PipelineSpec
    states: dict[str, NodeState]
    trigger_data: dict[str, Any]


@dataclass
class Started:
    """A pipeline run, as ``start_run`` left it."""

    run_id: int
    status: str
    dispatches: list[Dispatch] = field(default_factory=list)
    outputs: dict[str, Any] | None = None
    error: str | None = None


def pipeline_to_dict(row: Pipeline) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "definition": row.definition,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


def run_to_dict(row: PipelineRun) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in PipelineRun.__table__.columns:
        value = getattr(row, column.key)
        out[column.key] = value.isoformat() if isinstance(value, datetime) else value
    return out


def spec_of(session: Session, pipeline_id: int, version: int) -> PipelineSpec:
    """The parsed definition of one version (versions are immutable: cached per process,
    per database)."""
    key = (str(session.get_bind().engine.url), pipeline_id, version)
    spec = _SPECS.get(key)
    if spec is None:
        definition = session.execute(
            select(PipelineVersion.definition).where(
                PipelineVersion.pipeline_id == pipeline_id, PipelineVersion.version == version
            )
        ).scalar_one()
        spec = parse_pipeline(definition)
        if len(_SPECS) >= MAX_CACHED_SPECS:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


def node_definition(run: RunInfo, spec: PipelineSpec, ready: Ready) -> dict[str, Any]:
    """The snapshot a node record executes: its node, its retry policy, its routing."""
    node = spec.node(ready.node_id)
    retry = node.retry or spec.retry
    return {
        "name": f"{run.name}.{ready.record_id}",
        "pipeline": run.name,
        "pipeline_id": run.pipeline_id,
        "version": run.version,
        "node": {"id": node.id, "type": node.type, "config": node.config},
        "index": ready.index,
        "item": ready.item,
        "retry_max_attempts": retry.max_attempts if retry else 1,
        "retry_backoff_s": retry.backoff_s if retry else 0.0,
        "retry_backoff_max_s": retry.backoff_max_s if retry else 0.0,
        "retry_jitter": retry.jitter if retry else 0.0,
        "timeout_s": node.timeout_s,
        "queue": None,
        "priority": None,
    }


def _node_record(
    run_id: int, definition: dict[str, Any], ready: Ready, now: datetime, *, status: str
) -> dict[str, Any]:
    dedupe = f"node:{run_id}:{ready.record_id}"
    delay_s = _delay_of(definition) if status == "pending" else 0.0
    return {
        "kind": "pipeline_node",
        "dedupe_key": dedupe,
        "idempotency_key": idempotency_key(dedupe),
        "pipeline_run_id": run_id,
        "node_id": ready.record_id,
        "trigger": "pipeline",
        "definition": definition,
        "status": status,
        "attempt": 0,
        "publish_count": 0,
        # A delay node is a countdown: its record does not start before this.
        "retry_at": now + timedelta(seconds=delay_s) if delay_s else None,
        "created_at": now,
        "updated_at": now,
        "finished_at": now if status == "skipped" else None,
    }


def _delay_of(definition: dict[str, Any]) -> float:
    node = definition["node"]
    if node["type"] != "delay":
        return 0.0
    return float(node["config"].get("seconds", 0.0))


class PipelineStore(Sql):
    """Pipeline definitions and runs."""

    # A node attempt's recorded input is capped like results (runtime sets the setting).
    max_input_bytes = 16 * 1024

    def __init__(self, factory: sessionmaker[Session]) -> None:
        super().__init__(factory)
        # (run id, node id) -> the final state of a node record this process ended
        self._settled: dict[tuple[int, str], NodeState] = {}
        self._settled_lock = threading.Lock()

    # -- definitions --------------------------------------------------------------------

    def create(self, name: str, spec: PipelineSpec, *, now: datetime) -> dict[str, Any]:
        definition = spec.to_json()
        row = Pipeline(
            name=name,
            definition=definition,
            version=1,
            timeout_s=spec.timeout_s,
            created_at=now,
            updated_at=now,
        )
        try:
            with self.write_tx() as session:
                session.add(row)
                session.flush()
                session.add(
                    PipelineVersion(
                        pipeline_id=row.id, version=1, definition=definition, created_at=now
                    )
                )
        except IntegrityError as exc:
            raise InvalidInput(f"a pipeline named {name!r} exists", field="name") from exc
        return pipeline_to_dict(row)

    def new_version(self, name: str, spec: PipelineSpec, *, now: datetime) -> dict[str, Any]:
        """Edit = a new version; runs keep the version they started with."""
        definition = spec.to_json()
        with self.write_tx() as session:
            row = _pipeline(session, name, lock=self)
            row.version += 1
            row.definition, row.timeout_s, row.updated_at = definition, spec.timeout_s, now
            session.add(
                PipelineVersion(
                    pipeline_id=row.id, version=row.version, definition=definition, created_at=now
                )
            )
            session.flush()
            return pipeline_to_dict(row)

    def get(self, name: str) -> dict[str, Any]:
        with self.factory() as session:
            return pipeline_to_dict(_pipeline(session, name))

    def list_pipelines(self) -> list[dict[str, Any]]:
        with self.factory() as session:
            rows = session.scalars(select(Pipeline).order_by(Pipeline.name))
            return [pipeline_to_dict(row) for row in rows]

    def versions(self, name: str) -> list[dict[str, Any]]:
        with self.factory() as session:
            pipeline = _pipeline(session, name)
            rows = session.scalars(
                select(PipelineVersion)
                .where(PipelineVersion.pipeline_id == pipeline.id)
                .order_by(PipelineVersion.version)
            )
            return [
                {
                    "version": v.version,
                    "created_at": v.created_at.isoformat(),
                    "definition": v.definition,
                }
                for v in rows
            ]

    # -- runs ---------------------------------------------------------------------------

    def start_run(
        self,
        name: str,
        *,
        data: dict[str, Any],
        dedupe_key: str,
        now: datetime,
        action_run_id: int | None = None,
    ) -> Started:
        """Start a run of the pipeline's current version (once per ``dedupe_key``)."""
        with self.write_tx() as session:
            existing = session.execute(
                select(PipelineRun).where(PipelineRun.dedupe_key == dedupe_key)
            ).scalar_one_or_none()
            if existing is not None:
                return Started(existing.id, existing.status, [], existing.outputs, existing.error)
            pipeline = _pipeline(session, name)
            spec = spec_of(session, pipeline.id, pipeline.version)
            timeout_s = spec.timeout_s
            run = PipelineRun(
                pipeline_id=pipeline.id,
                pipeline_version=pipeline.version,
                dedupe_key=dedupe_key,
                action_run_id=action_run_id,
                status="running",
                trigger_data=data,
                deadline_at=now + timedelta(seconds=timeout_s) if timeout_s else None,
                started_at=now,
                created_at=now,
                updated_at=now,
            )
            session.add(run)
            session.flush()
            info = RunInfo(
                run.id, "running", pipeline.id, pipeline.version, pipeline.name, action_run_id
            )
            dispatches = self._progress(session, info, now)
            ended = session.execute(
                select(RUNS.c.status, RUNS.c.outputs, RUNS.c.error).where(RUNS.c.id == run.id)
            ).one()
            return Started(run.id, ended.status, dispatches, ended.outputs, ended.error)

    # -- the ledger's hooks (inside its transactions) -----------------------------------

    def prepare(self, session: Session, record: Record) -> Record:
        """The ledger's hook in ``start``: the node's context, read in the transaction that
        started it, and the input it is given (its predecessors' outputs), recorded there."""
        context = self._context(session, record)
        if context is None:
            return record
        given = self._given(context, str(record.node_id))
        if given is not None:
            session.connection().execute(
                _RECORD_INPUT, {"p_id": record.id, "p_attempt": record.attempt, "p_input": given}
            )
        return replace(record, context=context)

    def _given(self, context: NodeContext, record_id: str) -> dict[str, Any] | None:
        """The input a record is given, bounded; None for a map record without its items
        (the executor fails the node, naming it)."""
        try:
            given = given_input(context.spec, record_id, context.states)
        except ValueError:
            return None
        return bounded_result(given, self.max_input_bytes) or {}

    def node_context(self, record: Record) -> NodeContext | None:
        """:meth:`prepare` outside the ledger (a record started without it)."""
        with self.write_tx() as session:
            prepared = self.prepare(session, record)
        context = prepared.context
        return context if isinstance(context, NodeContext) else None

    def _context(self, session: Session, record: Record) -> NodeContext | None:
        """Read in the transaction that moved the record to ``running``. The run's status
        needs no reading: a run that ends cancels its queued nodes in the transaction that
        ends it (``stop_nodes``), so a node that could start belongs to a running run, and
        one running when it ends is told to stop."""
        run_id, record_id = record.pipeline_run_id, record.node_id
        if run_id is None or record_id is None:
            return None
        definition = record.definition
        spec = spec_of(session, int(definition["pipeline_id"]), int(definition["version"]))
        return self._context_of(session, run_id, spec, record_id)

    def _context_of(
        self,
        session: Session,
        run_id: int,
        spec: PipelineSpec,
        record_id: str,
        closed: Mapping[str, NodeState] | None = None,
    ) -> NodeContext:
        """:meth:`_context` of the record ``record_id`` of run ``run_id``. ``closed``: states
        written in this transaction, not to be read back."""
        node_id, _index = split_record_id(record_id)
        trigger: dict[str, Any] = {}
        if spec.reads_trigger(node_id):
            data = session.connection().execute(_TRIGGER_DATA, {"p_run": run_id}).scalar()
            trigger = dict(data or {})
        reads = spec.reads(node_id)
        known = (
            {}
            if any(spec.node(n).type == "map" for n in reads)
            else {
                **self._known(run_id, sorted(reads)),
                **{n: state for n, state in (closed or {}).items() if n in reads},
            }
        )
        states = {**known, **read_states(session, run_id, spec, reads - known.keys())}
        return NodeContext(spec, states, trigger)

    def lock_run_of(self, session: Session, record_id: int) -> tuple[int, str] | None:
        """The ledger's first hook: lock the run of a node record before its row (one
        statement; it locks only the run's row). What :meth:`advance_record` needs of the
        run is kept with the transaction. Returns the run's id and the record's node id."""
        stmt = _LOCK_RUN_OF_PG if self.dialect == "postgresql" else _LOCK_RUN_OF
        row = session.connection().execute(stmt, {"p_id": record_id}).first()
        if row is None:
            return None
        session.info.setdefault(_LOCKED, {})[record_id] = (_run_info(row), row.node_id)
        return int(row.id), str(row.node_id)

    def settled(self, node: tuple[int, str], status: str, result: dict[str, Any] | None) -> None:
        """The ledger's hook after the commit that gave a node record a final outcome: its
        state is kept, so a next node started in this process reads it from here. A final
        record's status and output never change again."""
        if status not in FINAL:
            return
        # As the database gives it back (JSON), not the object the work returned.
        stored = None if result is None else json.loads(json.dumps(result))
        with self._settled_lock:
            self._settled[node] = NodeState(status, stored)
            while len(self._settled) > MAX_SETTLED:
                self._settled.pop(next(iter(self._settled)))

    def _known(self, run_id: int, names: list[str]) -> dict[str, NodeState]:
        with self._settled_lock:
            return {n: state for n in names if (state := self._settled.get((run_id, n)))}

    def advance_record(
        self,
        session: Session,
        record_id: int,
        *,
        nodes: Iterable[str] = (),
        carrying: Carrying | None = None,
    ) -> list[Dispatch]:
        """The ledger's hook: after a final outcome of ``record_id``, if it is a node of a
        pipeline run, move that run on (same transaction, after :meth:`lock_run_of`).
        ``nodes``: the records of that run whose outcomes this transaction wrote (a batch),
        when more than ``record_id``'s own. ``carrying``: see :meth:`_insert_carried`."""
        locked = session.info.get(_LOCKED, {}).get(record_id)
        if locked is None:
            if self.lock_run_of(session, record_id) is None:
                return []
            locked = session.info[_LOCKED][record_id]
        run, node_id = locked
        if run.status != "running":
            return []
        # A run finished in this transaction is not moved on again.
        if session.info.get(_ENDED, set()) & {run.id}:
            return []
        now = datetime.now(UTC)
        spec = spec_of(session, run.pipeline_id, run.version)
        states = node_states(session, run.id, outputs_of=spec.steering)
        for closed in nodes or (node_id,):
            _count_health(session, spec, run, record_id=closed, states=states, now=now)
        return self._progress(session, run, now, states, carrying)

    def _progress(
        self,
        session: Session,
        run: RunInfo,
        now: datetime,
        states: dict[str, NodeState] | None = None,
        carrying: Carrying | None = None,
    ) -> list[Dispatch]:
        spec = spec_of(session, run.pipeline_id, run.version)
        if states is None:
            # Deciding needs every record's status, but only the outputs that steer.
            states = node_states(session, run.id, outputs_of=spec.steering)
        plan = plan_advance(spec, states)
        if plan.final == "failed":
            error = "node(s) failed: " + ", ".join(plan.failed_nodes)
            self._finalize(session, run, "failed", now=now, outputs=None, error=error)
            return []
        records: list[dict[str, Any]] = []
        for ready in plan.ready:
            definition = node_definition(run, spec, ready)
            records.append(_node_record(run.id, definition, ready, now, status="pending"))
        for node_id in plan.skip:
            ready = Ready(record_id=node_id, node_id=node_id)
            definition = node_definition(run, spec, ready)
            records.append(_node_record(run.id, definition, ready, now, status="skipped"))
        if carrying is not None and len(records) == 1 and plan.ready and plan.final is None:
            carried = self._insert_carried(
                session, run, spec, records[0], carrying=carrying, states=states
            )
            if carried is not None:
                return carried
        inserted = self._insert_records(session, records)
        if plan.skip:
            # A skipped node may make others ready or skipped: look again.
            return [*inserted, *self._progress(session, run, now)]
        if plan.final == "succeeded":
            outputs = sink_outputs(spec, node_states(session, run.id))
            self._finalize(session, run, "succeeded", now=now, outputs=outputs, error=None)
        return inserted

    def _insert_records(self, session: Session, records: list[dict[str, Any]]) -> list[Dispatch]:
        if not records:
            return []
        stmt = (
            self.insert(EX)
            .on_conflict_do_nothing(index_elements=[EX.c.dedupe_key])
            .returning(EX.c.id, EX.c.dedupe_key)
        )
        made = {row.dedupe_key: row.id for row in session.connection().execute(stmt, records)}
        return [
            _dispatch_of(made[record["dedupe_key"]], record)
            for record in records
            if record["status"] == "pending" and record["dedupe_key"] in made
        ]

    def _insert_carried(
        self,
        session: Session,
        run: RunInfo,
        spec: PipelineSpec,
        record: dict[str, Any],
        *,
        carrying: Carrying,
        states: dict[str, NodeState],
    ) -> list[Dispatch] | None:
        """The one record a chain goes on with, when the worker that closed its predecessor
        runs it (``carrying.carry.keep``): inserted already started for that worker, its
        attempt 1 with its input, as :meth:`SqlLedger.start` and :meth:`prepare` would have
        left it. Its dispatch carries the started record. None: not carried (inserted the usual
        way); [] when the record was there already."""
        carry = carrying.carry
        if not carry.keep(_dispatch_of(0, record)):
            return None
        record_id = str(record["node_id"])
        reads = spec.reads(split_record_id(record_id)[0])
        # As the database gives them back (JSON), not the objects the work returned.
        closed = {
            n: NodeState(states[n].status, json.loads(json.dumps(output)))
            for n, output in carrying.outputs.items()
            if n in states and n in reads
        }
        context = self._context_of(session, run.id, spec, record_id, closed)
        given = self._given(context, record_id)
        if given is None:
            return None
        now = self.now()
        values = {
            **record,
            "status": "running",
            "attempt": 1,
            "worker": carry.worker,
            "celery_task_id": carry.task_id,
            "input": given,
            # Created started: one moment, by the database clock.
            "created_at": now,
            "updated_at": now,
            "started_at": now,
            "heartbeat_at": now,
        }
        stmt = (
            self.insert(EX)
            .values(values)
            .on_conflict_do_nothing(index_elements=[EX.c.dedupe_key])
            .returning(*STARTED)
        )
        row = session.connection().execute(stmt).first()
        if row is None:
            return []
        started = replace(
            record_of(row.id, "pipeline_node", row, dict(row.definition)), context=context
        )
        carrying.started.append((started, row.started_at))
        return [replace(_dispatch_of(row.id, record), started=started)]

    def _finalize(
        self,
        session: Session,
        run: RunInfo,
        status: str,
        *,
        now: datetime,
        outputs: dict[str, Any] | None,
        error: str | None,
        cancel: bool = False,
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "outputs": outputs,
            "error": error,
            "finished_at": now,
            "updated_at": now,
        }
        if cancel:
            values["cancel_requested_at"] = now
        session.execute(update(RUNS).where(RUNS.c.id == run.id).values(**values))
        session.info.setdefault(_ENDED, set()).add(run.id)
        stop_nodes(self, session, run.id, reason=f"pipeline run {status}")
        finish_starter(self, session, run, status, outputs=outputs, error=error)
        log.info(
            "pipeline run %d %s",
            run.id,
            status,
            extra={"pipeline_run_id": run.id, "status": status},
        )

    def cancel_run(self, run_id: int, *, now: datetime, status: str = "cancelled") -> str:
        """Cancel (or time out) a run: queued nodes end, running ones are told to stop."""
        stmt = (
            select(*_RUN_INFO)
            .select_from(RUNS.join(PIPES, PIPES.c.id == RUNS.c.pipeline_id))
            .where(RUNS.c.id == run_id)
        )
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(of=RUNS)
        with self.write_tx() as session:
            row = session.execute(stmt).first()
            if row is None:
                raise NotFound(f"no pipeline run {run_id}")
            if row.status != "running":
                return str(row.status)
            error = "cancelled" if status == "cancelled" else "the run exceeded its timeout"
            self._finalize(
                session, _run_info(row), status, now=now, outputs=None, error=error, cancel=True
            )
            return status

    def pending_nodes(self, run_id: int, *, limit: int) -> list[Dispatch]:
        """Nodes of a run that are ready and not started, oldest first (none with a countdown
        still to wait): what a worker running this run's nodes may take on next. A message
        already out for one of them is dropped when it comes, like any duplicate."""
        e = EX.c
        stmt = (
            select(e.id, e.definition)
            .where(
                e.pipeline_run_id == run_id,
                e.status == "pending",
                e.retry_at.is_(None),
                e.cancel_requested_at.is_(None),
            )
            .order_by(e.id)
            .limit(limit)
        )
        with self.factory() as session:
            rows = session.connection().execute(stmt).all()
        return [dispatch_for(row.id, "pipeline_node", row.definition) for row in rows]

    def run_of(self, record_id: int) -> int | None:
        """The pipeline run a node record belongs to."""
        stmt = select(EX.c.pipeline_run_id).where(EX.c.id == record_id)
        with self.factory() as session:
            return cast("int | None", session.connection().execute(stmt).scalar())

    def overdue_runs(self, now: datetime, *, limit: int) -> list[int]:
        r = PipelineRun
        with self.factory() as session:
            return list(
                session.scalars(
                    select(r.id)
                    .where(r.status == "running", r.deadline_at < now)
                    .order_by(r.id)
                    .limit(limit)
                )
            )

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self.factory() as session:
            run = session.get(PipelineRun, run_id)
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            out = run_to_dict(run)
            out["nodes"] = _node_rows(session, run_id)
            return out

    def find_run(self, dedupe_key: str) -> dict[str, Any] | None:
        """The run started for ``dedupe_key`` (``api:<key>``), or None while there is none."""
        with self.factory() as session:
            run = session.scalars(
                select(PipelineRun).where(PipelineRun.dedupe_key == dedupe_key)
            ).first()
            return run_to_dict(run) if run is not None else None

    def list_runs(self, name: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        r = PipelineRun
        stmt = select(r).order_by(r.id.desc()).limit(limit)
        with self.factory() as session:
            if name:
                stmt = stmt.where(r.pipeline_id == _pipeline(session, name).id)
            return [run_to_dict(row) for row in session.scalars(stmt)]

    # -- the circuit breaker ------------------------------------------------------------

    def circuit_open_until(self, pipeline_id: int, node_id: str, now: datetime) -> datetime | None:
        with self.factory() as session:
            until = session.execute(
                select(PipelineNodeHealth.open_until).where(
                    PipelineNodeHealth.pipeline_id == pipeline_id,
                    PipelineNodeHealth.node_id == node_id,
                )
            ).scalar_one_or_none()
        return until if until is not None and until > now else None


def _dispatch_of(record_id: int, record: dict[str, Any]) -> Dispatch:
    dispatch = dispatch_for(record_id, "pipeline_node", record["definition"])
    if record["retry_at"] is None:
        return dispatch
    return replace(dispatch, countdown_s=_delay_of(record["definition"]))


def _states_of(rows: Any) -> dict[str, NodeState]:
    return {node_id: NodeState(status, result) for node_id, status, result in rows if node_id}


def node_states(
    session: Session, run_id: int, *, outputs_of: frozenset[str] | None = None
) -> dict[str, NodeState]:
    """The state of every record of a run; with ``outputs_of``, only those records carry
    their output."""
    if outputs_of is None:
        rows = session.connection().execute(_STATES, {"p_run": run_id})
    else:
        params = {"p_run": run_id, "p_nodes": sorted(outputs_of)}
        rows = session.connection().execute(_STATUSES, params)
    return _states_of(rows)


def read_states(
    session: Session, run_id: int, spec: PipelineSpec, node_ids: frozenset[str]
) -> dict[str, NodeState]:
    """The states (with outputs) of the records of ``node_ids``, maps with their children."""
    if not node_ids:
        return {}
    names = sorted(node_ids)
    maps = [n for n in names if spec.node(n).type == "map"]
    if not maps:
        params = {"p_run": run_id, "p_nodes": names}
        return _states_of(session.connection().execute(_STATES_OF, params))
    rows = session.execute(
        select(EX.c.node_id, EX.c.status, EX.c.result).where(
            EX.c.pipeline_run_id == run_id,
            # LIKE's ``_`` matches any character: what is not exactly a child is dropped.
            or_(EX.c.node_id.in_(names), *(EX.c.node_id.like(f"{n}[%") for n in maps)),
        )
    )
    return {
        node_id: state
        for node_id, state in _states_of(rows).items()
        if split_record_id(node_id)[0] in node_ids
    }


def _node_rows(session: Session, run_id: int) -> list[dict[str, Any]]:
    e = Execution
    rows = session.execute(
        select(
            e.id,
            e.node_id,
            e.status,
            e.attempt,
            e.worker,
            e.started_at,
            e.finished_at,
            e.error,
            e.result.label("output"),
            e.input,
            e.attempts,
            e.idempotency_key,
        )
        .where(e.pipeline_run_id == run_id)
        .order_by(e.id)
    ).all()
    return [
        {
            key: (value.isoformat() if isinstance(value, datetime) else value)
            for key, value in row._mapping.items()
        }
        for row in rows
    ]


def stop_nodes(sql: Sql, session: Session, run_id: int, *, reason: str) -> None:
    """A run that ended: its queued nodes are cancelled, its running ones told to stop."""
    e = Execution
    queued = session.execute(
        select(e.id, e.attempt, e.status).where(
            e.pipeline_run_id == run_id, e.status.in_(("pending", "retrying"))
        )
    ).all()
    for record in queued:
        close_attempt(
            sql,
            session,
            record.id,
            record.attempt,
            status="cancelled",
            error=reason,
            values={"finished_at": sql.now()},
            from_status=record.status,
        )
    session.execute(
        update(e)
        .where(e.pipeline_run_id == run_id, e.status == "running", e.cancel_requested_at.is_(None))
        .values(cancel_requested_at=sql.now())
    )


def finish_starter(
    sql: Sql,
    session: Session,
    run: RunInfo,
    status: str,
    *,
    outputs: dict[str, Any] | None,
    error: str | None,
) -> None:
    """The execute_pipeline record that started the run ends as the run ended."""
    if run.action_run_id is None:
        return
    row = session.execute(
        select(EX.c.attempt, EX.c.status).where(EX.c.id == run.action_run_id)
    ).first()
    if row is None or row.status in FINAL:
        return
    close_attempt(
        sql,
        session,
        run.action_run_id,
        row.attempt,
        status=status,
        error=error,
        values={
            "finished_at": sql.now(),
            "result": {"pipeline_run_id": run.id, "outputs": outputs},
        },
        from_status=row.status,
    )


def _count_health(
    session: Session,
    spec: PipelineSpec,
    run: RunInfo,
    *,
    record_id: str,
    states: dict[str, NodeState],
    now: datetime,
) -> None:
    """Count consecutive failures of one node across runs; open its circuit at the threshold.

    A node opts in with ``config.circuit = {"failures": N, "cooldown_s": S}``.
    """
    spec_node_id, _index = split_record_id(record_id)
    circuit = spec.node(spec_node_id).config.get("circuit") or {}
    threshold = int(circuit.get("failures", 0))
    state = states.get(record_id)
    if not threshold or state is None or state.status not in (*FAILED, "succeeded"):
        return
    failed = state.status in FAILED
    h = PipelineNodeHealth
    health = session.get(h, (run.pipeline_id, spec_node_id))
    if health is None:
        health = h(
            pipeline_id=run.pipeline_id,
            node_id=spec_node_id,
            consecutive_failures=0,
            updated_at=now,
        )
        session.add(health)
    health.consecutive_failures = health.consecutive_failures + 1 if failed else 0
    health.updated_at = now
    if failed and health.consecutive_failures >= threshold:
        health.open_until = now + timedelta(seconds=float(circuit.get("cooldown_s", 60)))
    elif not failed:
        health.open_until = None


def _pipeline(session: Session, name: str, *, lock: Sql | None = None) -> Pipeline:
    stmt = select(Pipeline).where(Pipeline.name == name)
    if lock is not None:
        stmt = lock.for_update(stmt)
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"no pipeline named {name!r}")
    return row


def unfinished_nodes(session: Session, run_id: int) -> int:
    e = Execution
    return int(
        session.execute(
            select(func.count()).where(e.pipeline_run_id == run_id, e.status.in_(UNFINISHED))
        ).scalar_one()
    )
