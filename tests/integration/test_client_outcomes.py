"""The client finds the run its message made (by key, else message id) and waits for its end."""

from __future__ import annotations

import pytest

from gathering_tasks.api import ActionService, PipelineService
from gathering_tasks.client import GatheringClient
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import WaitTimedOut
from gathering_tasks.settings import Settings
from tests.factories import make_guard

PIPELINE = {
    "nodes": [
        {"id": "start", "type": "trigger"},
        {
            "id": "sum",
            "type": "action",
            "config": {"action_type": "run_task", "config": {"task": "demo.add", "args": [1, 2]}},
        },
    ],
    "edges": [{"from": "start", "to": "sum"}],
}


def test_a_trigger_is_found_by_its_key_and_waited_for(
    db_url: str, redis_url: str, repo: Repository, settings: Settings
):
    # Given a trigger recorded under a caller's key (as gathering.trigger_action records it)
    service = ActionService(repo, settings, task_allowed=lambda _n: True)
    service.create(
        {
            "name": "nightly",
            "action_type": "run_task",
            "config": {"task": "demo.add", "args": [1, 2]},
            "schedule": {"kind": "interval", "every_s": 3600},
        }
    )
    run_id = service.trigger("nightly", trigger="api", key="deploy-42")
    client = GatheringClient(redis_url, database_url=db_url)
    try:
        # Then the client finds it, and a wait gives up while it is queued
        assert client.find_action_run("nightly", "other-key") is None
        found = client.find_action_run("nightly", "deploy-42")
        assert found is not None and (found["id"], found["status"]) == (run_id, "pending")
        with pytest.raises(WaitTimedOut, match=r"is still pending after 0\.2s"):
            client.wait_action_run("nightly", "deploy-42", timeout_s=0.2, poll_s=0.05)
        # When a worker's guard runs it, the wait returns the final record
        make_guard(repo, settings).execute(
            run_id, "run_task", lambda _r, _a: {"ok": 1}, worker="w", task_id="t"
        )
        done = client.wait_action_run("nightly", "deploy-42", timeout_s=5, poll_s=0.05)
        assert (done["status"], done["result"]) == ("succeeded", {"ok": 1})
    finally:
        client.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_pipeline_run_is_found_by_its_key(
    db_url: str, redis_url: str, repo: Repository, settings: Settings
):
    pipelines = PipelineService(repo, settings, task_allowed=lambda _n: True)
    pipelines.create("orders", PIPELINE)
    run_id = pipelines.run("orders", {"order": 7}, key="order-7")
    client = GatheringClient(redis_url, database_url=db_url)
    try:
        found = client.find_pipeline_run("order-7")
        assert found is not None and (found["id"], found["status"]) == (run_id, "running")
        with pytest.raises(WaitTimedOut, match="still running"):
            client.wait_pipeline_run("order-7", timeout_s=0.2, poll_s=0.05)
        pipelines.cancel(run_id)
        assert client.wait_pipeline_run("order-7", timeout_s=5)["status"] == "cancelled"
    finally:
        client.close()


def test_finding_runs_needs_a_database_url(redis_url: str):
    client = GatheringClient(redis_url)
    try:
        with pytest.raises(ValueError, match="database_url"):
            client.find_pipeline_run("k")
    finally:
        client.close()
