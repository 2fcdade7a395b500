"""The execution guarantees, proven with real workers, beat, Redis and PostgreSQL.

Each test injects one fault (a stalled database link, a frozen worker, a failing attempt, a
cancel, a delete) and then counts: how often the handler ran, which attempts the record holds,
who holds the run's lease. Handlers come from ``tests.acceptance.handlers_for_tests`` and
leave their marks in Redis, never in the database.
"""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import make_url

from gathering_tasks.api import ActionService
from gathering_tasks.db.ledger import FINAL, Dispatch
from gathering_tasks.db.models import Execution
from gathering_tasks.db.repo import Repository
from gathering_tasks.keys import run_lock
from gathering_tasks.kinds import kind
from gathering_tasks.publish import message_options, publish
from gathering_tasks.settings import Settings
from gathering_tasks.status import leader
from tests.acceptance.handlers_for_tests import calls_key, mark, progress_key
from tests.acceptance.procs import CeleryProcess, Stack, running_stack, stack_env
from tests.proxy import TcpProxy
from tests.servers import wait_for

pytestmark = pytest.mark.acceptance
POSTGRES_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
INCLUDE = ("-I", "tests.acceptance.handlers_for_tests")
READY_S = 60.0  # a worker starting on a busy machine
RUN_S = 60.0  # a run reaching a state it is headed for
MARKS = "marks"


# -- wiring --------------------------------------------------------------------------------


@pytest.fixture
def svc(repo: Repository, settings: Settings, celery_app: Celery) -> ActionService:
    """The action service, publishing what it triggers (as ``action_service()`` does)."""

    def publish_one(dispatch: Dispatch) -> None:
        publish(celery_app, [dispatch], default_queue=settings.default_queue)

    return ActionService(repo, settings, task_allowed=lambda _n: True, publish=publish_one)


@pytest.fixture
def quiet(repo: Repository, settings: Settings) -> ActionService:
    """The action service without a broker: a triggered run is recorded, never published."""
    return ActionService(repo, settings, task_allowed=lambda _n: True)


def steps_action(name: str, count: int, **extra: Any) -> dict[str, Any]:
    """A ``tests.steps`` action that only runs when triggered (its slot is a day away)."""
    kwargs = {"key": MARKS, "count": count, **extra.pop("kwargs", {})}
    return {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "tests.steps", "kwargs": kwargs},
        "schedule": {"kind": "once", "at": (datetime.now(UTC) + timedelta(days=1)).isoformat()},
        "retry_max_attempts": 1,
        **extra,
    }


def deliver(app: Celery, repo: Repository, settings: Settings, run_id: int) -> str:
    """Publish one more message for ``run_id``, as a redelivery would. Returns its task id."""
    dispatch = repo.ledger.dispatch_of(run_id)
    assert dispatch is not None
    task_id = uuid.uuid4().hex
    with app.producer_or_acquire() as producer:
        app.send_task(
            kind(dispatch.kind).task_name,
            args=[run_id],
            task_id=task_id,
            producer=producer,
            add_to_parent=False,
            **message_options(dispatch, settings.default_queue),
        )
    return task_id


# -- observing -----------------------------------------------------------------------------


def ready(*procs: CeleryProcess) -> None:
    for proc in procs:
        wait_for(lambda p=proc: " ready." in p.log_text(), READY_S, f"{proc.name} to be ready")


def leading(beat: CeleryProcess) -> None:
    wait_for(lambda: "beat is now the leader" in beat.log_text(), READY_S, "beat to lead")


def run_in(repo: Repository, run_id: int, statuses: tuple[str, ...]) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        record = repo.ledger.get(run_id)
        return record if record["status"] in statuses else None

    found: dict[str, Any] = wait_for(reached, RUN_S, f"run {run_id} to be {'/'.join(statuses)}")
    return found


def finished(repo: Repository, run_id: int) -> dict[str, Any]:
    return run_in(repo, run_id, FINAL)


def steps_taken(client: redis.Redis, run_id: int, attempt: int) -> int:
    return int(client.get(progress_key(MARKS, run_id, attempt)) or 0)


def marks(client: redis.Redis) -> list[str]:
    return [str(item) for item in client.lrange(MARKS, 0, -1)]


def history(record: dict[str, Any]) -> list[tuple[int, str]]:
    return [(entry["attempt"], entry["status"]) for entry in record["attempts"] or []]


def task_line(stack: Stack, task_id: str) -> str | None:
    """The worker log line that reports the end of Celery task ``task_id``, once there."""
    for proc in stack.procs:
        for line in proc.log_text().splitlines():
            if f"[{task_id}] succeeded" in line:
                return line
    return None


def dropped_promptly(stack: Stack, task_id: str) -> str:
    line: str = wait_for(lambda: task_line(stack, task_id), RUN_S, f"delivery {task_id} to end")
    return line


def heartbeat_age_s(repo: Repository, run_id: int) -> float:
    """How old the run's heartbeat is, by the database clock (the sweeper's clock)."""
    e = Execution
    age = func.extract("epoch", func.now() - e.heartbeat_at)
    with repo.factory() as session:
        return float(session.execute(select(age).where(e.id == run_id)).scalar_one())


def plant_dead_run(repo: Repository, run_id: int) -> None:
    """Make a queued record look like a run whose worker died an hour ago (no lease)."""
    with repo.factory() as session, session.begin():
        session.execute(
            update(Execution)
            .where(Execution.id == run_id, Execution.status == "pending")
            .values(
                status="running",
                attempt=1,
                worker="canary@nowhere",
                started_at=func.now(),
                heartbeat_at=text("now() - interval '1 hour'"),
            )
        )


def sweeps_pass_by(repo: Repository, quiet: ActionService, canary: str, sweeps: int) -> None:
    """Wait for ``sweeps`` distinct sweeps: each one recovers a dead canary run planted after
    the previous one was recovered (a sweep reads the stale runs once, then acts)."""
    for _ in range(sweeps):
        canary_id = quiet.trigger(canary)
        plant_dead_run(repo, canary_id)
        recovered = finished(repo, canary_id)
        assert (recovered["status"], recovered["error"]) == ("failed", "worker lost")


# -- the guarantees ------------------------------------------------------------------------


@POSTGRES_ONLY
def test_a_worker_cut_off_from_the_database_keeps_its_run(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    svc: ActionService,
    quiet: ActionService,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given worker w1 reaching PostgreSQL through a proxy, beat with its sweeper connected
    # directly, and a run on w1 that takes 6 s (two lease TTLs)
    url = make_url(db_url)
    assert url.port is not None
    with (
        TcpProxy(url.port) as proxy,
        running_stack(stack_env(db_url, redis_url), tmp_path) as stack,
    ):
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        w1 = stack.worker("w1", 1, *INCLUDE, env=stack_env(proxied, redis_url))
        beat = stack.beat("b1")
        ready(w1)
        leading(beat)
        # (`status` names the leader: this beat's host and pid)
        assert beat.proc is not None
        named = leader(client, "gathering")["holder"]
        assert named == f"{socket.gethostname()}:{beat.proc.pid}"
        # (a second attempt is allowed, so a wrong recovery would requeue the run for w2)
        svc.create(steps_action("stalled", 60, retry_max_attempts=2))
        quiet.create(steps_action("canary", 1))
        run_id = svc.trigger("stalled")
        running = run_in(repo, run_id, ("running",))
        assert running["worker"].startswith("w1@")
        # and w2, connected directly, ready to execute the run if it were handed over
        w2 = stack.worker("w2", 2, *INCLUDE)

        # When w1's database link stalls for longer than the lease TTL: sweeps pass by while
        # w1 works, and more while its outcome waits for the database
        proxy.pause()
        try:
            ttl_s = settings.run_lease_ttl_s
            wait_for(lambda: heartbeat_age_s(repo, run_id) > ttl_s, RUN_S, "a stale heartbeat")
            sweeps_pass_by(repo, quiet, "canary", sweeps=2)
            ready(w2)
            wait_for(lambda: marks(client), RUN_S, "w1 to finish the work")
            sweeps_pass_by(repo, quiet, "canary", sweeps=2)
            stalled = repo.ledger.get(run_id)
            stalled_for_s = heartbeat_age_s(repo, run_id)
        finally:
            proxy.resume()
        done = finished(repo, run_id)
        w1_log = w1.log_text()

    # Then while cut off, w1 kept the run (four sweeps saw it stale and left it alone) ...
    assert (stalled["status"], stalled["attempt"]) == ("running", 1)
    assert stalled_for_s > ttl_s
    # ... the work ran exactly once, and w1's outcome was recorded once the link came back
    assert marks(client) == [mark(run_id, 1)]
    assert (done["status"], done["attempt"]) == ("succeeded", 1), done["error"]
    assert history(done) == [(1, "succeeded")]
    assert done["worker"].startswith("w1@")
    assert "taken over" not in w1_log and "aborting" not in w1_log


@POSTGRES_ONLY
def test_a_woken_zombie_never_retakes_the_lease_and_its_outcome_is_dropped(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    svc: ActionService,
    celery_app: Celery,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given worker a inside a run whose first attempt takes 100 steps, later ones 5
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        a = stack.worker("a", 1, *INCLUDE)
        leading(stack.beat("b1"))
        ready(a)
        svc.create(steps_action("zombie", 100, kwargs={"later_count": 5}, retry_max_attempts=2))
        run_id = svc.trigger("zombie")
        lease = run_lock(settings.key_prefix, run_id)
        wait_for(lambda: steps_taken(client, run_id, 1) >= 1, RUN_S, "a to be inside the work")

        # When a freezes until its lease lapses, the sweeper requeues the run and b runs it
        a.freeze()
        try:
            stack.worker("b", 1, *INCLUDE)
            done = run_in(repo, run_id, FINAL)
            # (b releases its lease just after writing its outcome)
            wait_for(lambda: not client.exists(lease), RUN_S, "b to release the lease")
            frozen_at_step = steps_taken(client, run_id, 1)
        finally:
            # and then a wakes up, in the middle of its attempt
            a.thaw()
        lease_seen: list[int] = []

        def a_gave_up() -> str | None:
            lease_seen.append(int(client.exists(lease)))
            lines = [line for line in a.log_text().splitlines() if "'superseded: " in line]
            return lines[0] if lines else None

        wait_for(a_gave_up, RUN_S, "a to notice the takeover and end its task")
        a_log = a.log_text()
        after_wake = repo.ledger.get(run_id)

        # and a fresh delivery of the run comes afterwards
        task_id = deliver(celery_app, repo, settings, run_id)
        redelivered = dropped_promptly(stack, task_id)
        after_delivery = repo.ledger.get(run_id)

    # Then b's attempt is the record's truth: the sweeper's requeue, then b's success
    assert (done["status"], done["attempt"]) == ("succeeded", 2), done["error"]
    assert history(done) == [(1, "pending"), (2, "succeeded")]
    assert done["attempts"][0]["worker"].startswith("a@")
    assert done["worker"].startswith("b@")
    # a noticed, never took the lease again, stopped its work and wrote nothing
    assert "run was taken over by another attempt; aborting" in a_log
    assert "outcome dropped: taken over" in a_log
    assert lease_seen and not any(lease_seen), "a re-took the lease after waking"
    assert steps_taken(client, run_id, 1) < 100, "a finished its work after the takeover"
    assert frozen_at_step >= 1
    assert marks(client) == [mark(run_id, 2)]
    assert after_wake == done
    # and the late delivery was dropped, leaving the record and the lease alone
    assert "'dropped: " in redelivered
    assert after_delivery == done
    assert client.exists(lease) == 0
    assert marks(client) == [mark(run_id, 2)]


@POSTGRES_ONLY
def test_a_zero_backoff_retry_runs_again_without_any_sweeper(
    db_url: str,
    redis_url: str,
    repo: Repository,
    svc: ActionService,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given a worker and no beat (so no sweeper), and an action that fails its first attempt
    svc.create(
        {
            "name": "flaky",
            "action_type": "run_task",
            "config": {"task": "tests.fail_first", "kwargs": {"key": MARKS}},
            "schedule": {
                "kind": "once",
                "at": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
            },
            "retry_max_attempts": 2,
            "retry_backoff_s": 0,
            "retry_backoff_max_s": 0,
        }
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 2, *INCLUDE))
        # When it is triggered
        run_id = svc.trigger("flaky")
        done = finished(repo, run_id)
        assert all(proc.kind == "worker" for proc in stack.procs)

    # Then the worker's own retry message ran attempt 2, which succeeded
    assert (done["status"], done["attempt"]) == ("succeeded", 2), done["error"]
    assert history(done) == [(1, "retrying"), (2, "succeeded")]
    assert "fails on purpose" in done["attempts"][0]["error"]
    assert int(client.get(calls_key(MARKS, run_id)) or 0) == 2
    assert marks(client) == [mark(run_id, 2)]


@POSTGRES_ONLY
def test_cancel_stops_a_running_run_and_a_cancelled_queued_run_never_executes(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    svc: ActionService,
    quiet: ActionService,
    celery_app: Celery,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given a run of 300 steps of 0.1 s in progress on a worker
    svc.create(steps_action("long", 300))
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        worker = stack.worker("w1", 2, *INCLUDE)
        ready(worker)
        run_id = svc.trigger("long")
        wait_for(lambda: steps_taken(client, run_id, 1) >= 3, RUN_S, "the run to make progress")

        # When it is cancelled
        assert svc.cancel_run(run_id) == "running"
        done = finished(repo, run_id)
        steps_when_done = steps_taken(client, run_id, 1)

        # And a queued run is cancelled before any worker took it, then delivered anyway
        queued_id = quiet.trigger("long")
        assert svc.cancel_run(queued_id) == "cancelled"
        delivery = dropped_promptly(stack, deliver(celery_app, repo, settings, queued_id))
        queued = repo.ledger.get(queued_id)
        steps_later = steps_taken(client, run_id, 1)
        worker_log = worker.log_text()

    # Then the running run stopped early and is recorded cancelled
    assert (done["status"], done["attempt"]) == ("cancelled", 1), done["error"]
    assert history(done) == [(1, "cancelled")]
    assert "run cancellation requested; aborting" in worker_log
    assert 3 <= steps_when_done < 300
    assert steps_later == steps_when_done, "the handler kept going after the run ended"
    # and the queued one never executed
    assert "'dropped: " in delivery
    assert (queued["status"], queued["attempt"], queued["started_at"]) == ("cancelled", 0, None)
    assert steps_taken(client, queued_id, 1) == 0
    assert marks(client) == []


@POSTGRES_ONLY
def test_deleting_an_action_lets_its_run_finish_and_keeps_the_history(
    db_url: str,
    redis_url: str,
    repo: Repository,
    svc: ActionService,
    quiet: ActionService,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Given a run of an action in flight (50 steps of 0.1 s), and another one queued
    svc.create(steps_action("doomed", 50))
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 2, *INCLUDE))
        run_id = svc.trigger("doomed")
        wait_for(lambda: steps_taken(client, run_id, 1) >= 1, RUN_S, "the run to be in flight")
        queued_id = quiet.trigger("doomed")

        # When the action is deleted, and a new action takes its name
        archived = svc.delete("doomed")
        unfinished_at_delete = marks(client) == []
        replacement = svc.create(steps_action("doomed", 1))
        done = finished(repo, run_id)

    # Then the run that was in flight when the action was deleted finished and is recorded,
    # readable by id
    assert unfinished_at_delete
    assert (done["status"], done["attempt"]) == ("succeeded", 1), done["error"]
    assert marks(client) == [mark(run_id, 1)]
    assert svc.get_run(run_id) == done
    assert done["action_id"] == archived["id"]
    # the queued run was cancelled, never executed
    queued = svc.get_run(queued_id)
    assert (queued["status"], queued["attempt"]) == ("cancelled", 0)
    assert steps_taken(client, queued_id, 1) == 0
    # the action is archived, and its name belongs to the new one
    assert [(a["id"], a["name"]) for a in svc.list_actions("archived")] == [
        (archived["id"], "doomed")
    ]
    assert archived["status"] == "archived"
    assert svc.get("doomed")["id"] == replacement["id"] != archived["id"]
