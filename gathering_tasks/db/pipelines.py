"""Pipelines in the database: versioned definitions, runs, and a run's progress.

A pipeline run's nodes are ledger records (kind ``pipeline_node``). When a node's outcome is
recorded, :func:`advance` runs in THE SAME transaction: it locks the run's row, asks the pure
planner what became ready or skipped, inserts those records (``ON CONFLICT (dedupe_key) DO
NOTHING``) and returns their dispatches, to publish after commit. The row lock serialises the
completions of one run, so two predecessors finishing at the same instant on two workers
neither enqueue a successor twice nor forget it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gathering_tasks.db.ledger import (
    FINAL,
    UNFINISHED,
    Dispatch,
    close_attempt,
    dispatch_for,
    idempotency_key,
)
from gathering_tasks.db.models import (
    Base,
    Execution,
    Pipeline,
    PipelineNodeHealth,
    PipelineRun,
    PipelineVersion,
)
from gathering_tasks.db.sql import Sql
from gathering_tasks.errors import InvalidInput, NotFound
from gathering_tasks.pipelines.definition import PipelineSpec, parse_pipeline
from gathering_tasks.pipelines.planner import NodeState, Ready, sink_outputs
from gathering_tasks.pipelines.planner import advance as plan_advance

log = logging.getLogger(__name__)

FAILED = ("failed", "timed_out")
_SPECS: dict[tuple[str, int, int], PipelineSpec] = {}
MAX_CACHED_SPECS = 256


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


def node_definition(
    pipeline: Pipeline | Any, version: int, spec: PipelineSpec, ready: Ready
) -> dict[str, Any]:
    """The snapshot a node record executes: its node, its retry policy, its routing."""
    node = spec.node(ready.node_id)
    retry = node.retry or spec.retry
    return {
        "name": f"{pipeline.name}.{ready.record_id}",
        "pipeline": pipeline.name,
        "pipeline_id": pipeline.id,
        "version": version,
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
            dispatches = self._progress(session, run, now)
            return Started(run.id, run.status, dispatches, run.outputs, run.error)

    def lock_run_of(self, session: Session, record_id: int) -> int | None:
        """The ledger's first hook: lock the run of a node record before its row."""
        run_id = session.execute(
            select(Execution.pipeline_run_id).where(Execution.id == record_id)
        ).scalar_one_or_none()
        if run_id is not None:
            session.execute(self.for_update(select(PipelineRun.id).where(PipelineRun.id == run_id)))
        return run_id

    def advance_record(self, session: Session, record_id: int) -> list[Dispatch]:
        """The ledger's hook: after a final outcome of ``record_id``, if it is a node of a
        pipeline run, move that run on (same transaction)."""
        e = Execution
        row = session.execute(
            select(e.pipeline_run_id, e.node_id, e.status, e.definition).where(e.id == record_id)
        ).first()
        if row is None or row.pipeline_run_id is None:
            return []
        now = datetime.now(UTC)
        _count_health(session, row, now)
        return self.advance(session, row.pipeline_run_id, now)

    def advance(self, session: Session, run_id: int, now: datetime) -> list[Dispatch]:
        """Inside the transaction that recorded a node's outcome: what comes next."""
        run = session.execute(
            self.for_update(select(PipelineRun).where(PipelineRun.id == run_id))
        ).scalar_one_or_none()
        if run is None or run.status != "running":
            return []
        return self._progress(session, run, now)

    def _progress(self, session: Session, run: PipelineRun, now: datetime) -> list[Dispatch]:
        pipeline = session.get(Pipeline, run.pipeline_id)
        assert pipeline is not None
        spec = spec_of(session, run.pipeline_id, run.pipeline_version)
        states = node_states(session, run.id)
        plan = plan_advance(spec, states)
        if plan.final == "failed":
            error = "node(s) failed: " + ", ".join(plan.failed_nodes)
            self._finalize(session, run, "failed", now=now, outputs=None, error=error)
            return []
        records: list[dict[str, Any]] = []
        for ready in plan.ready:
            definition = node_definition(pipeline, run.pipeline_version, spec, ready)
            records.append(_node_record(run.id, definition, ready, now, status="pending"))
        for node_id in plan.skip:
            ready = Ready(record_id=node_id, node_id=node_id)
            definition = node_definition(pipeline, run.pipeline_version, spec, ready)
            records.append(_node_record(run.id, definition, ready, now, status="skipped"))
        inserted = self._insert_records(session, records)
        if plan.skip:
            # A skipped node may make others ready or skipped: look again.
            return [*inserted, *self._progress(session, run, now)]
        if plan.final == "succeeded":
            outputs = sink_outputs(spec, states)
            self._finalize(session, run, "succeeded", now=now, outputs=outputs, error=None)
        return inserted

    def _insert_records(self, session: Session, records: list[dict[str, Any]]) -> list[Dispatch]:
        if not records:
            return []
        table = Base.metadata.tables[Execution.__tablename__]
        stmt = (
            self.insert(table)
            .on_conflict_do_nothing(index_elements=[table.c.dedupe_key])
            .returning(table.c.id, table.c.status, table.c.definition, table.c.retry_at)
        )
        rows = session.connection().execute(stmt, records).all()
        return [
            _with_countdown(dispatch_for(row.id, "pipeline_node", row.definition), row)
            for row in rows
            if row.status == "pending"
        ]

    def _finalize(
        self,
        session: Session,
        run: PipelineRun,
        status: str,
        *,
        now: datetime,
        outputs: dict[str, Any] | None,
        error: str | None,
    ) -> None:
        run.status, run.outputs, run.error = status, outputs, error
        run.finished_at = run.updated_at = now
        stop_nodes(self, session, run.id, reason=f"pipeline run {status}")
        finish_starter(self, session, run)
        log.info(
            "pipeline run %d %s",
            run.id,
            status,
            extra={"pipeline_run_id": run.id, "status": status},
        )

    def cancel_run(self, run_id: int, *, now: datetime, status: str = "cancelled") -> str:
        """Cancel (or time out) a run: queued nodes end, running ones are told to stop."""
        with self.write_tx() as session:
            run = session.execute(
                self.for_update(select(PipelineRun).where(PipelineRun.id == run_id))
            ).scalar_one_or_none()
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            if run.status != "running":
                return run.status
            run.cancel_requested_at = now
            error = "cancelled" if status == "cancelled" else "the run exceeded its timeout"
            self._finalize(session, run, status, now=now, outputs=None, error=error)
            return status

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

    def run_context(
        self, run_id: int
    ) -> tuple[PipelineSpec, dict[str, NodeState], dict[str, Any], str]:
        """What a node needs to run: the spec, the states of the run's nodes, its input, status."""
        with self.factory() as session:
            run = session.get(PipelineRun, run_id)
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            spec = spec_of(session, run.pipeline_id, run.pipeline_version)
            return spec, node_states(session, run_id), dict(run.trigger_data or {}), run.status

    def record_input(self, record_id: int, attempt: int, value: dict[str, Any]) -> None:
        """Keep what a node attempt was given (its predecessors' outputs), for the history."""
        e = Execution
        with self.write_tx() as session:
            session.execute(
                update(e)
                .where(e.id == record_id, e.attempt == attempt, e.status == "running")
                .values(input=value)
            )

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


def _with_countdown(dispatch: Dispatch, row: Any) -> Dispatch:
    if row.retry_at is None:
        return dispatch
    delay_s = _delay_of(row.definition)
    return replace(dispatch, countdown_s=delay_s)


def node_states(session: Session, run_id: int) -> dict[str, NodeState]:
    e = Execution
    rows = session.execute(
        select(e.node_id, e.status, e.result).where(e.pipeline_run_id == run_id)
    ).all()
    return {row.node_id: NodeState(row.status, row.result) for row in rows if row.node_id}


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


def finish_starter(sql: Sql, session: Session, run: PipelineRun) -> None:
    """The execute_pipeline record that started the run ends as the run ended."""
    if run.action_run_id is None:
        return
    e = Execution
    row = session.execute(select(e.attempt, e.status).where(e.id == run.action_run_id)).first()
    if row is None or row.status in FINAL:
        return
    close_attempt(
        sql,
        session,
        run.action_run_id,
        row.attempt,
        status=run.status,
        error=run.error,
        values={
            "finished_at": sql.now(),
            "result": {"pipeline_run_id": run.id, "outputs": run.outputs},
        },
        from_status=row.status,
    )


def _count_health(session: Session, row: Any, now: datetime) -> None:
    """Count consecutive failures of one node across runs; open its circuit at the threshold.

    A node opts in with ``config.circuit = {"failures": N, "cooldown_s": S}``.
    """
    node = row.definition.get("node") or {}
    circuit = (node.get("config") or {}).get("circuit") or {}
    threshold = int(circuit.get("failures", 0))
    if not threshold or row.status not in (*FAILED, "succeeded"):
        return
    spec_node_id = node.get("id", row.node_id)
    failed = row.status in FAILED
    h = PipelineNodeHealth
    pipeline_id = int(row.definition["pipeline_id"])
    health = session.get(h, (pipeline_id, spec_node_id))
    if health is None:
        health = h(
            pipeline_id=pipeline_id, node_id=spec_node_id, consecutive_failures=0, updated_at=now
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
