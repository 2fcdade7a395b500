"""The ledger contract: one suite, run against the in-memory twin, SQLite and PostgreSQL.

Whatever the guard relies on (conditional start, attempt fences, heartbeats, retries,
cancellation, history) must hold on every backend, so that tests over the twin say something
about production. The SQL ledger judges time with the database clock, so these tests compare
times with each other, never with the test's own clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, Protocol

import pytest
from sqlalchemy.exc import OperationalError

from gathering_tasks.api import ActionService
from gathering_tasks.clock import utcnow
from gathering_tasks.db.claims import definition_of
from gathering_tasks.db.engine import session_factory
from gathering_tasks.db.ledger import (
    Dispatch,
    LedgerPort,
    Pulse,
    Record,
    StartRefused,
    idempotency_key,
    trigger_key,
)
from gathering_tasks.db.memory import MemoryLedger
from gathering_tasks.db.models import Execution
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import NotFound
from gathering_tasks.settings import Settings
from tests.twins import ManualClock

KIND = "run_task"
NAME = "nightly-report"
ACTION = {
    "name": NAME,
    "action_type": KIND,
    "config": {"task": "demo.add", "args": [1, 2]},
    "retry_max_attempts": 3,
    "retry_backoff_s": 0.0,
    "timeout_s": 120,
    "queue": "reports",
    "priority": 7,
}
# What claims.definition_of snapshots for ACTION (the action's other fields at defaults).
DEFINITION = definition_of(
    SimpleNamespace(
        name=NAME,
        action_config=ACTION["config"],
        retry_max_attempts=3,
        retry_backoff_s=0.0,
        retry_backoff_max_s=300.0,
        timeout_s=120,
        queue="reports",
        priority=7,
    )
)


class Ledger(LedgerPort, Protocol):
    def get(self, record_id: int) -> dict[str, Any]: ...


class Backend(Protocol):
    """A ledger, and the ways this suite inserts and requeues its records."""

    @property
    def ledger(self) -> Ledger: ...

    def insert(self, key: str = "k1") -> int: ...

    def requeue(self, record_id: int, attempt: int) -> Dispatch | None:
        """The sweeper's requeue of a lost attempt (its heartbeat counted as stale)."""
        ...


class MemoryBackend:
    def __init__(self) -> None:
        self.ledger = MemoryLedger()

    def insert(self, key: str = "k1") -> int:
        return self.ledger.add(KIND, trigger_key(1, key), DEFINITION, action_id=1)

    def requeue(self, record_id: int, attempt: int) -> Dispatch | None:
        stale_before = utcnow() + timedelta(hours=1)
        return self.ledger.requeue_lost(record_id, attempt, error="lost", stale_before=stale_before)


class SqlBackend:
    def __init__(self, url: str) -> None:
        factory = session_factory(url)
        self.repo = Repository(factory)
        self.ledger = self.repo.ledger
        now = utcnow()
        service = ActionService(
            self.repo, Settings(database_url=url), task_allowed=lambda _n: True, clock=lambda: now
        )
        at = (now + timedelta(days=1)).isoformat()
        service.create({**ACTION, "schedule": {"kind": "once", "at": at}})

    def insert(self, key: str = "k1") -> int:
        dispatch, _status = self.repo.claims.trigger(NAME, now=utcnow(), key=key)
        return dispatch.record_id

    def requeue(self, record_id: int, attempt: int) -> Dispatch | None:
        sweeps = self.repo.sweeps
        stale_before = sweeps.read_now() + timedelta(hours=1)
        return sweeps.requeue_lost(record_id, attempt, error="lost", stale_before=stale_before)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The conftest's migrated throwaway database for this backend; None for the twin."""
    if request.param == "memory":
        yield None
        return
    # The conftest's db_url, which this fixture overrides, given this test's parameter.
    yield request.getfixturevalue("db_url")


@pytest.fixture
def backend(db_url: str | None) -> Backend:
    return MemoryBackend() if db_url is None else SqlBackend(db_url)


def start(backend: Backend, record_id: int, worker: str = "w1") -> Record:
    started = backend.ledger.start(record_id, kind=KIND, worker=worker, task_id=f"{worker}-t")
    assert isinstance(started, Record), started
    return started


def at(value: str | None) -> datetime:
    assert value is not None
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None
    return moment


def history(record: dict[str, Any]) -> list[tuple[int, str, str | None]]:
    return [(e["attempt"], e["status"], e["worker"]) for e in record["attempts"] or []]


# -- inserting and starting ------------------------------------------------------------------


def test_a_dedupe_key_makes_one_record(backend: Backend) -> None:
    # Given a record inserted under a key
    first = backend.insert("msg-1")
    # When the same key is inserted again, and another key once
    again = backend.insert("msg-1")
    other = backend.insert("msg-2")
    # Then the repeat gives the first record back, and the other key a new one
    assert again == first
    assert other != first


def test_start_moves_a_pending_record_to_running_once(backend: Backend) -> None:
    # Given a pending record
    record_id = backend.insert()
    # When a worker starts it
    record = start(backend, record_id, worker="w1")
    # Then it is attempt 1, carrying the definition snapshot and the stable idempotency key
    row = backend.ledger.get(record_id)
    assert (record.id, record.kind, record.attempt) == (record_id, KIND, 1)
    assert record.definition == DEFINITION
    assert record.idempotency_key == idempotency_key(row["dedupe_key"])
    assert (record.trigger, record.action_id) == ("manual", row["action_id"])
    assert (row["status"], row["attempt"], row["worker"]) == ("running", 1, "w1")
    assert row["celery_task_id"] == "w1-t"
    assert at(row["started_at"]) <= at(row["heartbeat_at"])
    # And a second start is refused, leaving it as it was
    refused = backend.ledger.start(record_id, kind=KIND, worker="w2", task_id="w2-t")
    assert refused == StartRefused("not_startable", status="running", kind=KIND)
    assert backend.ledger.get(record_id) == row


def test_start_by_a_delivery_of_another_kind_is_refused_untouched(backend: Backend) -> None:
    # Given a pending run_task record
    record_id = backend.insert()
    before = backend.ledger.get(record_id)
    # When a call_api delivery tries to start it
    refused = backend.ledger.start(record_id, kind="call_api", worker="w1", task_id="t")
    # Then it is refused for its kind, and the record is untouched
    assert refused == StartRefused("kind_mismatch", status="pending", kind=KIND)
    assert backend.ledger.get(record_id) == before
    assert (before["status"], before["attempt"]) == ("pending", 0)


def test_a_missing_record_is_refused_everywhere(backend: Backend) -> None:
    # Given an id that no record has
    missing = backend.insert() + 1000
    # When each call is made with it, Then none succeeds
    ledger = backend.ledger
    assert ledger.start(missing, kind=KIND, worker="w1", task_id=None) == StartRefused("missing")
    assert ledger.heartbeat(missing, 1) == Pulse(owned=False)
    assert ledger.finish(missing, 1, status="succeeded") is False
    assert ledger.schedule_retry(missing, 1, delay_s=0, error="boom") is False
    assert ledger.dispatch_of(missing) is None
    with pytest.raises(NotFound):
        ledger.cancel(missing)
    with pytest.raises(NotFound):
        ledger.get(missing)


def test_get_shows_every_column_with_times_as_text(backend: Backend) -> None:
    # Given a started record
    record_id = backend.insert()
    start(backend, record_id)
    # When it is read
    row = backend.ledger.get(record_id)
    # Then it has the columns of the executions table, times as ISO text with an offset
    assert list(row) == [column.key for column in Execution.__table__.columns]
    for name in ("created_at", "updated_at", "scheduled_for", "started_at", "heartbeat_at"):
        assert isinstance(row[name], str)
        at(row[name])


# -- heartbeats and fences -------------------------------------------------------------------


def test_heartbeat_is_owned_while_running_and_not_after_finish(backend: Backend) -> None:
    # Given a running record
    record_id = backend.insert()
    start(backend, record_id)
    started = backend.ledger.get(record_id)
    # When its attempt beats
    pulse = backend.ledger.heartbeat(record_id, 1)
    # Then it still owns the record, and the heartbeat moved forward
    assert pulse == Pulse(owned=True, cancel_requested=False)
    assert at(backend.ledger.get(record_id)["heartbeat_at"]) >= at(started["heartbeat_at"])
    # And an attempt that never started owns nothing
    assert backend.ledger.heartbeat(record_id, 2) == Pulse(owned=False)
    # And once finished, the attempt owns it no more
    assert backend.ledger.finish(record_id, 1, status="succeeded")
    assert backend.ledger.heartbeat(record_id, 1) == Pulse(owned=False)


def test_heartbeat_of_an_earlier_attempt_is_not_owned(backend: Backend) -> None:
    # Given a record retried into attempt 2
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.schedule_retry(record_id, 1, delay_s=0, error="boom")
    start(backend, record_id, worker="w2")
    # When both attempts beat, Then only the newer one owns the record
    assert backend.ledger.heartbeat(record_id, 1) == Pulse(owned=False)
    assert backend.ledger.heartbeat(record_id, 2) == Pulse(owned=True)


def test_finish_is_fenced_by_attempt(backend: Backend) -> None:
    # Given a record that attempt 2 is running
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.schedule_retry(record_id, 1, delay_s=0, error="boom")
    start(backend, record_id, worker="w2")
    before = backend.ledger.get(record_id)
    # When the stale attempt 1 writes an outcome
    written = backend.ledger.finish(record_id, 1, status="succeeded", result={"by": 1})
    # Then it is refused and the record is unchanged
    assert written is False
    assert backend.ledger.get(record_id) == before
    # And attempt 2's outcome lands, once
    assert backend.ledger.finish(record_id, 2, status="succeeded", result={"by": 2})
    after = backend.ledger.get(record_id)
    assert (after["status"], after["attempt"], after["result"]) == ("succeeded", 2, {"by": 2})
    assert at(after["finished_at"]) >= at(after["started_at"])
    assert backend.ledger.finish(record_id, 2, status="failed", error="late") is False
    assert backend.ledger.get(record_id) == after


# -- retries and history ---------------------------------------------------------------------


def test_a_retry_is_not_startable_before_its_time(backend: Backend) -> None:
    # Given a running record
    record_id = backend.insert()
    start(backend, record_id)
    # When its attempt is parked for a retry an hour away
    assert backend.ledger.schedule_retry(record_id, 1, delay_s=3600, error="boom")
    # Then it is retrying, due after its last heartbeat
    row = backend.ledger.get(record_id)
    assert (row["status"], row["error"]) == ("retrying", "boom")
    assert at(row["retry_at"]) > at(row["heartbeat_at"]) + timedelta(seconds=3000)
    # And an early delivery cannot start it
    refused = backend.ledger.start(record_id, kind=KIND, worker="w2", task_id=None)
    assert refused == StartRefused("not_startable", status="retrying", kind=KIND)
    assert backend.ledger.get(record_id) == row


def test_a_retry_due_now_starts_as_the_next_attempt(backend: Backend) -> None:
    # Given a record whose attempt 1 was parked for a retry due at once
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.schedule_retry(record_id, 1, delay_s=0, error="boom")
    # When the retry is delivered
    record = start(backend, record_id, worker="w2")
    # Then it runs as attempt 2, its retry time cleared
    assert record.attempt == 2
    row = backend.ledger.get(record_id)
    assert (row["status"], row["attempt"], row["worker"], row["retry_at"]) == (
        "running",
        2,
        "w2",
        None,
    )


def test_history_has_one_entry_per_attempt(backend: Backend) -> None:
    # Given a record that fails twice with retries and a third time for good
    record_id = backend.insert()
    for attempt in (1, 2):
        start(backend, record_id, worker=f"w{attempt}")
        assert backend.ledger.schedule_retry(record_id, attempt, delay_s=0, error=f"e{attempt}")
    start(backend, record_id, worker="w3")
    assert backend.ledger.finish(record_id, 3, status="failed", error="e3")
    # When the record is read
    row = backend.ledger.get(record_id)
    # Then its history holds each attempt, who ran it, how it ended, and why
    assert history(row) == [(1, "retrying", "w1"), (2, "retrying", "w2"), (3, "failed", "w3")]
    assert [e["error"] for e in row["attempts"]] == ["e1", "e2", "e3"]
    for entry in row["attempts"]:
        assert set(entry) == {"attempt", "status", "worker", "started_at", "ended_at", "error"}
        assert at(entry["started_at"]) <= at(entry["ended_at"])
    assert (row["status"], row["attempt"], row["error"]) == ("failed", 3, "e3")


def test_a_lost_attempt_requeued_starts_afresh(backend: Backend) -> None:
    # Given a running record whose worker is presumed dead
    record_id = backend.insert()
    start(backend, record_id)
    # When the sweeper requeues attempt 1 (and a wrong attempt, which it may not)
    assert backend.requeue(record_id, 2) is None
    dispatch = backend.requeue(record_id, 1)
    # Then the record is pending again, its history says so, and it starts as attempt 2
    assert dispatch == Dispatch(record_id, KIND, queue="reports", priority=7, timeout_s=120)
    row = backend.ledger.get(record_id)
    assert (row["status"], history(row)) == ("pending", [(1, "pending", "w1")])
    assert start(backend, record_id, worker="w2").attempt == 2
    assert backend.ledger.heartbeat(record_id, 1) == Pulse(owned=False)


# -- cancellation and routing ----------------------------------------------------------------


def test_cancel_of_a_pending_record_cancels_it_for_good(backend: Backend) -> None:
    # Given a pending record
    record_id = backend.insert()
    # When it is cancelled
    status = backend.ledger.cancel(record_id)
    # Then it is cancelled at once, and no delivery can start it
    assert status == "cancelled"
    row = backend.ledger.get(record_id)
    assert row["status"] == "cancelled"
    assert at(row["finished_at"]) >= at(row["created_at"])
    assert row["cancel_requested_at"] is not None
    refused = backend.ledger.start(record_id, kind=KIND, worker="w1", task_id=None)
    assert refused == StartRefused("not_startable", status="cancelled", kind=KIND)
    assert backend.ledger.cancel(record_id) == "cancelled"


def test_cancel_of_a_retrying_record_cancels_it(backend: Backend) -> None:
    # Given a record waiting for its retry
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.schedule_retry(record_id, 1, delay_s=0, error="boom")
    # When it is cancelled, Then it is cancelled and its retry cannot start
    assert backend.ledger.cancel(record_id) == "cancelled"
    assert backend.ledger.get(record_id)["status"] == "cancelled"
    refused = backend.ledger.start(record_id, kind=KIND, worker="w2", task_id=None)
    assert refused == StartRefused("not_startable", status="cancelled", kind=KIND)


def test_cancel_of_a_running_record_asks_its_attempt_to_stop(backend: Backend) -> None:
    # Given a running record
    record_id = backend.insert()
    start(backend, record_id)
    # When it is cancelled (twice)
    assert backend.ledger.cancel(record_id) == "running"
    requested = backend.ledger.get(record_id)
    assert backend.ledger.cancel(record_id) == "running"
    # Then it stays running, its heartbeat reports the request, and the first request stands
    assert requested["status"] == "running"
    assert requested["cancel_requested_at"] is not None
    assert backend.ledger.heartbeat(record_id, 1) == Pulse(owned=True, cancel_requested=True)
    assert backend.ledger.get(record_id)["cancel_requested_at"] == requested["cancel_requested_at"]
    # And it ends when its attempt records the cancellation
    assert backend.ledger.finish(record_id, 1, status="cancelled", error="aborted")
    assert backend.ledger.get(record_id)["status"] == "cancelled"
    assert backend.ledger.cancel(record_id) == "cancelled"


def test_cancel_of_a_finished_record_changes_nothing(backend: Backend) -> None:
    # Given a succeeded record
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.finish(record_id, 1, status="succeeded", result={"ok": True})
    before = backend.ledger.get(record_id)
    # When it is cancelled, Then its final status is returned and the record kept
    assert backend.ledger.cancel(record_id) == "succeeded"
    assert backend.ledger.get(record_id) == before


def test_dispatch_of_carries_kind_and_routing_from_the_definition(backend: Backend) -> None:
    # Given a record of an action routed to a queue, with a priority and a timeout
    record_id = backend.insert()
    # When its dispatch is read, Then it carries them
    expected = Dispatch(record_id, KIND, queue="reports", priority=7, timeout_s=120)
    assert backend.ledger.dispatch_of(record_id) == expected


def test_a_cancel_requested_record_requeued_by_the_sweeper_does_not_start(
    backend: Backend,
) -> None:
    # Given a running record whose cancel was requested, then whose worker died
    record_id = backend.insert()
    start(backend, record_id)
    assert backend.ledger.cancel(record_id) == "running"
    # When the sweeper requeues the lost attempt and its message is delivered
    backend.requeue(record_id, 1)
    started = backend.ledger.start(record_id, kind=KIND, worker="w2", task_id=None)
    # Then the cancelled work does not start again
    assert isinstance(started, StartRefused)


# -- the twin's own hooks (no SQL counterpart) -------------------------------------------------


def twin(clock: ManualClock) -> tuple[MemoryLedger, int]:
    ledger = MemoryLedger(clock=clock)
    return ledger, ledger.add(KIND, "trigger:1:k1", DEFINITION)


def test_twin_judges_retry_time_by_its_injected_clock() -> None:
    # Given a twin on a manual clock, and a record parked for a 60 s retry
    clock = ManualClock()
    ledger, record_id = twin(clock)
    assert isinstance(ledger.start(record_id, kind=KIND, worker="w1", task_id=None), Record)
    assert ledger.schedule_retry(record_id, 1, delay_s=60, error="boom")
    assert ledger.get(record_id)["retry_at"] == (clock.now + timedelta(seconds=60)).isoformat()
    # When the clock reaches one second (the allowed skew) short of the retry time
    clock.advance(58.5)
    early = ledger.start(record_id, kind=KIND, worker="w2", task_id=None)
    clock.advance(0.5)
    on_time = ledger.start(record_id, kind=KIND, worker="w2", task_id=None)
    # Then it starts only from there
    assert early == StartRefused("not_startable", status="retrying", kind=KIND)
    assert isinstance(on_time, Record)
    assert on_time.attempt == 2


def test_twin_fails_the_next_calls_before_writing() -> None:
    # Given a twin told that the database is down for the next two starts
    ledger, record_id = twin(ManualClock())
    ledger.fail_next("start", times=2)
    # When a worker tries twice, Then both tries raise and leave the record pending
    for _ in range(2):
        with pytest.raises(OperationalError):
            ledger.start(record_id, kind=KIND, worker="w1", task_id=None)
    assert (ledger.get(record_id)["status"], ledger.get(record_id)["attempt"]) == ("pending", 0)
    # And the third try starts attempt 1
    third = ledger.start(record_id, kind=KIND, worker="w1", task_id=None)
    assert isinstance(third, Record)
    assert third.attempt == 1


def test_twin_can_fail_a_call_after_its_write_landed() -> None:
    # Given a running record, and a connection that drops after the next finish commits
    ledger, record_id = twin(ManualClock())
    assert isinstance(ledger.start(record_id, kind=KIND, worker="w1", task_id=None), Record)
    ledger.fail_next("finish", after_write=True, exc_factory=lambda: ConnectionError("reset"))
    # When the attempt finishes
    with pytest.raises(ConnectionError):
        ledger.finish(record_id, 1, status="succeeded", result={"ok": True})
    # Then the outcome is recorded all the same
    assert ledger.get(record_id)["status"] == "succeeded"
    assert ledger.finish(record_id, 1, status="succeeded") is False


def test_twin_rejects_what_the_schema_rejects() -> None:
    # Given a twin
    ledger = MemoryLedger(clock=lambda: datetime(2030, 1, 1, tzinfo=UTC))
    # When a record of an unknown kind, or a fault on an unknown method, is asked for
    # Then it is refused
    with pytest.raises(ValueError, match="kind"):
        ledger.add("mine_bitcoin", "trigger:1:k1", DEFINITION)
    with pytest.raises(ValueError, match="no ledger method"):
        ledger.fail_next("drop_table")  # type: ignore[arg-type]
    record_id = ledger.add(KIND, "trigger:1:k1", DEFINITION)
    assert isinstance(ledger.start(record_id, kind=KIND, worker="w1", task_id=None), Record)
    with pytest.raises(ValueError, match="status"):
        ledger.finish(record_id, 1, status="done")
