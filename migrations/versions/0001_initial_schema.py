"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pipelines',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('definition', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('timeout_s', sa.Integer(), nullable=True),
    sa.Column('retry_max_attempts', sa.Integer(), nullable=False),
    sa.Column('retry_backoff_s', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipelines')),
    sa.UniqueConstraint('name', name=op.f('uq_pipelines_name'))
    )
    op.create_table('scheduled_actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('action_type', sa.String(length=32), nullable=False),
    sa.Column('action_config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('schedule', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('start_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('end_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('max_runs', sa.Integer(), nullable=True),
    sa.Column('run_count', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('catchup_mode', sa.String(length=8), nullable=False),
    sa.Column('catchup_grace_s', sa.Float(), nullable=False),
    sa.Column('catchup_max', sa.Integer(), nullable=False),
    sa.Column('overlap_policy', sa.String(length=8), nullable=False),
    sa.Column('retry_max_attempts', sa.Integer(), nullable=False),
    sa.Column('retry_backoff_s', sa.Float(), nullable=False),
    sa.Column('retry_backoff_max_s', sa.Float(), nullable=False),
    sa.Column('timeout_s', sa.Integer(), nullable=True),
    sa.Column('queue', sa.String(length=100), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=True),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("action_type IN ('run_task', 'execute_pipeline', 'send_notification', 'call_api')", name=op.f('ck_scheduled_actions_action_type')),
    sa.CheckConstraint("catchup_mode IN ('skip', 'latest', 'all')", name=op.f('ck_scheduled_actions_catchup_mode')),
    sa.CheckConstraint("overlap_policy IN ('skip', 'allow')", name=op.f('ck_scheduled_actions_overlap_policy')),
    sa.CheckConstraint("status IN ('active', 'paused', 'completed', 'expired', 'disabled')", name=op.f('ck_scheduled_actions_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scheduled_actions')),
    sa.UniqueConstraint('name', name=op.f('uq_scheduled_actions_name'))
    )
    with op.batch_alter_table('scheduled_actions', schema=None) as batch_op:
        batch_op.create_index('ix_scheduled_actions_due', ['status', 'next_run_at'], unique=False)

    op.create_table('scheduled_action_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('action_id', sa.Integer(), nullable=False),
    sa.Column('scheduled_for', sa.DateTime(timezone=True), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('celery_task_id', sa.String(length=255), nullable=True),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('publish_count', sa.Integer(), nullable=False),
    sa.Column('republish_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('result', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'retrying', 'succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')", name=op.f('ck_scheduled_action_runs_status')),
    sa.CheckConstraint("trigger IN ('schedule', 'recovery', 'manual', 'api')", name=op.f('ck_scheduled_action_runs_trigger')),
    sa.ForeignKeyConstraint(['action_id'], ['scheduled_actions.id'], name=op.f('fk_scheduled_action_runs_action_id_scheduled_actions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_scheduled_action_runs')),
    sa.UniqueConstraint('action_id', 'scheduled_for', name=op.f('uq_scheduled_action_runs_action_id_scheduled_for'))
    )
    with op.batch_alter_table('scheduled_action_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_scheduled_action_runs_action_id'), ['action_id'], unique=False)
        batch_op.create_index('ix_scheduled_action_runs_status_updated', ['status', 'updated_at'], unique=False)

    op.create_table('pipeline_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pipeline_id', sa.Integer(), nullable=False),
    sa.Column('pipeline_version', sa.Integer(), nullable=False),
    sa.Column('action_run_id', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('trigger_data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('outputs', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')", name=op.f('ck_pipeline_runs_status')),
    sa.ForeignKeyConstraint(['action_run_id'], ['scheduled_action_runs.id'], name=op.f('fk_pipeline_runs_action_run_id_scheduled_action_runs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_pipeline_runs_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_runs'))
    )
    with op.batch_alter_table('pipeline_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pipeline_runs_action_run_id'), ['action_run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_pipeline_runs_pipeline_id'), ['pipeline_id'], unique=False)

    op.create_table('pipeline_node_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('input', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('output', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'retrying', 'succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')", name=op.f('ck_pipeline_node_runs_status')),
    sa.ForeignKeyConstraint(['run_id'], ['pipeline_runs.id'], name=op.f('fk_pipeline_node_runs_run_id_pipeline_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_node_runs')),
    sa.UniqueConstraint('run_id', 'node_id', name=op.f('uq_pipeline_node_runs_run_id_node_id'))
    )


def downgrade() -> None:
    op.drop_table('pipeline_node_runs')
    with op.batch_alter_table('pipeline_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pipeline_runs_pipeline_id'))
        batch_op.drop_index(batch_op.f('ix_pipeline_runs_action_run_id'))

    op.drop_table('pipeline_runs')
    with op.batch_alter_table('scheduled_action_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_scheduled_action_runs_status_updated')
        batch_op.drop_index(batch_op.f('ix_scheduled_action_runs_action_id'))

    op.drop_table('scheduled_action_runs')
    with op.batch_alter_table('scheduled_actions', schema=None) as batch_op:
        batch_op.drop_index('ix_scheduled_actions_due')

    op.drop_table('scheduled_actions')
    op.drop_table('pipelines')
