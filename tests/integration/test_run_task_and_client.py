"""run_task's allowlist, and the client other services use to enqueue by task name."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from gathering_tasks.app import app
from gathering_tasks.client import GatheringClient
from gathering_tasks.db.ledger import Record
from gathering_tasks.errors import PermanentFailure
from gathering_tasks.settings import get_settings
from gathering_tasks.work import execute_run_task as _execute_run_task
from gathering_tasks.work import task_allowed


def context(config: dict[str, object]) -> Record:
    return Record(
        id=7,
        kind="run_task",
        attempt=1,
        definition={"name": "a", "config": config, "retry_max_attempts": 1},
        idempotency_key="gathering-slot-1-0",
        trigger="schedule",
        action_id=1,
        scheduled_for=datetime(2026, 1, 1, tzinfo=UTC),
    )


def execute_run_task(record: Record) -> object:
    return _execute_run_task(record, threading.Event())


@pytest.fixture
def allowlist(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("GATHERING_RUN_TASK_ALLOWLIST", "tests.multiply")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _multiply(a: int, b: int) -> int:
    return a * b


multiply = app.task(name="tests.multiply")(_multiply)


def test_allowlisted_celery_task_runs_in_the_worker(allowlist: None):
    assert task_allowed("tests.multiply")
    result = execute_run_task(context({"task": "tests.multiply", "args": [6, 7]}))
    assert result == {"value": 42}


def test_registered_handler_gets_the_run_context():
    result = execute_run_task(context({"task": "demo.hello", "kwargs": {"who": "you"}}))
    assert result == {"greeted": "you"}


@pytest.mark.parametrize("name", ["celery.backend_cleanup", "os.system", "tests.multiply"])
def test_unlisted_task_is_refused(name: str):
    get_settings.cache_clear()
    assert not task_allowed(name)
    with pytest.raises(PermanentFailure, match="not registered or not in the allowlist"):
        execute_run_task(context({"task": name}))


def test_client_publishes_json_by_task_name(redis_url: str):
    client = GatheringClient(redis_url)
    try:
        task_id = client.trigger("nightly-report")
        with pytest.raises(ValueError, match="not a gathering task"):
            client.send("celery.backend_cleanup")
    finally:
        client.close()
    raw = redis.Redis.from_url(redis_url).lpop("gathering")
    assert raw is not None
    message = json.loads(raw)
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "gathering.trigger_action"
    assert message["headers"]["id"] == task_id
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == (["nightly-report"], {})
