"""The execution guard against real Redis and both databases (PostgreSQL cut through a proxy).

Each test drives one interleaving a fleet meets: many deliveries at once, a delivery under the
wrong task name, a lease that lapsed, a record taken over, a database that stalls or restarts
while a run holds its record, a retry with no backoff.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy.engine import make_url

from gathering_tasks import keys
from gathering_tasks.db.engine import DbTimeouts, session_factory
from gathering_tasks.db.ledger import Dispatch, Record
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import PermanentFailure
from gathering_tasks.settings import Settings
from gathering_tasks.sweeper import Sweeper
from tests.factories import claimed_run, make_guard
from tests.proxy import TcpProxy
from tests.servers import PostgresServer, wait_for

Abort = threading.Event


def lease_key(settings: Settings, record_id: int) -> str:
    return keys.run_lock(settings.key_prefix, record_id)


def test_twenty_concurrent_deliveries_execute_once(repo: Repository, settings: Settings):
    # Given one pending run
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings)
    executed: list[int] = []
    barrier = threading.Barrier(20)

    def executor(record: Record, _abort: Abort) -> dict[str, int]:
        executed.append(record.attempt)
        return {"ok": 1}

    outcomes: list[str] = []

    def deliver(i: int) -> None:
        barrier.wait()
        outcomes.append(
            guard.execute(run_id, "run_task", executor, worker=f"w{i}", task_id=f"t{i}")
        )

    # When the same run is delivered 20 times at once
    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then it executed once, and the record shows one succeeded attempt
    assert executed == [1]
    assert Counter(outcomes) == Counter({"succeeded": 1, "dropped": 19})
    record = repo.ledger.get(run_id)
    assert (record["status"], record["attempt"], record["result"]) == ("succeeded", 1, {"ok": 1})
    # And a late redelivery after completion does nothing
    assert guard.execute(run_id, "run_task", executor, worker="late", task_id="late") == "dropped"
    assert executed == [1]


def test_a_delivery_under_another_kind_is_dropped_without_touching_the_run(
    repo: Repository, settings: Settings, caplog: pytest.LogCaptureFixture
):
    # Given a pending run_task run
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings)
    called: list[int] = []

    def executor(record: Record, _abort: Abort) -> None:
        called.append(record.id)

    # When a gathering.call_api message carries its id
    with caplog.at_level(logging.WARNING, logger="gathering_tasks.guard"):
        outcome = guard.execute(run_id, "call_api", executor, worker="w", task_id="wrong")
    # Then the delivery is dropped and logged, the run is untouched
    assert outcome == "dropped" and called == []
    assert "carries a run_task run" in caplog.text
    record = repo.ledger.get(run_id)
    assert (record["status"], record["attempt"], record["error"]) == ("pending", 0, None)
    # And the right message still runs it
    assert guard.execute(run_id, "run_task", executor, worker="w", task_id="right") == "succeeded"
    assert called == [run_id]


def test_failure_is_retried_then_failed_never_success(repo: Repository, settings: Settings):
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=2, retry_backoff_s=0)
    published: list[tuple[Dispatch, float]] = []
    guard = make_guard(repo, settings, published)

    def boom(_record: Record, _abort: Abort) -> None:
        raise RuntimeError("remote said no")

    assert guard.execute(run_id, "run_task", boom, worker="w", task_id="1") == "retrying"
    assert repo.ledger.get(run_id)["status"] == "retrying"
    assert [(d.record_id, d.kind) for d, _delay in published] == [(run_id, "run_task")]
    assert guard.execute(run_id, "run_task", boom, worker="w", task_id="2") == "failed"
    record = repo.ledger.get(run_id)
    assert record["status"] == "failed" and record["attempt"] == 2
    assert "remote said no" in record["error"]
    # every attempt is recorded
    history = [(a["attempt"], a["status"], a["worker"]) for a in record["attempts"]]
    assert history == [(1, "retrying", "w"), (2, "failed", "w")]


def test_a_zero_backoff_retry_is_published_after_the_lease_is_free(
    repo: Repository, settings: Settings
):
    # Given a run that fails once, with no backoff
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=2, retry_backoff_s=0)
    client = redis.Redis.from_url(settings.redis_url)
    lease_held_at_publish: list[bool] = []

    def check_lease(_dispatch: Dispatch, _delay_s: float) -> None:
        lease_held_at_publish.append(bool(client.exists(lease_key(settings, run_id))))

    guard = make_guard(repo, settings, on_publish=check_lease)

    def boom(_record: Record, _abort: Abort) -> None:
        raise RuntimeError("flaky")

    # When the failing attempt publishes its retry
    assert guard.execute(run_id, "run_task", boom, worker="w", task_id="1") == "retrying"
    # Then the lease was already free, so the retry's delivery can take it at once
    assert lease_held_at_publish == [False]
    ok = guard.execute(run_id, "run_task", lambda _r, _a: {"ok": 1}, worker="w", task_id="2")
    assert ok == "succeeded"


def test_permanent_failure_is_not_retried(repo: Repository, settings: Settings):
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=5)
    guard = make_guard(repo, settings)

    def refuse(_record: Record, _abort: Abort) -> None:
        raise PermanentFailure("config is wrong")

    assert guard.execute(run_id, "run_task", refuse, worker="w", task_id="1") == "failed"
    assert repo.ledger.get(run_id)["attempt"] == 1


def test_zombie_attempt_cannot_overwrite_a_newer_one(repo: Repository, settings: Settings):
    # Given attempt 1 presumed lost and requeued, then attempt 2 running
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    first = repo.ledger.start(run_id, kind="run_task", worker="old", task_id="1")
    assert isinstance(first, Record)
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert repo.sweeps.requeue_lost(run_id, first.attempt, error="lost", stale_before=later)
    second = repo.ledger.start(run_id, kind="run_task", worker="new", task_id="2")
    assert isinstance(second, Record) and second.attempt == 2
    # When the old worker comes back and reports, it is fenced out
    assert not repo.ledger.heartbeat(run_id, 1).owned
    assert not repo.ledger.finish(run_id, 1, status="succeeded")
    assert repo.ledger.finish(run_id, 2, status="succeeded")
    assert repo.ledger.get(run_id)["worker"] == "new"


def test_a_run_taken_over_mid_work_is_aborted_and_reports_nothing(
    repo: Repository, settings: Settings
):
    # Given a run whose worker is inside its work
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings, heartbeat_interval_s=0.05)
    events: list[Abort] = []
    reached_end: list[bool] = []

    def slow(record: Record, abort: Abort) -> dict[str, int]:
        events.append(abort)
        # When the sweeper gives the record to a second attempt meanwhile (a stall it
        # misjudged), and that attempt finishes
        later = datetime.now(UTC) + timedelta(seconds=60)
        assert repo.sweeps.requeue_lost(record.id, record.attempt, error="x", stale_before=later)
        other = repo.ledger.start(record.id, kind="run_task", worker="other", task_id="o")
        assert isinstance(other, Record)
        assert repo.ledger.finish(record.id, other.attempt, status="succeeded", result={"by": 2})
        # (the work waits; an abort interrupts it)
        abort.wait(timeout=30)
        reached_end.append(True)
        return {"by": 1}

    outcome = guard.execute(run_id, "run_task", slow, worker="first", task_id="1")
    # Then the first worker's heartbeat saw it, the work was stopped before its end, and
    # its outcome was not written: the record is the second attempt's
    assert events[0].is_set() and reached_end == []
    assert outcome == "superseded"
    record = repo.ledger.get(run_id)
    assert (record["status"], record["attempt"], record["result"]) == ("succeeded", 2, {"by": 2})


def test_a_lost_lease_is_never_taken_again(
    repo: Repository, settings: Settings, caplog: pytest.LogCaptureFixture
):
    # Given a run inside its work
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings, heartbeat_interval_s=0.05)
    client = redis.Redis.from_url(settings.redis_url)
    key = lease_key(settings, run_id)
    reappeared: list[bool] = []

    def work(_record: Record, _abort: Abort) -> dict[str, int]:
        # When its lease vanishes (it expired while the worker was stopped)
        assert client.delete(key) == 1
        wait_for(lambda: "run lease lost" in caplog.text, 10, "the lease keeper to notice")
        # Then, while the work goes on, the worker does not take the lease again
        for _ in range(10):
            reappeared.append(bool(client.exists(key)))
            wait_for(lambda: True, 1, "a poll")
        return {"ok": 1}

    with caplog.at_level(logging.WARNING, logger="gathering_tasks.guard"):
        outcome = guard.execute(run_id, "run_task", work, worker="w", task_id="1")
    assert reappeared == [False] * 10
    # And the record alone still fences the attempt: it succeeds
    assert outcome == "succeeded"
    assert repo.ledger.get(run_id)["attempt"] == 1


def test_a_live_lease_keeps_a_run_whose_heartbeat_looks_stale(
    repo: Repository, settings: Settings, celery_app
):
    # Given a run inside its work, holding its lease
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings)
    client = redis.Redis.from_url(settings.redis_url)
    sent: list[int] = []
    sweeper = Sweeper(
        settings,
        repo.sweeps,
        lease_alive=lambda rid: bool(client.exists(lease_key(settings, rid))),
        publish=lambda ds: sent.append(len(ds)) or len(ds),
    )

    def work(record: Record, _abort: Abort) -> dict[str, int]:
        # When the sweeper judges its heartbeat stale (a minute from now, as after a
        # database stall), while the worker's lease is alive
        sweeper.sweep(repo.sweeps.read_now() + timedelta(seconds=60))
        now = repo.ledger.get(record.id)
        return {"status_seen": 1 if now["status"] == "running" else 0, "attempt": now["attempt"]}

    outcome = guard.execute(run_id, "run_task", work, worker="w", task_id="1")
    # Then the sweeper left it alone (the lease is what says the worker lives) and it
    # finished as its one attempt
    assert sent == []
    assert outcome == "succeeded"
    record = repo.ledger.get(run_id)
    assert record["result"] == {"status_seen": 1, "attempt": 1}
    assert [a["attempt"] for a in record["attempts"]] == [1]


def test_an_early_copy_of_a_retry_waits_out_the_backoff(repo: Repository, settings: Settings):
    # Given a run parked as retrying for an hour
    run_id = claimed_run(repo, settings, datetime.now(UTC), retry_max_attempts=3)
    first = repo.ledger.start(run_id, kind="run_task", worker="w", task_id="1")
    assert isinstance(first, Record)
    assert repo.ledger.schedule_retry(run_id, 1, delay_s=3600, error="503")
    # When a stale copy of the message arrives now, it does not start the run
    refused = repo.ledger.start(run_id, kind="run_task", worker="w", task_id="2")
    assert not isinstance(refused, Record) and refused.status == "retrying"


def test_results_any_database_refuses_are_made_storable(repo: Repository, settings: Settings):
    # Given a handler returning NaN, infinity and a NUL character (JSONB refuses all three)
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    guard = make_guard(repo, settings)

    def odd(_record: Record, _abort: Abort) -> dict[str, object]:
        return {"ratio": float("nan"), "peak": float("inf"), "body": "bin\x00ary"}

    # When it runs, the run still finishes, with a storable result
    assert guard.execute(run_id, "run_task", odd, worker="w", task_id="1") == "succeeded"
    record = repo.ledger.get(run_id)
    assert record["status"] == "succeeded"
    assert record["result"] == {"ratio": None, "peak": None, "body": "binary"}


# -- a worker whose PostgreSQL link is cut or stalled (a TCP proxy between them) ---------------


@pytest.fixture
def pg_settings(postgres_server: PostgresServer, pg_template: str, redis_url: str):
    """Settings of a fresh PostgreSQL database (these tests need no SQLite twin)."""
    name = postgres_server.create_database(template=pg_template)
    try:
        yield Settings(
            database_url=postgres_server.dsn(name),
            redis_url=redis_url,
            run_lease_ttl_s=3,
            pending_grace_s=2,
        )
    finally:
        session_factory(postgres_server.dsn(name)).kw["bind"].dispose()
        postgres_server.drop_database(name)


@pytest.fixture
def proxied(
    postgres_server: PostgresServer, pg_settings: Settings
) -> Iterator[tuple[Repository, Repository, TcpProxy]]:
    """The same PostgreSQL database seen directly and through a proxy that tests can cut."""
    direct_url = pg_settings.database_url
    with TcpProxy(postgres_server.port) as proxy:
        via_proxy = make_url(direct_url).set(port=proxy.port).render_as_string(hide_password=False)
        timeouts = DbTimeouts(connect_s=1, statement_s=1.0, lock_s=0.5)
        worker_repo = Repository(session_factory(via_proxy, timeouts))
        try:
            yield Repository(session_factory(direct_url)), worker_repo, proxy
        finally:
            proxy.resume()
            worker_repo.factory.kw["bind"].dispose()


@pytest.mark.postgres
def test_an_outcome_is_written_after_the_database_comes_back(
    proxied: tuple[Repository, Repository, TcpProxy],
    pg_settings: Settings,
    caplog: pytest.LogCaptureFixture,
):
    settings = pg_settings
    # Given a worker running a run, its database link then cut (a PostgreSQL restart)
    direct, worker_repo, proxy = proxied
    run_id = claimed_run(direct, settings, datetime.now(UTC))
    guard = make_guard(worker_repo, settings, heartbeat_interval_s=0.1)
    client = redis.Redis.from_url(settings.redis_url)
    lease_during_outage: list[bool] = []

    def work(_record: Record, _abort: Abort) -> dict[str, int]:
        proxy.cut()
        return {"did": 1}

    def restore() -> None:
        # When the database is back after the outcome write has failed at least twice
        wait_for(lambda: caplog.text.count("outcome write failed") >= 2, 30, "failed writes")
        lease_during_outage.append(bool(client.exists(lease_key(settings, run_id))))
        proxy.resume()

    with caplog.at_level(logging.WARNING, logger="gathering_tasks.guard"):
        restorer = threading.Thread(target=restore)
        restorer.start()
        outcome = guard.execute(run_id, "run_task", work, worker="w", task_id="1")
        restorer.join(30)
    # Then the worker held the run's lease through the outage, and recorded its outcome:
    # the run is not left running for the sweeper to execute again
    assert lease_during_outage == [True]
    assert outcome == "succeeded"
    record = direct.ledger.get(run_id)
    assert (record["status"], record["attempt"], record["result"]) == ("succeeded", 1, {"did": 1})


@pytest.mark.postgres
def test_a_stalled_database_does_not_let_a_live_run_lose_its_lease(
    proxied: tuple[Repository, Repository, TcpProxy], pg_settings: Settings
):
    settings = pg_settings
    # Given a worker inside a run, whose database link then stalls for several lease TTLs
    direct, worker_repo, proxy = proxied
    run_id = claimed_run(direct, settings, datetime.now(UTC))
    guard = make_guard(worker_repo, settings, heartbeat_interval_s=0.2)
    client = redis.Redis.from_url(settings.redis_url)
    key = lease_key(settings, run_id)
    renewals: list[int] = []
    last_ttl_ms = [0]
    sent: list[int] = []
    sweeper = Sweeper(
        settings,
        direct.sweeps,
        lease_alive=lambda rid: bool(client.exists(lease_key(settings, rid))),
        publish=lambda ds: sent.append(len(ds)) or len(ds),
    )

    def renewed_past_ttl() -> bool:
        # the lease's TTL keeps being reset while the heartbeat cannot reach the database
        ttl_ms = int(client.pttl(key))
        if ttl_ms > last_ttl_ms[0]:
            renewals.append(ttl_ms)
        last_ttl_ms[0] = ttl_ms
        # renewed for two whole TTLs (every 0.2 s), all of it without the database
        return len(renewals) >= int(settings.run_lease_ttl_s / 0.2) * 2

    def work(record: Record, _abort: Abort) -> dict[str, int]:
        proxy.pause()
        try:
            wait_for(renewed_past_ttl, 60, "lease renewals during the stall")
            # When the sweeper (whose own link is fine) sweeps during the stall
            sweeper.sweep(direct.sweeps.read_now() + timedelta(seconds=60))
        finally:
            proxy.resume()
        return {"attempt": record.attempt}

    outcome = guard.execute(run_id, "run_task", work, worker="w", task_id="1")
    # Then nothing was handed to another worker, and the run succeeded as attempt 1
    assert sent == []
    assert outcome == "succeeded"
    record = direct.ledger.get(run_id)
    assert (record["status"], record["attempt"]) == ("succeeded", 1)


def test_records_running_at_once_in_one_process_each_keep_their_own_lease_and_heartbeat(
    repo: Repository, settings: Settings
):
    # Given two runs executing at the same time in one process (its keeper threads serve both)
    now = datetime.now(UTC)
    first, second = (claimed_run(repo, settings, now, name=n) for n in ("first", "second"))
    guard = make_guard(repo, settings, heartbeat_interval_s=0.05)
    client = redis.Redis.from_url(settings.redis_url)
    started = threading.Barrier(2)
    aborted: dict[int, bool] = {}
    outcomes: dict[int, str] = {}

    def beats_of(record_id: int) -> datetime:
        return datetime.fromisoformat(repo.ledger.get(record_id)["heartbeat_at"])

    def work(record: Record, abort: Abort) -> dict[str, int]:
        started.wait(10)
        if record.id == first:
            # When the first is taken over by another attempt
            later = datetime.now(UTC) + timedelta(seconds=60)
            assert repo.sweeps.requeue_lost(record.id, 1, error="x", stale_before=later)
            abort.wait(timeout=30)  # (the abort interrupts the work here)
            return {"ok": 1}
        # Then the second's heartbeat and lease go on, beat after beat, past the first's end
        wait_for(lambda: first in outcomes, 10, "the first run to be aborted")
        seen = beats_of(record.id)
        for _ in range(3):
            wait_for(lambda s=seen: beats_of(record.id) > s, 10, "a heartbeat")
            seen = beats_of(record.id)
        assert client.pttl(lease_key(settings, record.id)) > 0
        aborted[record.id] = abort.is_set()
        return {"ok": 1}

    def deliver(record_id: int) -> None:
        outcomes[record_id] = guard.execute(
            record_id, "run_task", work, worker=f"w{record_id}", task_id=str(record_id)
        )

    threads = [threading.Thread(target=deliver, args=(r,)) for r in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # And only the first was aborted: the second succeeded under its own lease
    assert aborted == {second: False}
    assert outcomes == {first: "superseded", second: "succeeded"}
    assert repo.ledger.get(second)["status"] == "succeeded"
