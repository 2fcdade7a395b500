"""The Celery app: the only global. ``celery -A gathering_tasks worker|beat|flower``.

Beat and Flower import this module too, and neither executes a task: what only a worker runs
(the task modules, the executors, the ORM's mappers, the worker's metrics) is imported by the
worker's start-up signals below, not here.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from celery.signals import (
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from gathering_tasks.errors import GatheringError
from gathering_tasks.keys import POOL_START_MARGIN_S
from gathering_tasks.kinds import KINDS, resolve
from gathering_tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)


# Celery's default queue: where ``send_task`` puts a message that names no queue.
CELERY_DEFAULT_QUEUE = "celery"

# The modules of our Celery tasks: imported by workers only (see :func:`_register_tasks`).
TASK_MODULES = ("gathering_tasks.tasks",)


def worker_queues(settings: Settings) -> tuple[Queue, ...]:
    """The queues a worker consumes unless ``-Q`` says otherwise (docs/contract.md)."""
    name = settings.default_queue
    names = [name]
    if settings.consume_celery_queue and name != CELERY_DEFAULT_QUEUE:
        names.append(CELERY_DEFAULT_QUEUE)
    # Each queue bound to its own direct exchange: what a plain client declares for it.
    return tuple(Queue(n, Exchange(n), routing_key=n) for n in names)  # type: ignore[no-untyped-call]


def pool_start_timeout_s(settings: Settings) -> float:
    """How long the worker waits for a new pool process (see :func:`_open_connections`)."""
    timeouts = settings.db_timeouts
    return timeouts.connect_s + timeouts.statement_s + POOL_START_MARGIN_S


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours; the reasons live in docs/guarantees.md."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # Messages are redelivered only after their task could no longer be running.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        # Run records are the results; Celery's result backend is not used.
        "task_ignore_result": True,
        "result_backend": None,
        # JSON only: never pickle, in either direction.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A message is acknowledged after its task ran; a killed worker's message comes back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": max(1, settings.task_time_limit_s - 5),
        "task_default_queue": settings.default_queue,
        "task_default_exchange": settings.default_queue,
        "task_default_routing_key": settings.default_queue,
        "task_queues": worker_queues(settings),
        # Flower sees everything.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "beat_scheduler": "gathering_tasks.beat:DatabaseScheduler",
        "beat_max_loop_interval": settings.beat_tick_s,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A pool process opens its database connection before it reports for work: the
        # wait for it covers a connect and the schema check, each within its own bound.
        "worker_proc_alive_timeout": pool_start_timeout_s(settings),
        # The user's modules (GATHERING_IMPORTS): handlers and Celery tasks, imported by every
        # process that starts the app. Our own tasks are the workers' alone (TASK_MODULES).
        "imports": tuple(settings.imports),
    }


app = Celery("gathering_tasks")
app.conf.update(celery_config(get_settings()))


class _RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, with a ``close()`` that survives the broker vanishing.

    ``close()`` first reads the reply of the outstanding BRPOP; with the broker gone that read
    raises before the channel is marked closed. The worker swallows the error, detaches the
    transport, and closes the channel a second time, which tries to requeue the unacknowledged
    messages through the detached transport, raises ``AttributeError`` and stops the worker
    ("Unrecoverable error") instead of reconnecting (kombu 5.7, Celery 5.7; any worker that
    has a task running and a free slot when Redis restarts). Finishing the close at once, while
    the transport is still attached, leaves nothing for the second close to do.
    """

    def close(self) -> None:
        try:
            super().close()  # type: ignore[no-untyped-call]
        except self.connection_errors:
            if self.closed:
                raise
            super().close()  # type: ignore[no-untyped-call]


class RedisTransport(kombu_redis.Transport):
    """The Redis transport of the worker's broker connections (see :class:`_RedisChannel`)."""

    Channel = _RedisChannel


def _worker_transport(conf: Any, **_kwargs: Any) -> None:
    # Only a worker consumes (BRPOP, unacknowledged messages), so only it needs the fix; beat
    # and Flower keep the stock transport, whose redis:// URL Flower's broker page relies on.
    if urlsplit(conf.broker_url).scheme == "redis":
        conf.broker_transport = f"{__name__}:RedisTransport"


def _register_tasks(**_kwargs: Any) -> None:
    """Register our tasks (``gathering.*``) in a worker, before it consumes.

    Not in Celery's ``imports``: ``celery beat`` imports those too, and beat only publishes by
    task name; the task modules (the guard, the payload schemas, tenacity, jsonschema) would
    only make it bigger. ``celeryd_init`` comes first in ``celery worker``; ``worker_init``
    also comes in a worker started in-process. Both come before the worker consumes, and
    before its pool forks. Importing a module a second time does nothing.
    """
    for module in TASK_MODULES:
        importlib.import_module(module)


def _worker_preload(**_kwargs: Any) -> None:
    """Before the pool forks, import what a pool process executes and configure the ORM.

    Done lazily instead, every pool process paid it on its first task (~0.1 s of CPU each,
    all of them at once on a worker's first burst): the first slots ran a second late.
    Imports only, no connection: the pool's processes inherit them through fork.
    """
    from sqlalchemy.orm import configure_mappers

    for entry in KINDS.values():
        resolve(entry.executor)
    configure_mappers()


def _worker_metrics(**_kwargs: Any) -> None:
    from gathering_tasks import metrics

    # Before the pool forks: its processes inherit where to write their samples.
    metrics.serve_worker()


def _pool_process_exited(pid: int, **_kwargs: Any) -> None:
    from gathering_tasks import metrics

    metrics.process_exited(pid)


def _after_fork(**_kwargs: Any) -> None:
    from gathering_tasks import runtime

    # Pooled DB and Redis connections must not be shared across a fork.
    runtime.reset(after_fork=True)
    _open_connections()


def _open_connections() -> None:
    """Connect this pool process to the database before its first task.

    Left to the first task, the connect and the schema check landed on the first slots'
    runs, every pool process at once when a worker takes its first burst. A database that
    cannot be reached now is the first task's to report.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from gathering_tasks import runtime

    try:
        runtime.repository()
    except (SQLAlchemyError, GatheringError, OSError) as exc:
        log.warning("pool process started without a database connection: %s", exc)


celeryd_init.connect(_worker_transport, weak=False)
celeryd_init.connect(_register_tasks, weak=False)
celeryd_init.connect(_worker_preload, weak=False)
celeryd_init.connect(_worker_metrics, weak=False)
worker_process_shutdown.connect(_pool_process_exited, weak=False)
worker_init.connect(_register_tasks, weak=False)
worker_process_init.connect(_after_fork, weak=False)
