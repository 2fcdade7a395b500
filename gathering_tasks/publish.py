"""Publishing ledger records to the broker: one task per kind, named by the registry."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu.utils.uuid import uuid

from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.keys import HARD_LIMIT_MARGIN_S
from gathering_tasks.kinds import kind

log = logging.getLogger(__name__)


def message_labels(dispatch: Dispatch) -> dict[str, str]:
    """What Flower and the worker log show for a record's message, instead of ``[22]``.

    ``shadow`` names the task after the kind and the record (``run_task nightly-report``);
    ``argsrepr`` says which run, slot and attempt. Only names and numbers: a record's config
    (which may hold credentials) never travels in a message.
    """
    task = kind(dispatch.kind).task_name
    parts = [f"run={dispatch.record_id}"]
    if dispatch.label:
        parts.append(f"name={dispatch.label}")
    if dispatch.slot is not None:
        parts.append(f"slot={dispatch.slot.isoformat()}")
    if dispatch.attempt is not None:
        parts.append(f"attempt={dispatch.attempt}")
    shadow = f"{dispatch.kind} {dispatch.label}" if dispatch.label else task
    return {"shadow": shadow, "argsrepr": " ".join(parts), "kwargsrepr": "{}"}


def message_options(dispatch: Dispatch, default_queue: str) -> dict[str, Any]:
    """Routing and time limits of a record's message (JSON payload: the record id only)."""
    options: dict[str, Any] = {"queue": dispatch.queue or default_queue}
    if dispatch.priority is not None:
        options["priority"] = dispatch.priority
    if dispatch.timeout_s:
        options["soft_time_limit"] = dispatch.timeout_s
        options["time_limit"] = dispatch.timeout_s + HARD_LIMIT_MARGIN_S
    return options


def publish(
    app: Celery, dispatches: Iterable[Dispatch], *, default_queue: str, countdown_s: float = 0.0
) -> int:
    """Publish each record on one reused producer connection. Returns how many were sent.

    Each message is what ``app.send_task`` sends (Celery builds it, and sends it with its
    own ``send_task_message``), without the work ``send_task`` repeats per message that a
    record's message does not need: routing by task name (a record names its queue), the
    queue declared again for every message, and a ``task-sent`` event per message. With
    ``task_send_sent_event`` (Flower's "sent" state) the events of one call go as one event
    message after the tasks (Celery's ``task.multi``: a list of events).
    """
    with app.producer_or_acquire() as producer:
        sender = _Sender(app, producer, default_queue=default_queue, countdown_s=countdown_s)
        with producer.batch():
            # kombu >= 5.7: the Redis commands of every message go in pipelined round
            # trips, flushed when the batch closes.
            for dispatch in dispatches:
                sender.send(dispatch)
        if sender.sent_events:
            _send_sent_events(app, producer, sender.sent_events)
    return sender.sent


class _Sender:
    """The messages of one :func:`publish` call, on one producer."""

    def __init__(self, app: Celery, producer: Any, *, default_queue: str, countdown_s: float):
        self.app, self.producer = app, producer
        self.default_queue, self.countdown_s = default_queue, countdown_s
        self.links = _parent_links(app)
        self.with_events = bool(app.conf.task_send_sent_event)
        self.sent_events: list[dict[str, Any]] = []
        self.declared: set[str] = set()
        self.sent = 0
        # In a batch a publish only buffers (the flush is the write): nothing to retry then.
        # A transport without batches writes at once, under Celery's retry policy.
        self.retry: bool | None = False if _buffers_batches(producer) else None

    def send(self, dispatch: Dispatch) -> None:
        amqp = self.app.amqp
        name = kind(dispatch.kind).task_name
        options = message_options(dispatch, self.default_queue)
        queue = options.pop("queue")
        labels = message_labels(dispatch)
        message = amqp.create_task_message(
            uuid(),
            name,
            [dispatch.record_id],
            {},
            countdown=max(self.countdown_s, dispatch.countdown_s) or None,
            reply_to=self.app.thread_oid,
            time_limit=options.pop("time_limit", None),
            soft_time_limit=options.pop("soft_time_limit", None),
            create_sent_event=self.with_events,
            ignore_result=None,
            **self.links,
            **labels,
        )
        if self.with_events:
            event = {**message.sent_event, "queue": queue, "exchange": "", "routing_key": queue}
            self.sent_events.append(event)
            message = message._replace(sent_event=None)
        # The queue is declared with its first message (kombu remembers it per connection).
        declare: list[Any] | None = [] if queue in self.declared else None
        self.declared.add(queue)
        # send_task also hands the labels' reprs on as message properties: so do we.
        reprs = {"argsrepr": labels["argsrepr"], "kwargsrepr": labels["kwargsrepr"]}
        amqp.send_task_message(
            self.producer,
            name,
            message,
            queue=queue,
            declare=declare,
            retry=self.retry,
            **reprs,
            **options,
        )
        self.sent += 1


def _buffers_batches(producer: Any) -> bool:
    """Whether ``producer.batch()`` buffers on this transport (kombu's own test)."""
    channel = producer.channel
    creates = getattr(channel, "create_publish_batch", None) is not None
    return creates and bool(getattr(channel, "supports_batch_publish", True))


def _parent_links(app: Celery) -> dict[str, Any]:
    """``root_id`` and ``parent_id`` of a message sent from inside a task, as send_task
    sets them (Flower links a pipeline's successors to the node that published them)."""
    parent = app.current_worker_task
    if not parent:
        return {}
    return {"root_id": parent.request.root_id or parent.request.id, "parent_id": parent.request.id}


def _send_sent_events(app: Celery, producer: Any, events: list[dict[str, Any]]) -> None:
    """The ``task-sent`` events of the messages just published, as one event message."""
    with app.events.Dispatcher(
        channel=producer.channel, buffer_group={"task"}, buffer_limit=len(events) + 1
    ) as dispatcher:
        for fields in events:
            dispatcher.send("task-sent", **fields)
        # An event that cannot be sent is dropped: monitoring, not delivery.
        dispatcher.flush(errors=False)
