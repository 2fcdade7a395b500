"""A worker's pool processes are ready for their first task when they report for work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

POOL_PROCESS_STARTS = (
    "from celery.signals import worker_process_init\n"
    "from gathering_tasks import runtime\n"
    "from gathering_tasks.app import app\n"
    "worker_process_init.send(sender=None)\n"
    "opened = runtime.repository.cache_info().currsize\n"
    "pool = runtime.repository().factory.kw['bind'].pool\n"
    "print(opened, getattr(pool, 'checkedin', lambda: 1)())\n"
)


def test_a_pool_process_connects_to_the_database_before_its_first_task(db_url: str, redis_url: str):
    # Given a fresh process configured for the test database, as a forked pool process is
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    env.update(GATHERING_DATABASE_URL=db_url, GATHERING_REDIS_URL=redis_url)
    # When it starts (worker_process_init, before it reports for work)
    done = subprocess.run(
        [sys.executable, "-c", POOL_PROCESS_STARTS],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    # Then its repository is open and a connection waits in its pool, so the first task
    # does not pay the connect and the schema check
    assert done.stdout.split() == ["1", "1"], done.stderr
