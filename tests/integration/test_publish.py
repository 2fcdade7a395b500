"""Publishing records: the messages Celery's send_task would send, and their task-sent events."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery

from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.kinds import kind
from gathering_tasks.publish import message_labels, message_options, publish

SLOT = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
DISPATCHES = (
    Dispatch(21, "run_task", label="plain", slot=SLOT, attempt=1),
    Dispatch(22, "call_api", queue="other", priority=6, timeout_s=30, label="routed", attempt=2),
    Dispatch(23, "pipeline_node", countdown_s=60, label="delayed"),
)
# What differs between any two sends of the same record (ids, times), or names this process.
PER_SEND = {"id", "root_id", "eta", "correlation_id", "delivery_tag"}


def sent_the_old_way(app: Celery, dispatch: Dispatch) -> None:
    """One ``send_task`` per record, with the labels and options publish() uses."""
    with app.producer_or_acquire() as producer:
        app.send_task(
            kind(dispatch.kind).task_name,
            args=[dispatch.record_id],
            producer=producer,
            countdown=dispatch.countdown_s or None,
            add_to_parent=False,
            **message_labels(dispatch),
            **message_options(dispatch, "gathering"),
        )


def drained(client: redis.Redis) -> list[dict[str, Any]]:
    """Every message on the broker's queues (priorities included), decoded, oldest first."""
    messages = []
    for key in sorted(client.keys("*")):
        if client.type(key) != b"list":
            continue
        while (raw := client.rpop(key)) is not None:
            messages.append(comparable(json.loads(raw)))
    return messages


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(base64.b64decode(message["body"]))
    headers = {k: v for k, v in message["headers"].items() if k not in PER_SEND}
    properties = {k: v for k, v in message["properties"].items() if k not in PER_SEND}
    properties["delivery_info"] = dict(properties["delivery_info"])
    return {**message, "body": body, "headers": headers, "properties": properties}


def test_a_records_message_is_the_one_send_task_sends(celery_app: Celery, redis_url: str):
    client = redis.Redis.from_url(redis_url)
    # Given the records sent one send_task each (how beat published before)
    for dispatch in DISPATCHES:
        sent_the_old_way(celery_app, dispatch)
    expected = drained(client)
    # When the same records are published in one call
    assert publish(celery_app, DISPATCHES, default_queue="gathering") == len(DISPATCHES)
    # Then the broker holds the same messages, routed to the same queues
    assert drained(client) == expected
    assert len(expected) == len(DISPATCHES)


def test_the_task_sent_events_of_one_call_travel_as_one_event_message(
    celery_app: Celery, redis_url: str
):
    # Given a watcher of Celery's event exchange (what Flower listens to)
    client = redis.Redis.from_url(redis_url)
    watcher = client.pubsub()
    watcher.psubscribe("*celeryev*")
    assert watcher.get_message(timeout=5)["type"] == "psubscribe"
    # When records are published
    publish(celery_app, DISPATCHES, default_queue="gathering")
    # Then one task.multi event message says each was sent, under its task id and queue
    event_message = watcher.get_message(timeout=5)
    assert event_message is not None
    assert event_message["channel"].endswith(b"task.multi")
    events = json.loads(base64.b64decode(json.loads(event_message["data"])["body"]))
    messages = {m["headers"]["task"]: m for m in map(json.loads, all_raw(client))}
    assert [event["type"] for event in events] == ["task-sent"] * len(DISPATCHES)
    assert [event["args"] for event in events] == [
        message_labels(d)["argsrepr"] for d in DISPATCHES
    ]
    assert {event["uuid"] for event in events} == {m["headers"]["id"] for m in messages.values()}
    assert [event["queue"] for event in events] == ["gathering", "other", "gathering"]
    assert watcher.get_message(timeout=0.5) is None  # and no event per message besides
    watcher.close()


def all_raw(client: redis.Redis) -> list[bytes]:
    raw: list[bytes] = []
    for key in client.keys("*"):
        if client.type(key) == b"list":
            raw += client.lrange(key, 0, -1)
    return raw
