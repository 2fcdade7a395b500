"""Migrations are the only way the schema is made: they must agree with the models, and
an upgrade must carry every row of an existing database across."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from gathering_tasks.db.engine import make_engine
from gathering_tasks.db.migrate import downgrade, upgrade
from gathering_tasks.db.models import Base
from tests.servers import PostgresServer


def test_autogenerate_finds_no_difference(db_url: str):
    # Given a database migrated to head (the db_url fixture did it)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            # When the models are compared with the migrated schema
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    # Then there is nothing to generate (the run view is not a table to create)
    assert diff == []


def test_every_entry_point_dedupes_on_a_unique_key(db_url: str):
    engine = make_engine(db_url)
    try:
        uniques = inspect(engine).get_unique_constraints("executions")
        indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("scheduled_actions")}
        views = inspect(engine).get_view_names()
    finally:
        engine.dispose()
    assert [u["column_names"] for u in uniques] == [["dedupe_key"]]
    assert "ix_scheduled_actions_due" in indexes
    assert indexes["uq_scheduled_actions_live_name"]["unique"]
    assert "scheduled_action_runs" in views


def test_downgrade_and_upgrade_round_trip(db_url: str):
    downgrade(db_url, "base")
    engine = make_engine(db_url)
    try:
        assert "scheduled_actions" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        assert "executions" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create_database()
    try:
        yield server.dsn(name)
    finally:
        server.drop_database(name)


SLOT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _populate_0001(url: str) -> None:
    """Actions and runs as release 0001 wrote them, in every status and trigger."""
    engine = make_engine(url)
    now = SLOT + timedelta(hours=1)
    action_cols = (
        "name, action_type, action_config, schedule, run_count, status, catchup_mode, "
        "catchup_grace_s, catchup_max, overlap_policy, retry_max_attempts, retry_backoff_s, "
        "retry_backoff_max_s, next_run_at, created_at, updated_at"
    )
    try:
        with engine.begin() as conn:
            for i, (atype, cmax) in enumerate([("run_task", 50), ("call_api", 10_000)]):
                conn.execute(
                    text(
                        f"INSERT INTO scheduled_actions ({action_cols}) VALUES (:name, :atype, "
                        ":config, :schedule, 3, 'active', 'all', 60, :cmax, 'skip', 3, 1.5, 60,"
                        " :now, :now, :now)"
                    ),
                    {
                        "name": f"old-{i}",
                        "atype": atype,
                        "config": '{"task": "demo.add", "args": [1, 2]}',
                        "schedule": '{"kind": "interval", "every_s": 60}',
                        "cmax": cmax,
                        "now": now,
                    },
                )
            rows = [
                (1, SLOT, "schedule", "succeeded", 1),
                (1, SLOT + timedelta(minutes=1), "recovery", "failed", 3),
                (1, SLOT + timedelta(minutes=2), "manual", "pending", 0),
                (2, SLOT, "schedule", "running", 2),
                (2, SLOT + timedelta(minutes=1), "api", "retrying", 1),
            ]
            for action_id, slot, trigger, status, attempt in rows:
                conn.execute(
                    text(
                        "INSERT INTO scheduled_action_runs (action_id, scheduled_for, trigger, "
                        "status, attempt, publish_count, created_at, updated_at, attempts) "
                        "VALUES (:a, :slot, :trigger, :status, :attempt, 0, :now, :now, "
                        ":attempts)"
                    ),
                    {
                        "a": action_id,
                        "slot": slot,
                        "trigger": trigger,
                        "status": status,
                        "attempt": attempt,
                        "now": now,
                        "attempts": '[{"attempt": 1, "status": "failed"}]',
                    },
                )
    finally:
        engine.dispose()


def test_upgrade_of_a_populated_0001_database_loses_nothing(empty_db_url: str):
    # Given a database at 0001 holding actions and runs in every status and trigger
    upgrade(empty_db_url, "0001")
    _populate_0001(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.connect() as conn:
            before = conn.execute(
                text(
                    "SELECT id, action_id, trigger, status, attempt FROM scheduled_action_runs "
                    "ORDER BY id"
                )
            ).all()
        # When it is upgraded to head
        upgrade(empty_db_url)
        with engine.connect() as conn:
            after = conn.execute(
                text(
                    "SELECT id, action_id, trigger, status, attempt FROM scheduled_action_runs "
                    "ORDER BY id"
                )
            ).all()
            records = conn.execute(
                text("SELECT id, kind, dedupe_key, idempotency_key, definition FROM executions")
            ).all()
            caps = conn.execute(
                text("SELECT name, catchup_max, skipped_slots FROM scheduled_actions ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    # Then every run is still there, through the view operators read, unchanged
    assert len(before) == 5
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    # And each became a ledger record of its action's kind, with keys that keep the old
    # idempotency key (receivers see the same key for a retried old run)
    kinds = {r.id: r.kind for r in records}
    assert [kinds[r.id] for r in before] == ["run_task"] * 3 + ["call_api"] * 2
    assert {r.idempotency_key for r in records} == {f"gathering-run-{r.id}" for r in before}
    slot_keys = sorted(r.dedupe_key for r in records if r.dedupe_key.startswith("slot:"))
    assert len(slot_keys) == 3
    # And a catch-up cap past what a claim plans is clamped to it; nothing was skipped yet
    assert [tuple(c) for c in caps] == [("old-0", 50, 0), ("old-1", 1000, 0)]


def test_new_records_continue_after_the_moved_ids(empty_db_url: str):
    # Given a populated 0001 database upgraded to head
    upgrade(empty_db_url, "0001")
    _populate_0001(empty_db_url)
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        with engine.begin() as conn:
            # When a new record is inserted without an id
            conn.execute(
                text(
                    "INSERT INTO executions (kind, dedupe_key, idempotency_key, action_id, "
                    "trigger, definition, status, attempt, publish_count, created_at, "
                    "updated_at) VALUES ('run_task', 'k', 'k', 1, 'manual', '{}', 'pending', 0,"
                    " 0, :now, :now)"
                ),
                {"now": SLOT},
            )
            new_id = conn.execute(text("SELECT max(id) FROM executions")).scalar_one()
    finally:
        engine.dispose()
    # Then it got an id after the moved ones
    assert new_id == 6
