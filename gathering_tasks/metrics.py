"""Prometheus metrics of beat and workers, off unless ``GATHERING_METRICS_PORT`` is set.

Names (all prefixed ``gathering_``), documented in docs/metrics.md:

* ``slots_claimed_total`` -- records beat claimed for due slots (counter, beat)
* ``dispatch_lag_seconds`` -- how late a slot's message was published (histogram, beat)
* ``beat_leader`` -- 1 while this beat holds the leader lease (gauge, beat)
* ``sweeper_recoveries_total{action}`` -- records the sweeper ``republished`` or ``recovered``
  from a dead worker (counter, beat leader)
* ``runs_total{kind,outcome}`` -- deliveries by guard outcome (counter, worker)
* ``run_duration_seconds{kind}`` -- time a worker spent on a run (histogram, worker)

A worker's pool processes write their samples to files (Prometheus' multiprocess mode) that
the worker's main process serves; beat serves its own registry.

``prometheus_client`` is imported only once metrics are on: a process without
``GATHERING_METRICS_PORT`` never loads it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from gathering_tasks import runtime

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gathering_tasks.db.ledger import Dispatch

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)


class Metrics:
    """The metric objects of one process, on their own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.slots_claimed = Counter(
            "gathering_slots_claimed", "Records beat claimed for due slots.", registry=registry
        )
        self.dispatch_lag = Histogram(
            "gathering_dispatch_lag_seconds",
            "Seconds between a slot's time and the publish of its message.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        self.beat_leader = Gauge(
            "gathering_beat_leader",
            "1 while this beat holds the leader lease.",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.sweeper_recoveries = Counter(
            "gathering_sweeper_recoveries",
            "Records the sweeper re-published (lost messages) or recovered (dead workers).",
            ["action"],
            registry=registry,
        )
        for action in ("republished", "recovered"):
            self.sweeper_recoveries.labels(action)
        self.runs = Counter(
            "gathering_runs", "Deliveries of runs by guard outcome.", ["kind", "outcome"],
            registry=registry,
        )  # fmt: skip
        self.run_duration = Histogram(
            "gathering_run_duration_seconds",
            "Seconds a worker spent on a run (outcome written).",
            ["kind"],
            buckets=DURATION_BUCKETS_S,
            registry=registry,
        )


def enabled() -> bool:
    return runtime.settings().metrics_port is not None


@functools.cache
def metrics() -> Metrics:
    """This process's metrics (in a worker's pool, backed by the shared directory)."""
    from prometheus_client import CollectorRegistry, values

    if os.environ.get(MULTIPROC_ENV):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return Metrics(CollectorRegistry(auto_describe=True))


def serve_beat() -> None:
    """Serve this beat's metrics, if enabled."""
    settings = runtime.settings()
    if settings.metrics_port is None:
        return
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port, settings.metrics_address, registry=metrics().registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)


def serve_worker() -> None:
    """In a worker's main process, before its pool starts: samples go to files in a fresh
    directory that the pool inherits, and the main process serves them all."""
    settings = runtime.settings()
    if settings.metrics_port is None:
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    path = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="gathering-metrics-"))
    shutil.rmtree(path, ignore_errors=True)  # samples of an earlier worker are not ours
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    start_http_server(settings.metrics_port, settings.metrics_address, registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_address, settings.metrics_port)


def process_exited(pid: int) -> None:
    """A pool process ended: drop its live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def claimed(dispatches: Iterable[Dispatch], now: datetime) -> None:
    if not enabled():
        return
    m = metrics()
    for dispatch in dispatches:
        m.slots_claimed.inc()
        if dispatch.slot is not None:
            m.dispatch_lag.observe(max(0.0, (now - dispatch.slot).total_seconds()))


def leading(is_leader: bool) -> None:
    if enabled():
        metrics().beat_leader.set(1 if is_leader else 0)


def swept(*, republished: int, recovered: int) -> None:
    if enabled():
        m = metrics()
        m.sweeper_recoveries.labels("republished").inc(republished)
        m.sweeper_recoveries.labels("recovered").inc(recovered)


def ran(kind: str, outcome: str, duration_s: float) -> None:
    if not enabled():
        return
    m = metrics()
    m.runs.labels(kind, outcome).inc()
    if outcome != "dropped":
        m.run_duration.labels(kind).observe(duration_s)
