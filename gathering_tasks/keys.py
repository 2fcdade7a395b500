"""Every Redis key and every fixed timing constant of gathering-tasks, in one place.

Timings that operators tune are settings (``gathering_tasks.settings``); these are the ones
that follow from the design and are not meant to be changed per deployment.
"""

from __future__ import annotations

# Beat
MIN_SLEEP_S = 0.005  # beat never busy-loops, even when a slot is due in a microsecond
SWEEP_LIMIT = 500  # records one sweep re-publishes or recovers at most
PRUNE_INTERVAL_S = 60.0  # how often the leader prunes finished records (retention is in days)
SCHEDULE_CACHE_SIZE = 10_000  # parsed schedules one beat keeps (distinct ones, not actions)
# The sweeper re-publishes one queued record after the grace, then 2x, 4x ... 64x it.
MAX_REPUBLISH_DOUBLINGS = 6

# Worker
HARD_LIMIT_MARGIN_S = 10  # a task's hard time limit is its soft limit plus this
RETRY_CLOCK_SKEW_S = 1.0  # a retry may start this early (its copy raced its retry time)
MAX_ATTEMPT_HISTORY = 50  # attempts kept in a record's history
OUTCOME_RETRY_MAX_WAIT_S = 5.0  # longest pause between tries of an outcome write
# A new pool process may take this long beyond its database bounds to report for work
# (Celery's own default wait for it).
POOL_START_MARGIN_S = 4.0


def run_lock(prefix: str, record_id: int) -> str:
    """The lease held by the worker executing ledger record ``record_id``."""
    return f"{prefix}:lock:run:{record_id}"


def beat_leader(prefix: str) -> str:
    """The lease that makes one beat replica the leader."""
    return f"{prefix}:beat:leader"
