"""The recovery sweeper and the beat leader lease, against real Redis and both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery

from gathering_tasks import keys
from gathering_tasks.api import ActionService
from gathering_tasks.beat import BeatEngine
from gathering_tasks.db.ledger import Record
from gathering_tasks.db.repo import Repository
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings
from tests.factories import claimed_run
from tests.servers import wait_for


def later(repo: Repository, seconds: float = 60) -> datetime:
    """``seconds`` from now by the database clock: every heartbeat of now is stale then."""
    return repo.sweeps.read_now() + timedelta(seconds=seconds)


def engine(settings: Settings, repo: Repository, app: Celery, ttl_s: float = 2.0) -> BeatEngine:
    lease = Lease(redis.Redis.from_url(settings.redis_url), keys.beat_leader("t"), ttl_s)
    return BeatEngine(settings, repo, lease, app)


def queued(settings: Settings) -> int:
    return int(redis.Redis.from_url(settings.redis_url).llen(settings.default_queue))


def test_lost_publish_is_republished_once_per_grace(
    repo: Repository, settings: Settings, celery_app: Celery
):
    # Given a run claimed 10 s ago whose message never reached the broker
    t0 = datetime.now(UTC) - timedelta(seconds=10)
    run_id = claimed_run(repo, settings, t0)
    beat = engine(settings, repo, celery_app)
    # When the sweeper runs (twice in a row)
    now = datetime.now(UTC)
    assert beat.sweep(now) == 1
    assert beat.sweep(now) == 0
    # Then the run was published exactly once and is still pending for the guard
    assert queued(settings) == 1
    assert repo.ledger.get(run_id)["status"] == "pending"


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"timeout_s": 300, "retry_max_attempts": 3}, "pending"),  # requeued for another try
        ({"timeout_s": 5, "retry_max_attempts": 3}, "timed_out"),  # past its time limit
        ({"timeout_s": 300, "retry_max_attempts": 1}, "failed"),  # no attempts left
    ],
)
def test_run_of_a_dead_worker_is_recovered(
    repo: Repository,
    settings: Settings,
    celery_app: Celery,
    extra: dict[str, object],
    status: str,
):
    # Given a worker that started a run and died (no heartbeat since)
    run_id = claimed_run(repo, settings, datetime.now(UTC), **extra)
    assert isinstance(
        repo.ledger.start(run_id, kind="run_task", worker="dead", task_id="x"), Record
    )
    started_at = repo.ledger.get(run_id)["started_at"]
    # When the sweeper runs a minute later (by the database clock)
    published = engine(settings, repo, celery_app).sweep(later(repo))
    # Then the run is recovered as the policy says, and re-published only when requeued
    record = repo.ledger.get(run_id)
    assert record["status"] == status
    assert record["attempts"] == [
        {
            "attempt": 1,
            "status": status,
            "worker": "dead",
            "started_at": started_at,
            "ended_at": record["attempts"][0]["ended_at"],
            "error": record["error"],
        }
    ]
    assert published == queued(settings) == (1 if status == "pending" else 0)


def test_only_one_beat_leads_and_a_standby_takes_over(
    repo: Repository, settings: Settings, celery_app: Celery
):
    leader = engine(settings, repo, celery_app, ttl_s=1.0)
    standby = engine(settings, repo, celery_app, ttl_s=1.0)
    assert leader.lead() is True
    assert standby.lead() is False
    assert leader.lead() is True  # extended
    # When the leader stops without releasing (a crash), its lease expires
    client = redis.Redis.from_url(settings.redis_url)
    client.pexpire(keys.beat_leader("t"), 1)
    wait_for(standby.lead, 5, "the standby to take the lease")
    # Then the old leader notices at its next tick and stops dispatching
    assert leader.lead() is False
    assert leader.is_leader is False and standby.is_leader is True


def test_a_run_whose_lease_is_alive_is_left_alone(
    repo: Repository, settings: Settings, celery_app: Celery
):
    # Given a run whose database heartbeat is old but whose worker still renews its lease
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    assert isinstance(
        repo.ledger.start(run_id, kind="run_task", worker="slow-db", task_id="x"), Record
    )
    lease = Lease(redis.Redis.from_url(settings.redis_url), keys.run_lock("t", run_id), 30)
    assert lease.acquire()
    beat = BeatEngine(
        settings,
        repo,
        Lease(redis.Redis.from_url(settings.redis_url), keys.beat_leader("t"), 2),
        celery_app,
        run_lease_alive=lambda rid: bool(
            redis.Redis.from_url(settings.redis_url).exists(keys.run_lock("t", rid))
        ),
    )
    # When the sweeper runs a minute later, the run is not taken from its worker
    assert beat.sweep(later(repo)) == 0
    assert repo.ledger.get(run_id)["status"] == "running"
    # And once the lease is gone, it is recovered
    lease.release()
    assert beat.sweep(later(repo)) == 1
    assert repo.ledger.get(run_id)["status"] == "pending"


def test_a_heartbeat_after_the_sweepers_look_wins(repo: Repository, settings: Settings):
    # Given a run the sweeper saw as stale at `cutoff`
    run_id = claimed_run(repo, settings, datetime.now(UTC))
    assert isinstance(repo.ledger.start(run_id, kind="run_task", worker="w", task_id="x"), Record)
    cutoff = repo.sweeps.read_now()
    # When the worker's heartbeat lands before the sweeper's write
    assert repo.ledger.heartbeat(run_id, 1).owned
    # Then the takeover is refused, and the worker keeps its run
    assert repo.sweeps.requeue_lost(run_id, 1, error="x", stale_before=cutoff) is None
    assert repo.ledger.get(run_id)["status"] == "running"


def test_republishing_backs_off_for_a_run_that_stays_queued(
    repo: Repository, settings: Settings, celery_app: Celery
):
    # Given a run queued long ago that no worker has picked up (a backlog, or a lost message)
    t0 = datetime.now(UTC) - timedelta(seconds=600)
    claimed_run(repo, settings, t0)
    beat = engine(settings, repo, celery_app)
    grace = timedelta(seconds=settings.pending_grace_s)
    # When the sweeper runs at growing intervals
    published = [
        beat.sweep(now)
        for now in (
            t0 + 2 * grace,  # first republish: the grace has passed
            t0 + 3 * grace,  # one more grace: still inside its 2 x grace backoff
            t0 + 5 * grace,  # past the backoff: republished again
            t0 + 8 * grace,  # inside the 4 x grace backoff
            t0 + 10 * grace,  # past it
        )
    ]
    # Then the copies thin out instead of arriving every sweep
    assert published == [1, 0, 1, 0, 1]


def test_a_leader_whose_lease_lapses_mid_tick_stops_between_batches(
    repo: Repository, settings: Settings, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
):
    # Given 20 due actions, claimed 5 per transaction, by the leader
    now = datetime.now(UTC)
    service = ActionService(repo, settings, task_allowed=lambda _n: True, clock=lambda: now)
    for i in range(20):
        service.create(
            {
                "name": f"due-{i}",
                "action_type": "run_task",
                "config": {"task": "demo.add", "args": [1, 2]},
                "schedule": {"kind": "once", "at": now.isoformat()},
            }
        )
    small = settings.model_copy(update={"beat_batch_size": 5})
    beat = engine(small, repo, celery_app)
    assert beat.lead()
    client = redis.Redis.from_url(settings.redis_url)
    claim_due = repo.claims.claim_due

    def claim_then_lapse(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        batch = claim_due(*args, **kwargs)  # type: ignore[arg-type]
        # When, right after the first transaction, the lease lapses and a standby takes it
        client.set(keys.beat_leader("t"), "the-standby", px=10_000)
        return batch

    monkeypatch.setattr(repo.claims, "claim_due", claim_then_lapse)
    published = beat.dispatch_due(now)
    # Then the old leader dispatched that one batch and no more: the rest stays due
    assert published == 5
    assert beat.is_leader is False
    assert sum(1 for a in service.list_actions() if a["status"] == "active") == 15


def test_retention_prunes_old_finished_runs_in_bounded_batches(
    repo: Repository, settings: Settings, celery_app: Celery
):
    # Given 5 finished runs and one still queued
    now = datetime.now(UTC)
    finished = []
    for i in range(6):
        run_id = claimed_run(repo, settings, now, name=f"r{i}")
        if i < 5:
            started = repo.ledger.start(run_id, kind="run_task", worker="w", task_id="t")
            assert isinstance(started, Record)
            assert repo.ledger.finish(run_id, 1, status="succeeded")
            finished.append(run_id)
    queued_id = run_id
    beat = engine(settings.model_copy(update={"retention_batch": 2}), repo, celery_app)
    # When the leader prunes 29 days later: nothing is old enough
    assert beat.sweeper.prune(later(repo, 29 * 86_400)) == 0
    # And 31 days later: 2 per sweep, until the finished ones are gone
    pruned = [beat.sweeper.prune(later(repo, 31 * 86_400)) for _ in range(4)]
    assert pruned == [2, 2, 1, 0]
    # Then the queued run is kept, and the finished ones are gone
    assert [r["id"] for r in repo.ledger.list_runs()] == [queued_id]
