"""execution ledger

Every unit of work becomes one record in ``executions``; ``scheduled_action_runs`` becomes a
view of the action records (one row per slot or trigger), so operators' SQL keeps working.
Actions gain ``archived_at`` (deleting archives; a name is unique among live actions) and
``skipped_slots``; ``catchup_max`` is clamped to what one claim plans (1,000).

Existing runs keep their ids, so their idempotency key stays ``gathering-run-<id>``; slot runs
get the deterministic dedupe key ``slot:<action id>:<epoch microseconds>``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAX_CATCHUP_SLOTS = 1000
BATCH = 2000
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)
OLD_RUN_STATUSES = (
    "'pending', 'running', 'retrying', 'succeeded', 'failed', 'timed_out', 'cancelled', 'skipped'"
)
RUN_STATUSES = (
    "'pending', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'timed_out', "
    "'cancelled', 'skipped'"
)
NODE_VIEW = (
    "CREATE VIEW pipeline_node_runs AS SELECT id, pipeline_run_id AS run_id, node_id, status, "
    "attempt, input, result AS output, error, worker, attempts, idempotency_key, started_at, "
    "finished_at, created_at, updated_at FROM executions WHERE kind = 'pipeline_node'"
)
KINDS = "'run_task', 'execute_pipeline', 'send_notification', 'call_api', 'pipeline_node'"
TRIGGERS = "'schedule', 'recovery', 'manual', 'api', 'pipeline'"
VIEW_COLUMNS = (
    "id, action_id, scheduled_for, trigger, status, attempt, celery_task_id, worker, "
    "retry_at, publish_count, republish_at, cancel_requested_at, started_at, heartbeat_at, "
    "finished_at, result, error, attempts, dedupe_key, idempotency_key, created_at, updated_at"
)
OLD_RUN_COLUMNS = (
    "id",
    "action_id",
    "scheduled_for",
    "trigger",
    "status",
    "attempt",
    "celery_task_id",
    "worker",
    "retry_at",
    "publish_count",
    "republish_at",
    "started_at",
    "heartbeat_at",
    "finished_at",
    "result",
    "error",
    "attempts",
    "created_at",
    "updated_at",
)


def _is_sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _executions_table() -> sa.Table:
    return op.create_table(
        "executions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("dedupe_key", sa.String(300), nullable=False),
        sa.Column("idempotency_key", sa.String(300), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=True),
        sa.Column("scheduled_for", TS, nullable=True),
        sa.Column("pipeline_run_id", sa.Integer(), nullable=True),
        sa.Column("node_id", sa.String(220), nullable=True),
        sa.Column("input", JSON, nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("definition", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("celery_task_id", sa.String(255), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("retry_at", TS, nullable=True),
        sa.Column("publish_count", sa.Integer(), nullable=False),
        sa.Column("republish_at", TS, nullable=True),
        sa.Column("cancel_requested_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(f"kind IN ({KINDS})", name=op.f("ck_executions_kind")),
        sa.CheckConstraint(f"status IN ({RUN_STATUSES})", name=op.f("ck_executions_status")),
        sa.CheckConstraint(f"trigger IN ({TRIGGERS})", name=op.f("ck_executions_trigger")),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["scheduled_actions.id"],
            name=op.f("fk_executions_action_id_scheduled_actions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_executions_dedupe_key")),
    )


def _actions_table(statuses: str, *, new: bool) -> sa.Table:
    """``scheduled_actions`` as 0001 made it (``new=False``) or as 0002 leaves it."""
    columns: list[Any] = [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("action_type", sa.String(32), nullable=False),
        sa.Column("action_config", JSON, nullable=False),
        sa.Column("schedule", JSON, nullable=False),
        sa.Column("start_at", TS, nullable=True),
        sa.Column("end_at", TS, nullable=True),
        sa.Column("max_runs", sa.Integer(), nullable=True),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("catchup_mode", sa.String(8), nullable=False),
        sa.Column("catchup_grace_s", sa.Float(), nullable=False),
        sa.Column("catchup_max", sa.Integer(), nullable=False),
        sa.Column("overlap_policy", sa.String(8), nullable=False),
        sa.Column("retry_max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_backoff_s", sa.Float(), nullable=False),
        sa.Column("retry_backoff_max_s", sa.Float(), nullable=False),
        sa.Column("timeout_s", sa.Integer(), nullable=True),
        sa.Column("queue", sa.String(100), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=True),
        sa.Column("next_run_at", TS, nullable=True),
        sa.Column("last_run_at", TS, nullable=True),
    ]
    if new:
        columns += [
            sa.Column("skipped_slots", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("archived_at", TS, nullable=True),
        ]
    columns += [
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "action_type IN ('run_task', 'execute_pipeline', 'send_notification', 'call_api')",
            name=op.f("ck_scheduled_actions_action_type"),
        ),
        sa.CheckConstraint(
            "catchup_mode IN ('skip', 'latest', 'all')",
            name=op.f("ck_scheduled_actions_catchup_mode"),
        ),
        sa.CheckConstraint(
            "overlap_policy IN ('skip', 'allow')", name=op.f("ck_scheduled_actions_overlap_policy")
        ),
        sa.CheckConstraint(f"status IN ({statuses})", name=op.f("ck_scheduled_actions_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_actions")),
    ]
    if not new:
        columns.append(sa.UniqueConstraint("name", name=op.f("uq_scheduled_actions_name")))
    return op.create_table("scheduled_actions__new", *columns)


NEW_ACTION_STATUSES = "'active', 'paused', 'completed', 'expired', 'disabled', 'archived'"
OLD_ACTION_STATUSES = "'active', 'paused', 'completed', 'expired', 'disabled'"


def _rebuild_sqlite(table: sa.Table, name: str) -> None:
    """SQLite cannot alter constraints: copy into a new table, swap it in (FKs are off)."""
    bind = op.get_bind()
    old_columns = {c["name"] for c in sa.inspect(bind).get_columns(name)}
    common = [c.name for c in table.columns if c.name in old_columns]
    cols = ", ".join(common)
    op.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {name}")
    op.execute(f"DROP TABLE {name}")
    op.execute(f"ALTER TABLE {table.name} RENAME TO {name}")


def _upgrade_actions() -> None:
    if _is_sqlite():
        op.execute("DROP INDEX IF EXISTS ix_scheduled_actions_due")
        _rebuild_sqlite(_actions_table(NEW_ACTION_STATUSES, new=True), "scheduled_actions")
    else:
        op.add_column(
            "scheduled_actions",
            sa.Column("skipped_slots", sa.Integer(), nullable=False, server_default="0"),
        )
        op.add_column("scheduled_actions", sa.Column("archived_at", TS, nullable=True))
        op.drop_constraint(op.f("uq_scheduled_actions_name"), "scheduled_actions", type_="unique")
        op.drop_constraint(op.f("ck_scheduled_actions_status"), "scheduled_actions", type_="check")
        op.create_check_constraint(
            op.f("ck_scheduled_actions_status"),
            "scheduled_actions",
            f"status IN ({NEW_ACTION_STATUSES})",
        )
    op.execute(
        f"UPDATE scheduled_actions SET catchup_max = {MAX_CATCHUP_SLOTS} "
        f"WHERE catchup_max > {MAX_CATCHUP_SLOTS}"
    )
    if _is_sqlite():
        op.create_index("ix_scheduled_actions_due", "scheduled_actions", ["status", "next_run_at"])
    op.create_index(
        "uq_scheduled_actions_live_name",
        "scheduled_actions",
        ["name"],
        unique=True,
        postgresql_where=sa.text("archived_at IS NULL"),
        sqlite_where=sa.text("archived_at IS NULL"),
    )


def _epoch_us(value: datetime) -> int:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _definition(action: Any) -> dict[str, Any]:
    return {
        "name": action.name,
        "config": action.action_config,
        "retry_max_attempts": action.retry_max_attempts,
        "retry_backoff_s": action.retry_backoff_s,
        "retry_backoff_max_s": action.retry_backoff_max_s,
        "timeout_s": action.timeout_s,
        "queue": action.queue,
        "priority": action.priority,
    }


def _old_runs(bind: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    meta = sa.MetaData()
    runs = sa.Table("scheduled_action_runs", meta, autoload_with=bind)
    actions = sa.Table("scheduled_actions", meta, autoload_with=bind)
    last_id = 0
    while True:
        rows = bind.execute(
            sa.select(
                runs,
                actions.c.action_type,
                actions.c.name,
                actions.c.action_config,
                actions.c.retry_max_attempts,
                actions.c.retry_backoff_s,
                actions.c.retry_backoff_max_s,
                actions.c.timeout_s,
                actions.c.queue,
                actions.c.priority,
            )
            .join(actions, actions.c.id == runs.c.action_id)
            .where(runs.c.id > last_id)
            .order_by(runs.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        last_id = rows[-1].id
        yield [_moved(row) for row in rows]


def _moved(row: Any) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in OLD_RUN_COLUMNS}
    slot = row.trigger in ("schedule", "recovery")
    values.update(
        kind=row.action_type,
        dedupe_key=(
            f"slot:{row.action_id}:{_epoch_us(row.scheduled_for)}" if slot else f"run:{row.id}"
        ),
        idempotency_key=f"gathering-run-{row.id}",
        definition=_definition(row),
    )
    return values


def _require_empty(*tables: str) -> None:
    bind = op.get_bind()
    for table in tables:
        count = bind.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        if count:
            raise RuntimeError(
                f"{table} holds {count} row(s) written outside gathering-tasks; this migration "
                "rebuilds it. Export them, empty the table, and upgrade again."
            )


def _pipeline_runs_table(target: str) -> sa.Table:
    return op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("pipeline_version", sa.Integer(), nullable=False),
        sa.Column("action_run_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger_data", JSON, nullable=True),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')",
            name=op.f("ck_pipeline_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["action_run_id"],
            [f"{target}.id"],
            name=op.f(f"fk_pipeline_runs_action_run_id_{target}"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_pipeline_runs_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_runs")),
    )


def _node_runs_table() -> sa.Table:
    return op.create_table(
        "pipeline_node_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("input", JSON, nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            f"status IN ({OLD_RUN_STATUSES})", name=op.f("ck_pipeline_node_runs_status")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["pipeline_runs.id"],
            name=op.f("fk_pipeline_node_runs_run_id_pipeline_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_node_runs")),
        sa.UniqueConstraint("run_id", "node_id", name=op.f("uq_pipeline_node_runs_run_id_node_id")),
    )


def _new_pipeline_tables() -> None:
    op.create_table(
        "pipeline_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_pipeline_versions_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_versions")),
        sa.UniqueConstraint(
            "pipeline_id", "version", name=op.f("uq_pipeline_versions_pipeline_id_version")
        ),
    )
    op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("pipeline_version", sa.Integer(), nullable=False),
        sa.Column("dedupe_key", sa.String(300), nullable=False),
        sa.Column("action_run_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger_data", JSON, nullable=True),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("deadline_at", TS, nullable=True),
        sa.Column("cancel_requested_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'timed_out', 'cancelled')",
            name=op.f("ck_pipeline_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["action_run_id"],
            ["executions.id"],
            name=op.f("fk_pipeline_runs_action_run_id_executions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_pipeline_runs_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline_runs")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_pipeline_runs_dedupe_key")),
    )
    op.create_index("ix_pipeline_runs_action_run_id", "pipeline_runs", ["action_run_id"])
    op.create_index("ix_pipeline_runs_pipeline_id", "pipeline_runs", ["pipeline_id"])
    op.create_index("ix_pipeline_runs_status_deadline", "pipeline_runs", ["status", "deadline_at"])
    op.create_table(
        "pipeline_node_health",
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(200), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("open_until", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_pipeline_node_health_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pipeline_id", "node_id", name=op.f("pk_pipeline_node_health")),
    )


def _drop_old_pipeline_runs() -> None:
    # No release wrote these tables (pipelines were not executable): rebuild, never lose.
    _require_empty("pipeline_node_runs", "pipeline_runs")
    op.drop_table("pipeline_node_runs")
    op.drop_index("ix_pipeline_runs_pipeline_id", table_name="pipeline_runs")
    op.drop_index("ix_pipeline_runs_action_run_id", table_name="pipeline_runs")
    op.drop_table("pipeline_runs")


def _old_pipeline_tables() -> None:
    """0001's pipeline run tables (the runs of this release have no place there)."""
    op.drop_index("ix_pipeline_runs_status_deadline", table_name="pipeline_runs")
    op.drop_index("ix_pipeline_runs_pipeline_id", table_name="pipeline_runs")
    op.drop_index("ix_pipeline_runs_action_run_id", table_name="pipeline_runs")
    op.drop_table("pipeline_runs")
    _pipeline_runs_table("scheduled_action_runs")
    op.create_index("ix_pipeline_runs_action_run_id", "pipeline_runs", ["action_run_id"])
    op.create_index("ix_pipeline_runs_pipeline_id", "pipeline_runs", ["pipeline_id"])
    _node_runs_table()


def upgrade() -> None:
    bind = op.get_bind()
    _upgrade_actions()
    executions = _executions_table()
    for batch in _old_runs(bind):
        bind.execute(executions.insert(), batch)
    if bind.dialect.name == "postgresql":
        # Keep handing out ids after the moved ones.
        op.execute(
            "SELECT setval(pg_get_serial_sequence('executions', 'id'), "
            "COALESCE((SELECT max(id) FROM executions), 0) + 1, false)"
        )
    op.create_index("ix_executions_status_updated", "executions", ["status", "updated_at"])
    op.create_index("ix_executions_action_slot", "executions", ["action_id", "scheduled_for"])
    op.create_index("ix_executions_finished", "executions", ["finished_at"])
    op.create_index("ix_executions_pipeline_run", "executions", ["pipeline_run_id"])
    _drop_old_pipeline_runs()
    _new_pipeline_tables()
    op.execute(NODE_VIEW)
    op.drop_index("ix_scheduled_action_runs_status_updated", table_name="scheduled_action_runs")
    op.drop_index("ix_scheduled_action_runs_action_id", table_name="scheduled_action_runs")
    op.drop_table("scheduled_action_runs")
    op.execute(
        f"CREATE VIEW scheduled_action_runs AS SELECT {VIEW_COLUMNS} "
        "FROM executions WHERE action_id IS NOT NULL"
    )


def _old_runs_table() -> sa.Table:
    return op.create_table(
        "scheduled_action_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.Integer(), nullable=False),
        sa.Column("scheduled_for", TS, nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("celery_task_id", sa.String(255), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("retry_at", TS, nullable=True),
        sa.Column("publish_count", sa.Integer(), nullable=False),
        sa.Column("republish_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            f"status IN ({OLD_RUN_STATUSES})", name=op.f("ck_scheduled_action_runs_status")
        ),
        sa.CheckConstraint(
            "trigger IN ('schedule', 'recovery', 'manual', 'api')",
            name=op.f("ck_scheduled_action_runs_trigger"),
        ),
        sa.ForeignKeyConstraint(
            ["action_id"],
            ["scheduled_actions.id"],
            name=op.f("fk_scheduled_action_runs_action_id_scheduled_actions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_action_runs")),
        sa.UniqueConstraint(
            "action_id",
            "scheduled_for",
            name=op.f("uq_scheduled_action_runs_action_id_scheduled_for"),
        ),
    )


def downgrade() -> None:
    """Back to 0001: action records return to a table; archived actions and nodes are dropped."""
    bind = op.get_bind()
    op.execute("DROP VIEW scheduled_action_runs")
    _old_runs_table()
    cols = ", ".join(OLD_RUN_COLUMNS)
    op.execute(
        f"INSERT INTO scheduled_action_runs ({cols}) SELECT {cols} FROM executions "
        "WHERE action_id IS NOT NULL AND trigger <> 'pipeline' AND action_id IN "
        "(SELECT id FROM scheduled_actions WHERE archived_at IS NULL)"
    )
    op.create_index("ix_scheduled_action_runs_action_id", "scheduled_action_runs", ["action_id"])
    op.create_index(
        "ix_scheduled_action_runs_status_updated", "scheduled_action_runs", ["status", "updated_at"]
    )
    op.execute("DROP VIEW pipeline_node_runs")
    op.drop_table("pipeline_node_health")
    _old_pipeline_tables()
    op.drop_table("pipeline_versions")
    op.drop_table("executions")
    op.execute("DELETE FROM scheduled_actions WHERE archived_at IS NOT NULL")
    op.drop_index("uq_scheduled_actions_live_name", table_name="scheduled_actions")
    if _is_sqlite():
        op.execute("DROP INDEX IF EXISTS ix_scheduled_actions_due")
        _rebuild_sqlite(_actions_table(OLD_ACTION_STATUSES, new=False), "scheduled_actions")
        op.create_index("ix_scheduled_actions_due", "scheduled_actions", ["status", "next_run_at"])
        return
    op.drop_constraint(op.f("ck_scheduled_actions_status"), "scheduled_actions", type_="check")
    op.create_check_constraint(
        op.f("ck_scheduled_actions_status"),
        "scheduled_actions",
        f"status IN ({OLD_ACTION_STATUSES})",
    )
    op.create_unique_constraint(op.f("uq_scheduled_actions_name"), "scheduled_actions", ["name"])
    op.drop_column("scheduled_actions", "archived_at")
    op.drop_column("scheduled_actions", "skipped_slots")
