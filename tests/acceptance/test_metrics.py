"""Prometheus metrics on a real beat and a real worker: off by default, scraped when on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gathering_tasks.api import ActionService
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.acceptance.procs import running_stack, stack_env
from tests.servers import free_port, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def once_soon(name: str, task: str, **extra: object) -> dict[str, object]:
    at = datetime.now(UTC) + timedelta(seconds=2)
    return {
        "name": name,
        "action_type": "run_task",
        "config": {"task": task},
        "schedule": {"kind": "once", "at": at.isoformat()},
        "retry_max_attempts": 1,
        **extra,
    }


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_beat_and_worker_metrics_are_scraped(
    db_url: str, redis_url: str, settings: Settings, repo: Repository, tmp_path: Path
):
    # Given a beat and a worker with metrics on, each on its own port
    beat_port, worker_port = free_port(), free_port()
    env = stack_env(db_url, redis_url)
    svc = ActionService(repo, settings, task_allowed=lambda _n: True)
    svc.create(once_soon("m-ok", "demo.hello"))
    svc.create(once_soon("m-fail", "demo.fail"))
    with running_stack(env, tmp_path) as stack:
        stack.worker("w1", 2, env={**env, "GATHERING_METRICS_PORT": str(worker_port)})
        # (a worker without the setting, on a queue of its own: it serves nothing)
        plain = stack.worker("w-plain", 1, "-Q", "elsewhere")
        beat = stack.beat_with(env={**env, "GATHERING_METRICS_PORT": str(beat_port)})
        # When both slots run
        for name, status in (("m-ok", "succeeded"), ("m-fail", "failed")):
            wait_for(
                lambda n=name, s=status: repo.ledger.list_runs(action=n, status=s),
                90,
                f"{name} to be {status}",
            )

        # Then beat reports its claims, their lag, its leadership and its sweeps
        beat_metrics = wait_for(
            lambda: (m := scrape(beat_port)).get(("gathering_slots_claimed_total", ())) == 2 and m,
            30,
            "beat's claims to be counted",
        )
        worker_metrics = wait_for(
            lambda: (
                (m := scrape(worker_port)).get(
                    ("gathering_runs_total", (("kind", "run_task"), ("outcome", "failed")))
                )
                and m
            ),
            30,
            "the worker's runs to be counted",
        )
        plain_log = plain.log_text()
        beat_log = beat.log_text()
    assert beat_metrics[("gathering_beat_leader", ())] == 1
    assert beat_metrics[("gathering_dispatch_lag_seconds_count", ())] == 2
    assert ("gathering_sweeper_recoveries_total", (("action", "recovered"),)) in beat_metrics
    assert "metrics on http://127.0.0.1" in beat_log
    # And the worker counts runs by outcome, with their duration
    for outcome in ("succeeded", "failed"):
        key = ("gathering_runs_total", (("kind", "run_task"), ("outcome", outcome)))
        assert worker_metrics[key] == 1
    assert worker_metrics[("gathering_run_duration_seconds_count", (("kind", "run_task"),))] == 2
    # And metrics are off by default
    assert "metrics on" not in plain_log
