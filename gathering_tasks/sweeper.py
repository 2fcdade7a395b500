"""Recovery and retention over the whole ledger, run by the beat leader.

* Records queued past the grace (their message was lost) are re-published, with backoff.
* Records ``running`` whose heartbeat is stale AND whose Redis lease is gone (their worker
  died) go back to ``pending`` within their retry policy, or end ``failed``/``timed_out``.
  A stale heartbeat with a live lease is a worker cut off from the database: left alone.
* Finished records older than the retention are pruned in bounded batches, every
  ``PRUNE_INTERVAL_S`` (sooner while a backlog lasts): retention is counted in days.
* Pipeline runs past their timeout end ``timed_out``.

One read (:meth:`~gathering_tasks.db.sweeps.Sweeps.probe`) says which of the first, second
and last have work; a sweep with nothing to do is that read. Every write is fenced (attempt,
and the heartbeat still stale), so a worker that was only slow keeps its record. Times come
from the database clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from gathering_tasks import metrics
from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.db.sweeps import StaleRecord, Sweeps
from gathering_tasks.keys import PRUNE_INTERVAL_S, SWEEP_LIMIT
from gathering_tasks.policy import lost_record_decision
from gathering_tasks.settings import Settings

log = logging.getLogger(__name__)


class PipelineDeadlines(Protocol):
    """What the sweeper asks of pipelines (a :class:`~gathering_tasks.db.pipelines.PipelineStore`
    does it)."""

    def overdue_runs(self, now: datetime, *, limit: int) -> list[int]: ...

    def cancel_run(self, run_id: int, *, now: datetime, status: str = "cancelled") -> str: ...


class Sweeper:
    """One sweep: what to re-publish, which dead workers' records to recover, what to prune."""

    def __init__(
        self,
        settings: Settings,
        sweeps: Sweeps,
        *,
        lease_alive: Callable[[int], bool],
        publish: Callable[[list[Dispatch]], int],
        pipelines: PipelineDeadlines | None = None,
    ) -> None:
        self.settings = settings
        self.sweeps = sweeps
        self.pipelines = pipelines
        self.lease_alive = lease_alive
        self.publish = publish
        self._next_prune_s = 0.0  # time.monotonic() of the next prune: the first sweep prunes

    def sweep(self, now: datetime | None = None) -> int:
        """Sweep once (``now``: the database clock unless given). Returns messages sent."""
        now = now or self.sweeps.read_now()
        settings = self.settings
        probe = self.sweeps.probe(
            now, grace_s=settings.pending_grace_s, heartbeat_timeout_s=settings.run_lease_ttl_s
        )
        dispatches: list[Dispatch] = []
        if probe.stale_queued:
            dispatches = self.sweeps.stale_queued(
                now, grace_s=settings.pending_grace_s, limit=SWEEP_LIMIT
            )
        republished = len(dispatches)
        if probe.stale_running:
            dispatches += self._recover_stale(now)
        metrics.swept(republished=republished, recovered=len(dispatches) - republished)
        if time.monotonic() >= self._next_prune_s:
            self._prune_on_cadence(now)
        if probe.overdue_pipelines:
            self.expire_pipelines(now)
        if not dispatches:
            return 0
        log.warning("sweeper re-publishing %d run(s)", len(dispatches))
        return self.publish(dispatches)

    def _recover_stale(self, now: datetime) -> list[Dispatch]:
        """Recover the running records whose worker is gone; the dispatches to re-publish."""
        ttl_s = self.settings.run_lease_ttl_s
        stale_before = now - timedelta(seconds=ttl_s)
        dispatches: list[Dispatch] = []
        for stale in self.sweeps.stale_running(now, heartbeat_timeout_s=ttl_s, limit=SWEEP_LIMIT):
            if self.lease_alive(stale.record_id):
                continue  # its worker still renews the lease: cut off from the database
            recovered = self._recover(stale, now, stale_before)
            dispatches += [recovered] if recovered else []
        return dispatches

    def _prune_on_cadence(self, now: datetime) -> None:
        # A full batch means more is waiting: the next sweep prunes again.
        full = self.prune(now) >= self.settings.retention_batch
        self._next_prune_s = 0.0 if full else time.monotonic() + PRUNE_INTERVAL_S

    def expire_pipelines(self, now: datetime) -> int:
        """Pipeline runs past their timeout end ``timed_out``; their running nodes are told."""
        if self.pipelines is None:
            return 0
        overdue = self.pipelines.overdue_runs(now, limit=SWEEP_LIMIT)
        for run_id in overdue:
            self.pipelines.cancel_run(run_id, now=now, status="timed_out")
            log.warning("pipeline run timed out", extra={"pipeline_run_id": run_id})
        return len(overdue)

    def prune(self, now: datetime) -> int:
        if not self.settings.retention_days:
            return 0
        before = now - timedelta(days=self.settings.retention_days)
        pruned = self.sweeps.prune(before, limit=self.settings.retention_batch)
        if pruned:
            log.info("pruned %d finished run(s) older than %s", pruned, before.isoformat())
        return pruned

    def _recover(
        self, stale: StaleRecord, now: datetime, stale_before: datetime
    ) -> Dispatch | None:
        decision = lost_record_decision(
            stale, now, default_time_limit_s=self.settings.task_time_limit_s
        )
        extra = {"run_id": stale.record_id, "attempt": stale.attempt, "decision": decision}
        log.warning("recovering a run whose worker is gone", extra=extra)
        if decision == "requeue":
            return self.sweeps.requeue_lost(
                stale.record_id,
                stale.attempt,
                error="worker lost during the run",
                stale_before=stale_before,
            )
        error = "run exceeded its time limit" if decision == "timed_out" else "worker lost"
        ready = self.sweeps.end_lost(
            stale.record_id, stale.attempt, status=decision, error=error, stale_before=stale_before
        )
        if ready:
            self.publish(ready)
        return None
