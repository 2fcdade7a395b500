"""Beat survives a publish that fails mid-batch; the sweeper delivers the runs later."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from kombu.exceptions import BatchPublishError

from gathering_tasks import beat, keys
from gathering_tasks.beat import BeatEngine
from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.db.repo import Repository
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings
from tests.factories import once_action


def test_a_batch_publish_that_fails_mid_flush_does_not_stop_beat(
    repo: Repository, settings: Settings, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
):
    # Given a due action, and a broker that drops the connection while a batch is flushed
    now = datetime.now(UTC)
    once_action(repo, settings, now, name="due")

    def failing_publish(*_args: object, **_kwargs: object) -> int:
        raise BatchPublishError("Redis publish batch failed; delivery is uncertain")

    monkeypatch.setattr(beat, "publish", failing_publish)
    lease = Lease(redis.Redis.from_url(settings.redis_url), keys.beat_leader("t"), 5)
    engine = BeatEngine(settings, repo, lease, celery_app)

    # When beat ticks
    sleep_s = engine.tick()

    # Then the tick reports the failure instead of raising (which would end the beat process),
    # and the claimed run waits, pending, for the sweeper
    assert sleep_s == settings.beat_tick_s
    (run,) = repo.ledger.list_runs()
    assert run["status"] == "pending"
    published: list[Dispatch] = []

    def record(_app: object, dispatches: list[Dispatch], **_kw: object) -> int:
        published.extend(dispatches)
        return len(dispatches)

    monkeypatch.setattr(beat, "publish", record)
    later = now + timedelta(seconds=settings.pending_grace_s + 1)
    engine.sweep(later)
    assert [dispatch.record_id for dispatch in published] == [run["id"]]
