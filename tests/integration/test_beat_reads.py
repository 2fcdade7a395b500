"""What beat sends to the database while nothing is due: one read a tick, one more a sweep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, event, func, select, text

from gathering_tasks import keys
from gathering_tasks.beat import BeatEngine, SlotPlanner
from gathering_tasks.db.claims import SlotClaims
from gathering_tasks.db.engine import read_rows, reads_engine
from gathering_tasks.db.repo import Repository
from gathering_tasks.db.sweeps import Sweeps
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings
from tests.factories import once_action


class Stores:
    """A repository's stores, with beat's every-tick reads on their own engine."""

    def __init__(self, repo: Repository, reads: Engine | None) -> None:
        self.pipelines = repo.pipelines
        self.claims = SlotClaims(repo.factory, reads=reads)
        self.sweeps = Sweeps(repo.factory, progress=repo.pipelines, reads=reads)


@pytest.fixture
def reads(db_url: str, settings: Settings) -> Iterator[Engine | None]:
    engine = reads_engine(db_url, settings.db_timeouts)
    yield engine
    if engine is not None:
        engine.dispose()


@contextmanager
def statements(*engines: Engine | None) -> Iterator[list[str]]:
    """The SQL the engines send while the block runs (BEGIN/ROLLBACK of pysqlite excluded)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if not statement.startswith(("BEGIN", "PRAGMA")):
            seen.append(statement)

    unique = {id(e): e for e in engines if e is not None}.values()
    for engine in unique:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in unique:
            event.remove(engine, "before_cursor_execute", record)


def beat(settings: Settings, repo: Repository, reads: Engine | None, app: Celery) -> BeatEngine:
    lease = Lease(redis.Redis.from_url(settings.redis_url), keys.beat_leader("t"), 5)
    return BeatEngine(settings, Stores(repo, reads), lease, app)


def test_an_idle_tick_is_one_read(
    repo: Repository, settings: Settings, reads: Engine | None, celery_app: Celery
):
    # Given a leading beat whose sweep is not due, and an action due tomorrow
    once_action(repo, settings, datetime.now(UTC) + timedelta(days=1))
    engine = beat(settings, repo, reads, celery_app)
    assert engine.tick() > 0
    engine._next_sweep = float("inf")
    main = repo.factory.kw["bind"]
    # When it ticks again
    with statements(main, reads) as sent:
        engine.tick()
    # Then one statement reached the database: the due lookup, with the database clock
    assert len(sent) == 1
    assert "min(scheduled_actions.next_run_at)" in sent[0]


def test_a_sweep_with_nothing_to_do_is_one_read_and_retention_waits_its_cadence(
    repo: Repository, settings: Settings, reads: Engine | None, celery_app: Celery
):
    # Given a beat that swept once (retention pruned then)
    engine = beat(settings, repo, reads, celery_app)
    main = repo.factory.kw["bind"]
    with statements(main, reads) as first:
        engine.sweep(datetime.now(UTC))
    assert any(s.startswith("DELETE") for s in first)
    # When it sweeps again with nothing stale, lost or overdue
    with statements(main, reads) as sent:
        assert engine.sweep(datetime.now(UTC)) == 0
    # Then that sweep was a single read
    assert len(sent) == 1 and sent[0].startswith("SELECT EXISTS")


def test_the_tick_read_brings_the_database_clock(repo: Repository, reads: Engine | None):
    # Given an action due at a known slot
    claims = SlotClaims(repo.factory, reads=reads)
    before = repo.sweeps.read_now()
    # When beat reads its tick state
    state = claims.tick_state()
    # Then it has the database clock (aware UTC), and no action yet
    assert state.next_due_at is None
    assert state.db_now.tzinfo is not None and state.db_now >= before - timedelta(seconds=1)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_read_whose_connection_the_server_dropped_is_repeated_on_a_new_one(
    repo: Repository, reads: Engine | None
):
    # Given beat's reads connection, known to the server by its backend pid
    assert reads is not None
    claims = SlotClaims(repo.factory, reads=reads)
    claims.tick_state()
    (pid,) = read_rows(reads, select(func.pg_backend_pid()))[0]
    # When the server ends that backend (a restart, an idle timeout)
    with repo.factory() as session:
        session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        session.commit()
    # Then the next tick read still answers, on a new connection
    assert claims.tick_state().next_due_at is None
    (new_pid,) = read_rows(reads, select(func.pg_backend_pid()))[0]
    assert new_pid != pid


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_claim_is_the_same_three_statements_for_one_action_or_fifty(
    repo: Repository, settings: Settings
):
    # Given fifty actions due now
    now = datetime.now(UTC)
    for i in range(50):
        once_action(repo, settings, now, name=f"due-{i}")
    main = repo.factory.kw["bind"]
    # When the fifty due slots are claimed in one transaction
    with statements(main) as sent:
        batch = repo.claims.claim_due(now, limit=100, slot_budget=100, plan=SlotPlanner(now))
    # Then the records went in with one INSERT and the actions advanced with one UPDATE
    assert len(batch.dispatches) == 50
    # (after the due rows, read with whether each is busy), as for a single action
    assert [s.split()[0] for s in sent] == ["SELECT", "INSERT", "UPDATE"]
