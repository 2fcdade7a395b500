"""The execution guard under interleavings, over the in-memory ledger and lease twins.

No services and no sleeps: the "other party" (a sweeper, an operator, another worker, a
database that goes away) acts from inside the executor, at a chosen point of the work, and
the executor then waits, with a deadline, for the guard's keepers to notice. The keepers beat
every 10 ms, so each test takes milliseconds (the outcome-retry ones a few tenths).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest

from gathering_tasks.db.ledger import Dispatch, Pulse, Record
from gathering_tasks.db.memory import MemoryLedger
from gathering_tasks.errors import ExecutionAborted
from gathering_tasks.guard import ExecutionGuard, Executor, GuardConfig, Outcome
from tests.twins import Journal, JournaledLedger, ManualClock, MemoryLeases, spin_until

KIND = "run_task"


def definition(**overrides: Any) -> dict[str, Any]:
    """A record's snapshot, shaped like ``claims.definition_of`` makes it."""
    return {
        "name": "nightly-report",
        "config": {"task": "demo.add", "args": [1, 2]},
        "retry_max_attempts": 3,
        "retry_backoff_s": 0.0,
        "retry_backoff_max_s": 0.0,
        "timeout_s": None,
        "queue": "reports",
        "priority": 5,
        **overrides,
    }


@dataclass
class World:
    """One guard over the twins, and everything it did, in order."""

    clock: ManualClock
    ledger: MemoryLedger
    leases: MemoryLeases
    journal: Journal
    guard: ExecutionGuard
    published: list[tuple[Dispatch, float]] = field(default_factory=list)
    _keys: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, **overrides: Any) -> int:
        return self.ledger.add(KIND, f"trigger:1:{next(self._keys)}", definition(**overrides))

    def execute(
        self, record_id: int, executor: Executor, *, kind: str = KIND, worker: str = "w1"
    ) -> Outcome:
        return self.guard.execute(record_id, kind, executor, worker=worker, task_id=f"{worker}-t")

    def take_over(self, record_id: int, attempt: int) -> None:
        """The sweeper presumes ``attempt``'s worker dead and another worker starts the record,
        in one step (no heartbeat of the old attempt lands in between)."""
        with self.ledger.atomically() as ledger:
            stale_before = self.clock() + timedelta(seconds=1)
            assert ledger.requeue_lost(record_id, attempt, error="lost", stale_before=stale_before)
            started = ledger.start(record_id, kind=KIND, worker="w2", task_id="w2-t")
            assert isinstance(started, Record)


@pytest.fixture
def world() -> World:
    clock = ManualClock()
    ledger = MemoryLedger(clock=clock)
    journal = Journal()
    leases = MemoryLeases(journal)
    published: list[tuple[Dispatch, float]] = []

    def publish_retry(dispatch: Dispatch, delay_s: float) -> None:
        journal.add("publish")
        published.append((dispatch, delay_s))

    config = GuardConfig(
        lease_ttl_s=1.0, heartbeat_interval_s=0.01, max_result_bytes=4096, outcome_retry_s=10.0
    )
    guard = ExecutionGuard(
        JournaledLedger(ledger, journal), leases.lease_for, config, publish_retry=publish_retry
    )
    return World(clock, ledger, leases, journal, guard, published)


def statuses(record: Mapping[str, Any]) -> list[tuple[int, str]]:
    return [(entry["attempt"], entry["status"]) for entry in record["attempts"] or []]


# -- a record taken over, a lease lost, a cancellation -------------------------------------


def test_record_taken_over_mid_work_aborts_the_executor_and_attempt_1_writes_nothing(
    world: World,
) -> None:
    # Given a pending record whose worker, mid-work, is presumed dead by the sweeper, and
    # the record is started again by another worker (attempt 2)
    record_id = world.add()
    abort_events: list[threading.Event] = []

    def executor(record: Record, abort: threading.Event) -> dict[str, Any]:
        abort_events.append(abort)
        world.take_over(record.id, record.attempt)
        spin_until(abort.is_set)
        return {"written_by": "attempt 1"}

    # When attempt 1 executes
    outcome = world.execute(record_id, executor)

    # Then its heartbeat found the record gone and aborted the work
    assert outcome == "superseded"
    assert abort_events[0].is_set()
    # And attempt 1 wrote no outcome: the record is attempt 2's, running, without a result
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"], record["worker"]) == ("running", 2, "w2")
    assert record["result"] is None
    assert statuses(record) == [(1, "pending")]  # the sweeper's requeue, nothing else
    assert world.journal.matching("ledger.finish") == []
    assert world.journal.matching("ledger.schedule_retry") == []


def test_lease_lost_mid_work_is_never_retaken_and_the_record_still_fences_the_run(
    world: World,
) -> None:
    # Given a record whose lease renewals answer: Redis silent, held, then lost
    record_id = world.add()
    world.leases.script(record_id, "unknown", "held", "lost")

    def executor(_record: Record, _abort: threading.Event) -> dict[str, Any]:
        return {"lease_lost_seen": world.leases.lost_seen.wait(timeout=5)}

    # When the run executes through the lost lease
    outcome = world.execute(record_id, executor)

    # Then the run still succeeds: the record, not the lease, fences the attempt
    assert outcome == "succeeded"
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"]) == ("succeeded", 1)
    assert record["result"] == {"lease_lost_seen": True}
    # And the lease was taken once, and not renewed (nor re-taken) once it was lost
    assert world.leases.acquire_calls == 1
    assert world.journal.matching("lease.renew") == [
        "lease.renew:unknown",
        "lease.renew:held",
        "lease.renew:lost",
    ]


def test_lease_taken_by_another_worker_mid_work_is_left_to_that_worker(world: World) -> None:
    # Given a record whose lease another worker takes while the run works
    record_id = world.add()

    def executor(record: Record, _abort: threading.Event) -> dict[str, Any]:
        world.leases.hold(record.id, owner="w2")
        return {"lease_lost_seen": world.leases.lost_seen.wait(timeout=5)}

    # When the run finishes
    outcome = world.execute(record_id, executor)

    # Then it is recorded (its attempt still owns the record), the guard never re-took the
    # lease, and its release left the other worker's lease alone
    assert outcome == "succeeded"
    assert world.ledger.get(record_id)["result"] == {"lease_lost_seen": True}
    assert world.leases.acquire_calls == 1
    assert world.journal.count("lease.release:not-owner") == 1
    assert world.leases.owner(record_id) == "w2"


def test_cancellation_requested_mid_work_aborts_the_executor_and_records_cancelled(
    world: World,
) -> None:
    # Given a running record that an operator cancels while it works
    record_id = world.add()
    abort_events: list[threading.Event] = []

    def executor(record: Record, abort: threading.Event) -> None:
        abort_events.append(abort)
        world.ledger.cancel(record.id)
        spin_until(abort.is_set)

    # When the run executes
    outcome = world.execute(record_id, executor)

    # Then the heartbeat saw the request and aborted the work, and the record says cancelled
    assert outcome == "cancelled"
    assert abort_events[0].is_set()
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"]) == ("cancelled", 1)
    assert record["cancel_requested_at"] is not None
    assert statuses(record) == [(1, "cancelled")]
    assert world.journal.matching("ledger.schedule_retry") == []


# -- writing the outcome, publishing the retry -----------------------------------------------


def test_outcome_write_is_retried_under_a_renewed_lease_until_the_database_answers(
    world: World,
) -> None:
    # Given a record, and a database that refuses the outcome write twice
    record_id = world.add()
    world.ledger.fail_next("finish", times=2)

    # When the run succeeds
    outcome = world.execute(record_id, lambda _record, _abort: {"n": 1})

    # Then the third write lands: the record succeeded at attempt 1
    assert outcome == "succeeded"
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"], record["result"]) == ("succeeded", 1, {"n": 1})
    assert statuses(record) == [(1, "succeeded")]
    # And between the failed writes and the one that landed the lease was only renewed,
    # and it was released once, after the write
    events = world.journal.events
    writes = [i for i, event in enumerate(events) if event.startswith("ledger.finish")]
    assert [events[i] for i in writes] == [
        "ledger.finish:raised",
        "ledger.finish:raised",
        "ledger.finish",
    ]
    lease_events = [e for e in events[writes[0] : writes[-1]] if e.startswith("lease.")]
    assert lease_events
    assert set(lease_events) == {"lease.renew:held"}
    assert world.journal.count("lease.release") == 1
    assert world.journal.first("lease.release") > writes[-1]


def test_failed_run_schedules_a_retry_and_publishes_it_after_releasing_the_lease(
    world: World,
) -> None:
    # Given a record with attempts left and no backoff, and an executor that fails
    record_id = world.add(retry_max_attempts=3, retry_backoff_s=0.0)

    def failing(_record: Record, _abort: threading.Event) -> None:
        raise RuntimeError("remote said no")

    # When the run executes
    outcome = world.execute(record_id, failing)

    # Then the record waits for its retry, due at once
    assert outcome == "retrying"
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"]) == ("retrying", 1)
    assert "remote said no" in record["error"]
    assert record["retry_at"] == world.clock().isoformat()
    # And the retry was published with the record's routing, after the lease was released
    ((dispatch, delay_s),) = world.published
    assert delay_s == 0.0
    assert (dispatch.record_id, dispatch.kind, dispatch.queue, dispatch.priority) == (
        record_id,
        KIND,
        "reports",
        5,
    )
    assert dispatch.timeout_s is None
    # labelled for Flower with the attempt it will start
    assert dispatch.attempt == 2
    events = world.journal.events
    assert events.index("ledger.schedule_retry") < events.index("lease.release")
    assert events.index("lease.release") < events.index("publish")
    # And the retry's delivery finds the lease free and runs attempt 2
    assert world.execute(record_id, lambda record, _abort: {"attempt": record.attempt}) == (
        "succeeded"
    )
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"], record["result"]) == (
        "succeeded",
        2,
        {"attempt": 2},
    )
    assert statuses(record) == [(1, "retrying"), (2, "succeeded")]


# -- deliveries that must not run ------------------------------------------------------------


def test_delivery_of_another_kind_is_dropped_and_the_record_left_untouched(world: World) -> None:
    # Given a pending run_task record
    record_id = world.add()
    calls: list[Record] = []

    # When a call_api delivery carries its id
    outcome = world.execute(record_id, lambda record, _abort: calls.append(record), kind="call_api")

    # Then the delivery is dropped without executing, and the record is as it was
    assert outcome == "dropped"
    assert calls == []
    record = world.ledger.get(record_id)
    assert (record["status"], record["attempt"], record["worker"]) == ("pending", 0, None)
    assert world.journal.events == ["lease.acquire", "ledger.start", "lease.release"]


def test_delivery_finding_the_lease_held_is_dropped_before_touching_the_record(
    world: World,
) -> None:
    # Given a pending record whose lease another worker holds
    record_id = world.add()
    world.leases.hold(record_id, owner="w2")
    calls: list[Record] = []

    # When a delivery arrives
    outcome = world.execute(record_id, lambda record, _abort: calls.append(record))

    # Then it is dropped: the record was never started, the lease is still the other's
    assert outcome == "dropped"
    assert calls == []
    assert world.journal.events == ["lease.acquire:refused"]
    assert world.ledger.get(record_id)["status"] == "pending"
    assert world.leases.owner(record_id) == "w2"


# -- interleavings that broke an earlier version of the core -------------------------------


def test_cancelled_run_whose_executor_wraps_the_abort_still_ends_cancelled(
    world: World,
) -> None:
    # Given a run that is cancelled mid-work, and an executor that, like any code with a
    # broad ``except Exception``, turns the guard's ExecutionAborted into its own error
    record_id = world.add(retry_max_attempts=3)

    def executor(record: Record, _abort: threading.Event) -> None:
        try:
            world.ledger.cancel(record.id)
            spin_until(lambda: False)  # until the guard's abort lands
        except ExecutionAborted as exc:
            raise RuntimeError("upstream call interrupted") from exc

    # When the run executes
    outcome = world.execute(record_id, executor)

    # Then the cancellation wins: the record is cancelled, not parked for a retry
    assert world.ledger.get(record_id)["status"] == "cancelled"
    assert outcome == "cancelled"
    assert world.published == []


def test_outcome_write_that_landed_but_whose_reply_was_lost_is_still_reported(
    world: World,
) -> None:
    # Given a database that commits the outcome write, then drops the connection
    record_id = world.add()
    world.ledger.fail_next("finish", after_write=True)

    # When the run succeeds
    outcome = world.execute(record_id, lambda _record, _abort: {"n": 1})

    # Then the record succeeded, and the guard says so
    assert world.ledger.get(record_id)["status"] == "succeeded"
    assert outcome == "succeeded"


def test_retry_whose_write_landed_but_whose_reply_was_lost_is_still_published(
    world: World,
) -> None:
    # Given a failing run with attempts left, and a database that commits the retry
    # write, then drops the connection
    record_id = world.add(retry_max_attempts=3)
    world.ledger.fail_next("schedule_retry", after_write=True)

    def failing(_record: Record, _abort: threading.Event) -> None:
        raise RuntimeError("remote said no")

    # When the run executes
    outcome = world.execute(record_id, failing)

    # Then the record is retrying, and its retry message went out
    assert world.ledger.get(record_id)["status"] == "retrying"
    assert outcome == "retrying"
    assert [dispatch.record_id for dispatch, _delay in world.published] == [record_id]


def test_database_error_while_publishing_a_recorded_retry_is_not_raised(world: World) -> None:
    # Given a failing run with attempts left, and a database that goes away right after
    # the retry is recorded
    record_id = world.add(retry_max_attempts=3)
    world.ledger.fail_next("dispatch_of")

    def failing(_record: Record, _abort: threading.Event) -> None:
        raise RuntimeError("remote said no")

    # When the run executes
    outcome = world.execute(record_id, failing)

    # Then the delivery reports the retry the record holds (the sweeper re-publishes it)
    assert outcome == "retrying"
    assert world.ledger.get(record_id)["status"] == "retrying"


def test_cancelled_run_requeued_by_the_sweeper_is_not_executed_again(world: World) -> None:
    # Given a run cancelled while running on a worker that then died, and the sweeper
    # recovering the lost attempt: it ends cancelled, with nothing to re-publish
    record_id = world.add()
    started = world.ledger.start(record_id, kind=KIND, worker="w1", task_id="w1-t")
    assert isinstance(started, Record)
    assert world.ledger.cancel(record_id) == "running"
    stale_before = world.clock() + timedelta(seconds=1)
    assert world.ledger.requeue_lost(record_id, 1, error="lost", stale_before=stale_before) is None
    assert world.ledger.get(record_id)["status"] == "cancelled"
    calls: list[int] = []

    def executor(record: Record, abort: threading.Event) -> None:
        calls.append(record.attempt)
        spin_until(abort.is_set)

    # When the requeued record's message is delivered
    outcome = world.execute(record_id, executor, worker="w2")

    # Then the cancelled work is not started again
    assert calls == []
    assert outcome == "dropped"


class HeldHeartbeat(JournaledLedger):
    """Once armed, a heartbeat is held (a call stuck in a stalled database) until the
    outcome has been written, and only then reaches the ledger."""

    def __init__(self, ledger: MemoryLedger, journal: Journal) -> None:
        super().__init__(ledger, journal)
        self.armed, self.held, self.written = (threading.Event() for _ in range(3))

    def heartbeat(self, record_id: int, attempt: int) -> Pulse:
        if self.armed.is_set():
            self.held.set()
            self.written.wait(10)
        return super().heartbeat(record_id, attempt)

    def finish(self, record_id: int, attempt: int, **kwargs: Any) -> bool:
        written = super().finish(record_id, attempt, **kwargs)
        self.written.set()
        return written


def test_a_heartbeat_that_lands_after_the_outcome_does_not_call_the_run_taken_over(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker whose heartbeat call is stuck when the work ends, and returns only
    # after the outcome was written (so it finds the attempt no longer running)
    ledger = HeldHeartbeat(world.ledger, world.journal)
    config = GuardConfig(lease_ttl_s=1.0, heartbeat_interval_s=0.01, max_result_bytes=4096)
    guard = ExecutionGuard(
        ledger, world.leases.lease_for, config, publish_retry=lambda _d, _s: None
    )
    record_id = world.add()

    def executor(_record: Record, _abort: threading.Event) -> dict[str, Any]:
        ledger.armed.set()
        spin_until(ledger.held.is_set)
        return {"ok": 1}

    # When the run ends
    with caplog.at_level("DEBUG", logger="gathering_tasks.guard"):
        outcome = guard.execute(record_id, KIND, executor, worker="w1", task_id="t")

    # Then it succeeded, and nothing says it was taken over or aborted
    assert outcome == "succeeded"
    assert world.ledger.get(record_id)["status"] == "succeeded"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert not [w for w in warnings if "taken over" in w or "aborting" in w], warnings


# -- a batch held up by a slow record --------------------------------------------------------


def run_batch(world: World, record_ids: list[int], executor: Executor) -> list[str]:
    reports, _kept = world.guard.run_many(record_ids, KIND, executor, worker="w1", task_id="t")
    return [report.status for report in reports]


def test_records_waiting_behind_a_slow_one_in_a_batch_go_back_unstarted_and_are_published(
    world: World,
) -> None:
    # Given a batch of three records whose first one works until the others are published
    record_ids = [world.add() for _ in range(3)]
    began: list[int] = []

    def executor(record: Record, _abort: threading.Event) -> dict[str, Any]:
        began.append(record.id)
        assert spin_until(lambda: len(world.published) == 2)
        return {"n": record.id}

    # When the batch runs
    statuses_ = run_batch(world, record_ids, executor)

    # Then the first succeeded here, and the two behind it were handed back while it ran:
    # pending at attempt 0, with no history, their leases released, one message each
    assert statuses_ == ["succeeded", "dropped", "dropped"]
    assert began == record_ids[:1]
    assert sorted(d.record_id for d, _delay in world.published) == record_ids[1:]
    for record_id in record_ids[1:]:
        record = world.ledger.get(record_id)
        assert (record["status"], record["attempt"], record["worker"]) == ("pending", 0, None)
        assert statuses(record) == []
    assert world.journal.count("lease.release") == 3
    # and another worker starts them as their first attempt
    assert world.execute(record_ids[1], executor, worker="w2") == "succeeded"
    assert world.ledger.get(record_ids[1])["attempt"] == 1


def test_a_batch_whose_hand_back_cannot_be_written_runs_its_records_in_turn(
    world: World,
) -> None:
    # Given a batch of three whose first record is slow, and a database that refuses to
    # take the waiting ones back
    record_ids = [world.add() for _ in range(3)]
    world.ledger.fail_next("hand_back", times=1000)
    began: list[int] = []

    def executor(record: Record, _abort: threading.Event) -> dict[str, Any]:
        began.append(record.id)
        assert spin_until(lambda: world.journal.count("ledger.hand_back:raised") >= 1)
        return {"n": record.id}

    # When the batch runs
    statuses_ = run_batch(world, record_ids, executor)

    # Then all three ran here, in turn, each once, and nothing was published
    assert statuses_ == ["succeeded"] * 3
    assert began == record_ids
    assert world.published == []
    for record_id in record_ids:
        record = world.ledger.get(record_id)
        assert (record["status"], record["attempt"], record["worker"]) == ("succeeded", 1, "w1")


def test_a_record_cancelled_while_it_waits_is_not_handed_back_and_the_hand_back_is_not_retried(
    world: World,
) -> None:
    # Given a batch of two whose first record is slow, and the second one's cancellation
    # asked for while the first works
    record_ids = [world.add() for _ in range(2)]
    began: list[int] = []

    def heartbeats_since_hand_back() -> int:
        events = world.journal.events
        if "ledger.hand_back" not in events:
            return 0
        return events[events.index("ledger.hand_back") :].count("ledger.heartbeat")

    def executor(record: Record, _abort: threading.Event) -> dict[str, Any]:
        began.append(record.id)
        if len(began) == 1:
            world.ledger.cancel(record_ids[1])
            # long enough after the hand-back for its watch to have come round again
            assert spin_until(lambda: heartbeats_since_hand_back() >= 30)
        return {"n": record.id}

    # When the batch runs
    statuses_ = run_batch(world, record_ids, executor)

    # Then the cancelled one stayed, and ended cancelled before it began; the hand-back was
    # tried once
    assert statuses_ == ["succeeded", "cancelled"]
    assert began == record_ids[:1]
    assert world.journal.count("ledger.hand_back") == 1
    record = world.ledger.get(record_ids[1])
    assert (record["status"], record["error"]) == ("cancelled", "run cancelled before it began")
