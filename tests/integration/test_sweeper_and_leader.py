"""The recovery sweeper and the beat leader lease, against real Redis and both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery

from gathering_tasks import keys
from gathering_tasks.beat import BeatEngine
from gathering_tasks.db.repo import Repository
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings
from tests.factories import claimed_run
from tests.servers import wait_for


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
    assert repo.get_run(run_id)["status"] == "pending"


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
    # Given a worker that started a run 60 s ago and died (no heartbeat since)
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    run_id = claimed_run(repo, settings, t0, **extra)
    assert repo.start_run(run_id, worker="dead", task_id="x", now=t0) is not None
    # When the sweeper runs
    published = engine(settings, repo, celery_app).sweep(datetime.now(UTC))
    # Then the run is recovered as the policy says, and re-published only when requeued
    record = repo.get_run(run_id)
    assert record["status"] == status
    assert record["attempts"] == [
        {
            "attempt": 1,
            "status": status,
            "worker": "dead",
            "started_at": t0.isoformat(),
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
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    run_id = claimed_run(repo, settings, t0)
    assert repo.start_run(run_id, worker="slow-db", task_id="x", now=t0) is not None
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
    # When the sweeper runs, the run is not taken from its worker
    assert beat.sweep(datetime.now(UTC)) == 0
    assert repo.get_run(run_id)["status"] == "running"
    # And once the lease is gone, it is recovered
    lease.release()
    assert beat.sweep(datetime.now(UTC)) == 1
    assert repo.get_run(run_id)["status"] == "pending"


def test_a_heartbeat_after_the_sweepers_look_wins(repo: Repository, settings: Settings):
    # Given a run the sweeper saw as stale
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    run_id = claimed_run(repo, settings, t0)
    assert repo.start_run(run_id, worker="w", task_id="x", now=t0) is not None
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.run_lease_ttl_s)
    # When the worker's heartbeat lands before the sweeper's write
    assert repo.heartbeat(run_id, 1, datetime.now(UTC))
    # Then the takeover is refused, and the worker keeps its run
    assert not repo.requeue_lost(run_id, 1, now=datetime.now(UTC), error="x", stale_before=cutoff)
    assert repo.get_run(run_id)["status"] == "running"


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
