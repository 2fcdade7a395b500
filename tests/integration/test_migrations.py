"""Migrations are the only way the schema is made: they must agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from gathering_tasks.db.engine import make_engine
from gathering_tasks.db.migrate import downgrade, upgrade
from gathering_tasks.db.models import Base


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
    # Then there is nothing to generate
    assert diff == []


def test_unique_slot_constraint_exists(db_url: str):
    engine = make_engine(db_url)
    try:
        uniques = inspect(engine).get_unique_constraints("scheduled_action_runs")
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("scheduled_actions")}
    finally:
        engine.dispose()
    assert [sorted(u["column_names"]) for u in uniques] == [["action_id", "scheduled_for"]]
    assert "ix_scheduled_actions_due" in indexes


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
        assert "scheduled_actions" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
