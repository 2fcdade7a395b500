"""The execution guard: a run executes once at a time, and its record tells the truth.

For each delivery of a run's message a worker:

1. takes the run's Redis lease (token-checked; renewed by a heartbeat while the run works);
2. moves the run record ``pending|retrying -> running`` with a conditional UPDATE.

If either step finds someone else there, the delivery acks and does nothing: the record, not
the lock, is the source of truth. While the work runs, a heartbeat thread renews the lease and
stamps ``heartbeat_at``; the sweeper treats a run whose heartbeat stopped as lost.
The outcome is written fenced by the attempt number, so a worker that was presumed dead and
comes back cannot overwrite a newer attempt.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal

import redis

from gathering_tasks import keys
from gathering_tasks.db.repo import Claim, Repository, RunContext, StaleRun
from gathering_tasks.errors import PermanentFailure, TaskTimedOut
from gathering_tasks.locks import Lease

log = logging.getLogger(__name__)

Executor = Callable[[RunContext], Mapping[str, Any] | None]
Publish = Callable[[Claim], None]
Outcome = Literal["succeeded", "failed", "timed_out", "retrying", "skipped"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def retry_delay_s(attempt: int, backoff_s: float, backoff_max_s: float) -> float:
    """Exponential backoff: ``backoff_s * 2**(attempt-1)``, capped."""
    return float(min(backoff_max_s, backoff_s * (2 ** max(0, attempt - 1))))


def storable(value: Any) -> Any:
    """A JSON value every database accepts: NaN/infinities -> null, NUL characters dropped."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


def bounded_result(value: Mapping[str, Any] | None, max_bytes: int) -> dict[str, Any] | None:
    """Keep a run's result storable and small: an oversized result is stored as an excerpt."""
    if value is None:
        return None
    clean: dict[str, Any] = storable(json.loads(json.dumps(value, default=str)))
    text = json.dumps(clean, separators=(",", ":"))
    if len(text) <= max_bytes:
        return clean
    return {"truncated": True, "size": len(text), "excerpt": text[: max_bytes // 2]}


def lost_run_decision(
    stale: StaleRun, now: datetime, *, default_time_limit_s: int
) -> Literal["timed_out", "failed", "requeue"]:
    """What to do with a run whose worker stopped heartbeating."""
    limit_s = stale.timeout_s or default_time_limit_s
    if (now - stale.started_at).total_seconds() > limit_s:
        return "timed_out"
    if stale.attempt >= stale.retry_max_attempts:
        return "failed"
    return "requeue"


def describe_error(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class GuardConfig:
    key_prefix: str
    lease_ttl_s: float
    heartbeat_interval_s: float
    max_result_bytes: int


class Heartbeat:
    """Renews a run's lease and stamps ``heartbeat_at`` until the block exits."""

    def __init__(self, repo: Repository, lease: Lease, run: RunContext, interval_s: float) -> None:
        self._repo, self._lease, self._run = repo, lease, run
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run.run_id}")
        self._thread.daemon = True

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)

    def _loop(self) -> None:
        extra = {"run_id": self._run.run_id, "attempt": self._run.attempt}
        while not self._stop.wait(self._interval_s):
            if not self._lease.extend() and not self._lease.acquire():
                # Redis restarted or the lease expired; the record still fences us.
                log.warning("run lease could not be renewed", extra=extra)
            try:
                if not self._repo.heartbeat(self._run.run_id, self._run.attempt, utcnow()):
                    log.warning("run attempt was taken over; outcome will be dropped", extra=extra)
            except Exception:
                log.exception("heartbeat write failed", extra=extra)


class ExecutionGuard:
    """Runs a claimed run under the lease + record guard, and records the outcome."""

    def __init__(
        self,
        repo: Repository,
        redis_client: redis.Redis,
        config: GuardConfig,
        *,
        publish_retry: Callable[[Claim, float], None],
    ) -> None:
        self._repo = repo
        self._redis = redis_client
        self._config = config
        self._publish_retry = publish_retry

    def execute(
        self, run_id: int, executor: Executor, *, worker: str, task_id: str | None
    ) -> Outcome:
        """Execute ``run_id`` once. ``skipped`` means another delivery has it or it is done."""
        extra = {"run_id": run_id}
        lease = Lease(
            self._redis, keys.run_lock(self._config.key_prefix, run_id), self._config.lease_ttl_s
        )
        if not lease.acquire():
            log.info("run is leased by another worker; dropping this delivery", extra=extra)
            return "skipped"
        try:
            run = self._repo.start_run(run_id, worker=worker, task_id=task_id, now=utcnow())
            if run is None:
                log.info("run is not pending; dropping this delivery", extra=extra)
                return "skipped"
            with Heartbeat(self._repo, lease, run, self._config.heartbeat_interval_s):
                return self._run(run, executor)
        finally:
            lease.release()

    def _run(self, run: RunContext, executor: Executor) -> Outcome:
        extra = {"run_id": run.run_id, "action_id": run.action_id, "attempt": run.attempt}
        log.info("run started", extra=extra)
        try:
            result = executor(run)
        except TaskTimedOut as exc:
            self._finish(run, "timed_out", error=describe_error(exc))
            return "timed_out"
        except PermanentFailure as exc:
            self._finish(run, "failed", error=describe_error(exc), result=_failure_data(exc))
            return "failed"
        except Exception as exc:
            return self._retry_or_fail(run, exc)
        self._finish(run, "succeeded", result=result)
        return "succeeded"

    def _retry_or_fail(self, run: RunContext, exc: Exception) -> Outcome:
        extra = {"run_id": run.run_id, "action_id": run.action_id, "attempt": run.attempt}
        error = describe_error(exc)
        if run.attempt >= run.retry_max_attempts:
            log.warning("run failed after %d attempts: %s", run.attempt, error, extra=extra)
            self._finish(run, "failed", error=error, result=_failure_data(exc))
            return "failed"
        delay_s = retry_delay_s(run.attempt, run.retry_backoff_s, run.retry_backoff_max_s)
        now = utcnow()
        retry_at = now + timedelta(seconds=delay_s)
        if self._repo.schedule_retry(
            run.run_id, run.attempt, retry_at=retry_at, error=error, now=now
        ):
            log.info("run attempt failed, retrying in %.1fs: %s", delay_s, error, extra=extra)
            claim = self._repo.claim_for_publish(run.run_id)
            if claim is not None:
                # If this publish is lost, the sweeper re-publishes once retry_at has passed.
                self._publish_retry(claim, delay_s)
        return "retrying"

    def _finish(
        self,
        run: RunContext,
        status: str,
        *,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        stored = bounded_result(result, self._config.max_result_bytes)
        done = self._repo.finish_run(
            run.run_id, run.attempt, status=status, now=utcnow(), result=stored, error=error
        )
        extra = {"run_id": run.run_id, "action_id": run.action_id, "attempt": run.attempt}
        if done:
            log.info("run %s", status, extra=extra)
        else:
            log.warning("run outcome %s dropped: attempt was taken over", status, extra=extra)


def _failure_data(exc: BaseException) -> dict[str, Any] | None:
    data = getattr(exc, "record", None)
    if callable(data):
        value = data()
        return dict(value) if isinstance(value, Mapping) else None
    return None
