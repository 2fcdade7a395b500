"""The schema. Alembic migrations in ``migrations/`` are the only way it reaches a database."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gathering_tasks.db.types import JsonType, UtcDateTime
from gathering_tasks.kinds import ACTION_TYPES, EXECUTION_KINDS

ACTION_STATUSES = ("active", "paused", "completed", "expired", "disabled", "archived")

RUN_STATUSES = (
    "pending",
    "running",
    "retrying",
    # handed its work on (an execute_pipeline record while its pipeline runs): no worker
    # holds it, and the pipeline's end writes its final status
    "waiting",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "skipped",
)
RUN_TRIGGERS = ("schedule", "recovery", "manual", "api", "pipeline")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ScheduledAction(Base):
    __tablename__ = "scheduled_actions"
    __table_args__ = (
        CheckConstraint(_in("action_type", ACTION_TYPES), name="action_type"),
        CheckConstraint(_in("status", ACTION_STATUSES), name="status"),
        CheckConstraint(_in("catchup_mode", ("skip", "latest", "all")), name="catchup_mode"),
        CheckConstraint(_in("overlap_policy", ("skip", "allow")), name="overlap_policy"),
        # The due query: WHERE status = 'active' AND next_run_at <= now ORDER BY next_run_at.
        Index("ix_scheduled_actions_due", "status", "next_run_at"),
        # A name is unique among live actions; an archived action keeps its name and runs.
        Index(
            "uq_scheduled_actions_live_name",
            "name",
            unique=True,
            postgresql_where=text("archived_at IS NULL"),
            sqlite_where=text("archived_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    action_type: Mapped[str] = mapped_column(String(32))
    action_config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    schedule: Mapped[dict[str, Any]] = mapped_column(JsonType)
    start_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    max_runs: Mapped[int | None] = mapped_column(Integer)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="active")
    catchup_mode: Mapped[str] = mapped_column(String(8), default="latest")
    catchup_grace_s: Mapped[float] = mapped_column(Float, default=3600.0)
    catchup_max: Mapped[int] = mapped_column(Integer, default=100)
    overlap_policy: Mapped[str] = mapped_column(String(8), default="skip")
    retry_max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    retry_backoff_s: Mapped[float] = mapped_column(Float, default=5.0)
    retry_backoff_max_s: Mapped[float] = mapped_column(Float, default=300.0)
    timeout_s: Mapped[int | None] = mapped_column(Integer)
    queue: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int | None] = mapped_column(Integer)
    next_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Due slots that the catch-up or overlap policy did not run, counted (never silent).
    skipped_slots: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    archived_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Execution(Base):
    """The execution ledger: one record per unit of work a worker executes.

    A scheduled slot, a manual or API trigger (and all retries of either) and a pipeline node
    are each one record. The guard, the sweeper and the publisher work on any record; the
    worker executes the ``definition`` snapshot taken when the record was created.
    """

    __tablename__ = "executions"
    __table_args__ = (
        # Every entry point dedupes on a key: a slot (action, time), a message id, a node.
        UniqueConstraint("dedupe_key"),
        CheckConstraint(_in("kind", EXECUTION_KINDS), name="kind"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        CheckConstraint(_in("trigger", RUN_TRIGGERS), name="trigger"),
        # The sweeper's queries: unfinished records by state and age; retention by age.
        Index("ix_executions_status_updated", "status", "updated_at"),
        Index("ix_executions_action_slot", "action_id", "scheduled_for"),
        Index("ix_executions_finished", "finished_at"),
        Index("ix_executions_pipeline_run", "pipeline_run_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    dedupe_key: Mapped[str] = mapped_column(String(300))
    idempotency_key: Mapped[str] = mapped_column(String(300))
    action_id: Mapped[int | None] = mapped_column(ForeignKey("scheduled_actions.id"))
    scheduled_for: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # A pipeline node's record: its run and node (``map[3]`` for a map's fourth item).
    pipeline_run_id: Mapped[int | None] = mapped_column(Integer)
    node_id: Mapped[str | None] = mapped_column(String(220))
    input: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    # What the worker executes: name, config, retry policy, timeout and routing, as they
    # were when the record was made (an edit or an archive later does not change a run).
    definition: Mapped[dict[str, Any]] = mapped_column(JsonType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))
    retry_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The sweeper's re-publish bookkeeping (a lost message is replaced; a backlog not flooded).
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    republish_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    # One entry per finished attempt: attempt, status, worker, started_at, ended_at, error.
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class _Views(DeclarativeBase):
    """Read-only views over the ledger. Not in ``Base.metadata``: migrations create them."""

    metadata = MetaData(naming_convention=NAMING)


class ScheduledActionRun(_Views):
    """``scheduled_action_runs``: the action runs of the ledger, one row per slot or trigger.

    Operators' SQL and dashboards read this view; the product writes ``executions``.
    """

    __tablename__ = "scheduled_action_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action_id: Mapped[int] = mapped_column(Integer)
    scheduled_for: Mapped[datetime] = mapped_column(UtcDateTime)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    celery_task_id: Mapped[str | None] = mapped_column(String(255))
    worker: Mapped[str | None] = mapped_column(String(255))
    retry_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    publish_count: Mapped[int] = mapped_column(Integer)
    republish_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    dedupe_key: Mapped[str] = mapped_column(String(300))
    idempotency_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Pipeline(Base):
    """A pipeline by name; ``definition`` and ``version`` are its current version's."""

    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    definition: Mapped[dict[str, Any]] = mapped_column(JsonType)
    version: Mapped[int] = mapped_column(Integer, default=1)
    timeout_s: Mapped[int | None] = mapped_column(Integer)
    retry_max_attempts: Mapped[int] = mapped_column(Integer, default=1)
    retry_backoff_s: Mapped[float] = mapped_column(Float, default=5.0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PipelineVersion(Base):
    """Every version of a pipeline, immutable: a run keeps the version it started with."""

    __tablename__ = "pipeline_versions"
    __table_args__ = (UniqueConstraint("pipeline_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    definition: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


PIPELINE_RUN_STATUSES = ("running", "succeeded", "failed", "timed_out", "cancelled")


class PipelineRun(Base):
    """One run of one pipeline version. Its nodes are ledger records (kind pipeline_node)."""

    __tablename__ = "pipeline_runs"
    __table_args__ = (
        # One run per starting record (a redelivered execute_pipeline) or per caller key.
        UniqueConstraint("dedupe_key"),
        CheckConstraint(_in("status", PIPELINE_RUN_STATUSES), name="status"),
        Index("ix_pipeline_runs_status_deadline", "status", "deadline_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), index=True
    )
    pipeline_version: Mapped[int] = mapped_column(Integer)
    dedupe_key: Mapped[str] = mapped_column(String(300))
    # The execute_pipeline record that started it: its status mirrors the run's end.
    action_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("executions.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default="running")
    trigger_data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PipelineNodeHealth(Base):
    """The per-node circuit breaker: consecutive failures of one node across runs."""

    __tablename__ = "pipeline_node_health"

    pipeline_id: Mapped[int] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    open_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PipelineNodeRun(_Views):
    """``pipeline_node_runs``: the node records of the ledger, one row per node (or map item)."""

    __tablename__ = "pipeline_node_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(220))
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    input: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    output: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType)
    idempotency_key: Mapped[str] = mapped_column(String(300))
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
