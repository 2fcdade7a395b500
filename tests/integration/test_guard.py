"""The execution guard: the same run delivered many times at once executes once."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import redis

from gathering_tasks.db.repo import Claim, Repository, RunContext
from gathering_tasks.errors import PermanentFailure
from gathering_tasks.runs import ExecutionGuard, GuardConfig
from gathering_tasks.settings import Settings
from tests.factories import claimed_run


def make_guard(repo: Repository, settings: Settings, published: list[Claim]) -> ExecutionGuard:
    config = GuardConfig(
        key_prefix="test",
        lease_ttl_s=settings.run_lease_ttl_s,
        heartbeat_interval_s=0.2,
        max_result_bytes=settings.max_result_bytes,
    )
    return ExecutionGuard(
        repo,
        redis.Redis.from_url(settings.redis_url),
        config,
        publish_retry=lambda claim, _delay: published.append(claim),
    )


def test_twenty_concurrent_deliveries_execute_once(repo: Repository, settings: Settings):
    # Given one pending run
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings, [])
    executed: list[int] = []
    barrier = threading.Barrier(20)

    def executor(run: RunContext) -> dict[str, int]:
        executed.append(run.attempt)
        return {"ok": 1}

    outcomes: list[str] = []

    def deliver(i: int) -> None:
        barrier.wait()
        outcomes.append(guard.execute(run_id, executor, worker=f"w{i}", task_id=f"t{i}"))

    # When the same run is delivered 20 times at once
    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then it executed once, and the record shows one succeeded attempt
    assert executed == [1]
    assert Counter(outcomes) == Counter({"succeeded": 1, "skipped": 19})
    record = repo.get_run(run_id)
    assert (record["status"], record["attempt"], record["result"]) == ("succeeded", 1, {"ok": 1})
    # And a late redelivery after completion does nothing
    assert guard.execute(run_id, executor, worker="late", task_id="late") == "skipped"
    assert executed == [1]


def test_failure_is_retried_then_failed_never_success(repo: Repository, settings: Settings):
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=2, retry_backoff_s=0)
    published: list[Claim] = []
    guard = make_guard(repo, settings, published)

    def boom(_run: RunContext) -> None:
        raise RuntimeError("remote said no")

    assert guard.execute(run_id, boom, worker="w", task_id="1") == "retrying"
    assert repo.get_run(run_id)["status"] == "retrying"
    assert [c.run_id for c in published] == [run_id]
    assert guard.execute(run_id, boom, worker="w", task_id="2") == "failed"
    record = repo.get_run(run_id)
    assert record["status"] == "failed" and record["attempt"] == 2
    assert "remote said no" in record["error"]
    # every attempt is recorded
    history = [(a["attempt"], a["status"], a["worker"]) for a in record["attempts"]]
    assert history == [(1, "retrying", "w"), (2, "failed", "w")]


def test_permanent_failure_is_not_retried(repo: Repository, settings: Settings):
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=5)
    guard = make_guard(repo, settings, [])

    def refuse(_run: RunContext) -> None:
        raise PermanentFailure("config is wrong")

    assert guard.execute(run_id, refuse, worker="w", task_id="1") == "failed"
    assert repo.get_run(run_id)["attempt"] == 1


def test_zombie_attempt_cannot_overwrite_a_newer_one(repo: Repository, settings: Settings):
    # Given attempt 1 presumed lost and requeued, then attempt 2 running
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    now = datetime.now(UTC)
    first = repo.start_run(run_id, worker="old", task_id="1", now=now)
    assert first is not None
    later = now + timedelta(seconds=10)
    assert repo.requeue_lost(run_id, first.attempt, now=later, error="lost", stale_before=later)
    second = repo.start_run(run_id, worker="new", task_id="2", now=now)
    assert second is not None and second.attempt == 2
    # When the old worker comes back and reports, it is fenced out
    assert not repo.finish_run(run_id, 1, status="succeeded", now=now)
    assert repo.finish_run(run_id, 2, status="succeeded", now=now)
    assert repo.get_run(run_id)["worker"] == "new"


def test_an_early_copy_of_a_retry_waits_out_the_backoff(repo: Repository, settings: Settings):
    # Given a run parked as retrying for 60 s
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=3)
    now = datetime.now(UTC)
    first = repo.start_run(run_id, worker="w", task_id="1", now=now)
    assert first is not None
    retry_at = now + timedelta(seconds=60)
    assert repo.schedule_retry(run_id, 1, retry_at=retry_at, error="503", now=now)
    # When a stale copy of the message arrives now, it does not start the run
    assert repo.start_run(run_id, worker="w", task_id="2", now=now) is None
    # And the real retry, at its time, does
    again = repo.start_run(run_id, worker="w", task_id="3", now=retry_at)
    assert again is not None and again.attempt == 2


def test_results_any_database_refuses_are_made_storable(repo: Repository, settings: Settings):
    # Given a handler returning NaN, infinity and a NUL character (JSONB refuses all three)
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings, [])

    def odd(_run: RunContext) -> dict[str, object]:
        return {"ratio": float("nan"), "peak": float("inf"), "body": "bin\x00ary"}

    # When it runs, the run still finishes, with a storable result
    assert guard.execute(run_id, odd, worker="w", task_id="1") == "succeeded"
    record = repo.get_run(run_id)
    assert record["status"] == "succeeded"
    assert record["result"] == {"ratio": None, "peak": None, "body": "binary"}
