"""One Celery task per kind of work, from the registry; and the trigger entry point.

Payload contract (docs/contract.md, one JSON Schema per task in ``gathering_tasks/contract``):
``args=[record_id]`` (an integer), JSON only. Every message is checked against its schema
first: one that does not match fails with ``InvalidPayload`` and touches nothing. A delivery
of a record that another worker holds, that is already done, or that is of another kind, acks
and does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded

from gathering_tasks import keys, metrics, runtime
from gathering_tasks.app import app
from gathering_tasks.clock import utcnow
from gathering_tasks.contract import RUN_PIPELINE, TRIGGER_ACTION, check_payload
from gathering_tasks.db.ledger import Dispatch, Record
from gathering_tasks.errors import (
    InvalidInput,
    InvalidPayload,
    NotFound,
    RunFailed,
    RunRetrying,
    RunTimedOut,
    TaskTimedOut,
)
from gathering_tasks.guard import Detached, ExecutionGuard, Executor, GuardConfig, Report
from gathering_tasks.kinds import KINDS, resolve
from gathering_tasks.locks import Lease
from gathering_tasks.policy import describe_error
from gathering_tasks.publish import publish

log = logging.getLogger(__name__)

MAX_TRIGGER_KEY_CHARS = 200
# A batch of pipeline nodes run here grows while it lasts less than this (see _Pace).
BATCH_TARGET_S = 0.05
MAX_BATCH = 32


def _timed(executor: Executor) -> Executor:
    def run(record: Record, abort: Any) -> Mapping[str, Any] | Detached | None:
        try:
            return executor(record, abort)
        except SoftTimeLimitExceeded as exc:
            raise TaskTimedOut(f"run exceeded its time limit ({record.timeout_s}s)") from exc

    return run


def publish_one(dispatch: Dispatch, delay_s: float = 0.0) -> None:
    publish(app, [dispatch], default_queue=runtime.settings().default_queue, countdown_s=delay_s)


def publish_many(dispatches: list[Dispatch]) -> None:
    publish(app, dispatches, default_queue=runtime.settings().default_queue)


def guard() -> ExecutionGuard:
    settings = runtime.settings()
    client = runtime.redis_client()
    config = GuardConfig(
        lease_ttl_s=settings.run_lease_ttl_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        max_result_bytes=settings.max_result_bytes,
        outcome_retry_s=settings.outcome_retry_s,
    )
    return ExecutionGuard(
        runtime.repository().ledger,
        lambda record_id: Lease(
            client, keys.run_lock(settings.key_prefix, record_id), settings.run_lease_ttl_s
        ),
        config,
        publish_retry=publish_one,
        publish_many=publish_many,
    )


# Expected failures: logged as one line without a traceback (the record, or the payload
# check, says what went wrong), FAILURE in Flower, and the message acknowledged.
EXPECTED = (RunFailed, InvalidInput, NotFound)


def _checked(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        check_payload(task.name, args, kwargs)
    except InvalidInput as exc:
        log.warning("message %s refused: %s", task.request.id, exc, extra={"task_name": task.name})
        raise


@dataclass(frozen=True)
class _Keep:
    """Which ready pipeline nodes a task may run itself, without a broker round trip: those
    routed to the queue the task came from, with no countdown and no time limit of their
    own, while the task has run under ``pipeline_inline_budget_s``."""

    queue: str
    default_queue: str
    deadline: float

    def __call__(self, dispatch: Dispatch) -> bool:
        return (
            dispatch.kind == "pipeline_node"
            and not dispatch.countdown_s
            and not dispatch.timeout_s
            and (dispatch.queue or self.default_queue) == self.queue
            and not self.spent
        )

    @property
    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


def _keeper(task: Task) -> _Keep | None:
    """None when the budget is 0, or the task's own message carried time limits (they
    would go on ticking over the next nodes)."""
    settings = runtime.settings()
    budget_s = settings.pipeline_inline_budget_s
    if budget_s <= 0 or any(task.request.timelimit or ()):
        return None
    queue = (task.request.delivery_info or {}).get("routing_key")
    if not queue:
        return None
    return _Keep(queue, settings.default_queue, time.monotonic() + budget_s)


def _execute(
    task: Task, kind_name: str, record_id: int, keep: Callable[[Dispatch], bool] | None = None
) -> Report:
    worker = task.request.hostname or socket.gethostname()
    executor = _timed(resolve(KINDS[kind_name].executor))
    return guard().run(
        record_id, kind_name, executor, worker=worker, task_id=task.request.id, keep=keep
    )


def _execute_batch(
    task: Task, batch: list[Dispatch], keep: _Keep
) -> tuple[list[Report], tuple[Dispatch, ...]]:
    worker = task.request.hostname or socket.gethostname()
    executor = _timed(resolve(KINDS["pipeline_node"].executor))
    return guard().run_many(
        [d.record_id for d in batch],
        "pipeline_node",
        executor,
        worker=worker,
        task_id=task.request.id,
        keep=keep,
        started=[d.started for d in batch if d.started is not None],
    )


class _Pace:
    """How many ready nodes the next batch takes: one at first (a node may take seconds,
    and then each should have a worker of its own), twice as many after each batch while
    a batch stays under ``BATCH_TARGET_S``, at most ``MAX_BATCH``."""

    def __init__(self) -> None:
        self.size = 1

    def ran(self, nodes: int, elapsed_s: float) -> None:
        if nodes <= 0:
            return
        per_node_s = max(elapsed_s / nodes, 1e-6)
        fits = max(1, int(BATCH_TARGET_S / per_node_s))
        self.size = max(1, min(MAX_BATCH, 2 * self.size, fits))


def _run_here(task: Task, kept: tuple[Dispatch, ...], keep: _Keep, run_id: int | None) -> int:
    """Run pipeline nodes in this task: first the ready ones ``kept`` (recorded ``pending``
    and not published), then those of the same run still pending, in batches (``_Pace``),
    until none is left that ``keep`` accepts. Each is its own ledger record under its own
    lease, as if it came from its own message. While more are left than this task takes at
    once, one of them is published (once per task): a free worker then joins in, and does
    the same, so a run's branches spread over as many workers as are free. Returns how
    many ran."""
    ran, pace, spare = 0, _Pace(), False
    todo = list(kept)
    while True:
        if not todo and run_id is not None and not keep.spent:
            found = runtime.repository().pipelines.pending_nodes(run_id, limit=4 * pace.size)
            todo = [d for d in found if keep(d)]
            random.shuffle(todo)  # workers draining one run start on different nodes
        if not todo:
            if keep.spent and run_id is not None:
                # Out of budget with nodes left: one message, so that a worker goes on.
                left = runtime.repository().pipelines.pending_nodes(run_id, limit=1)
                if left:
                    _publish_spare(left[0])
            return ran
        batch, rest = sorted(todo[: pace.size], key=_by_record), todo[pace.size :]
        if rest and not spare:
            spare = _publish_spare(rest[-1])
        started = time.monotonic()
        try:
            reports, more = _execute_batch(task, batch, keep)
        except Exception as exc:
            # Not started, or their outcomes not written: their messages go out after all
            # (a delivery of a record that did start is dropped; the sweeper recovers it).
            log.warning(
                "%d pipeline node run(s) could not run here (%s); publishing them",
                len(batch),
                describe_error(exc),
                extra={"pipeline_run_id": run_id},
            )
            with contextlib.suppress(Exception):
                publish_many(batch)
            return ran
        elapsed_s = time.monotonic() - started
        executed = [r for r in reports if r.status != "dropped"]
        for report in executed:
            metrics.ran("pipeline_node", report.status, elapsed_s / len(executed))
            run_id = report.pipeline_run_id or run_id
        ran += len(executed)
        pace.ran(len(executed), elapsed_s)
        # What this batch made ready first; what was offered before may be taken by now.
        todo = list(more)


def _by_record(dispatch: Dispatch) -> int:
    """A batch runs in record order, which is the run's order of its nodes."""
    return dispatch.record_id


def _publish_spare(dispatch: Dispatch) -> bool:
    with contextlib.suppress(Exception):
        publish_one(dispatch)
        return True
    return False


def _joins_in(kind_name: str, report: Report) -> bool:
    """Any node's message: its run may still have pending nodes for this worker to take
    part in. It came after its record was taken (by a worker running the run's nodes), or
    it is the one a task sent on for the rest when its inline budget ran out."""
    return kind_name == "pipeline_node"


def _describe(report: Report) -> str:
    who = f"run {report.record_id}" + (f" ({report.name})" if report.name else "")
    return who + (f" attempt {report.attempt}" if report.attempt is not None else "")


def celery_outcome(report: Report) -> str:
    """Tell Celery (and so Flower) what the record says, once the record is written.

    ``failed`` and ``timed_out`` raise :class:`RunFailed` / :class:`RunTimedOut` (FAILURE);
    ``retrying`` raises :class:`celery.exceptions.Retry` (RETRY; the retry's message was
    already published by the guard, and raising ``Retry`` publishes nothing more). Every
    other outcome is a SUCCESS whose result names it: ``succeeded: ...``, ``waiting: ...``,
    ``cancelled: ...``, ``superseded: ...``, ``dropped: ...``. The message is acknowledged in
    every case.
    """
    text = _describe(report)
    if report.status == "failed":
        raise RunFailed(f"{text} failed: {report.error or 'no error recorded'}")
    if report.status == "timed_out":
        raise RunTimedOut(f"{text} timed out: {report.error or 'no error recorded'}")
    if report.status == "retrying":
        delay_s = report.retry_delay_s or 0.0
        reason = RunRetrying(f"{text} failed, retrying in {delay_s:g}s: {report.error}")
        raise Retry(str(reason), exc=reason, when=delay_s)
    if report.status == "dropped":
        return f"dropped: {text}: {report.detail or 'not startable'} (duplicate delivery)"
    if report.status == "superseded":
        return f"superseded: {text} was taken over by another attempt; its outcome was not kept"
    return f"{report.status}: {text}"


def _register(kind_name: str) -> Any:
    summary = KINDS[kind_name].summary

    def run(self: Task, *args: Any, **kwargs: Any) -> str:
        _checked(self, args, kwargs)
        started = time.monotonic()
        keep = _keeper(self)
        report = _execute(self, kind_name, args[0], keep)
        metrics.ran(kind_name, report.status, time.monotonic() - started)
        if keep is not None and (report.kept or _joins_in(kind_name, report)):
            run_id = report.pipeline_run_id
            if run_id is None and kind_name == "pipeline_node":
                run_id = runtime.repository().pipelines.run_of(report.record_id)
            ran = _run_here(self, report.kept, keep, run_id)
            log.info(
                "ran %d more pipeline node(s) in this task",
                ran,
                extra={"run_id": report.record_id, "pipeline_run_id": run_id},
            )
        return celery_outcome(report)

    run.__name__ = kind_name
    run.__doc__ = f"Execute a {kind_name} run ({summary}) under the guard."
    # Expected failures are logged without a traceback; the record holds the details.
    return app.task(name=KINDS[kind_name].task_name, bind=True, throws=(RunFailed, InvalidInput))(
        run
    )


# Registered without decorator syntax: Celery is untyped, and the task objects are Any.
TASKS: dict[str, Any] = {name: _register(name) for name in KINDS}


def _dedupe_key(key: Any, message_id: Any) -> str:
    dedupe = key if key is not None else message_id
    if not isinstance(dedupe, str) or not dedupe or len(dedupe) > MAX_TRIGGER_KEY_CHARS:
        raise InvalidInput(
            f"must be a non-empty string of at most {MAX_TRIGGER_KEY_CHARS} characters",
            field="key",
        )
    return dedupe


def _trigger_action(self: Task, *args: Any, **kwargs: Any) -> int:
    """Entry point for other services: run ``action_name`` now (trigger ``api``).

    Deduplicated on ``key`` (the caller's own), or else on the message id: a message
    delivered twice makes one run, and its publish is repeated only while it is queued.
    """
    _checked(self, args, kwargs)
    action_name, key = _bind(args, kwargs, ("action_name", "key"))
    dedupe = _dedupe_key(key, self.request.id)
    dispatch, status = runtime.repository().claims.trigger(
        action_name, now=utcnow(), trigger="api", key=dedupe
    )
    if status == "pending":
        publish_one(dispatch)
    log.info(
        "action %s triggered by another service",
        action_name,
        extra={"run_id": dispatch.record_id, "status": status},
    )
    return dispatch.record_id


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
    """Positional and keyword arguments, by name (the schema already checked them)."""
    values = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name in values:
            raise InvalidPayload("given twice (in args and kwargs)", field=name)
        values[name] = value
    return [values.get(name) for name in names]


trigger_action: Any = app.task(name=TRIGGER_ACTION, bind=True, throws=EXPECTED)(_trigger_action)


def _run_pipeline(self: Task, *args: Any, **kwargs: Any) -> int:
    """Entry point for other services: start a run of ``pipeline_name`` with ``data``.

    Deduplicated like ``trigger_action``: on ``key``, or else on the message id."""
    _checked(self, args, kwargs)
    pipeline_name, data, key = _bind(args, kwargs, ("pipeline_name", "data", "key"))
    dedupe = _dedupe_key(key, self.request.id)
    started = runtime.repository().pipelines.start_run(
        pipeline_name, data=dict(data or {}), dedupe_key=f"api:{dedupe}", now=utcnow()
    )
    if started.dispatches:
        publish_many(started.dispatches)
    log.info(
        "pipeline %s started by another service",
        pipeline_name,
        extra={"pipeline_run_id": started.run_id},
    )
    return started.run_id


run_pipeline: Any = app.task(name=RUN_PIPELINE, bind=True, throws=EXPECTED)(_run_pipeline)
run_task = TASKS["run_task"]
execute_pipeline = TASKS["execute_pipeline"]
send_notification = TASKS["send_notification"]
call_api = TASKS["call_api"]
