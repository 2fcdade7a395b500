"""Flower against a real worker: readable names, true states, no secrets in any answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from celery import Celery
from pytest_httpserver import HTTPServer

from gathering_tasks.api import ActionService
from gathering_tasks.app import celery_config
from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.db.repo import Repository
from gathering_tasks.publish import publish
from gathering_tasks.settings import Settings
from tests.acceptance.procs import ROOT, running_stack, stack_env
from tests.servers import free_port, wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]
HOOK_SECRET = "whsec-flower-test-0f9a8b7c6d"
API_TOKEN = "tok-flower-test-5e4d3c2b1a"
AUTH = ("ops", "flower-test-password")


@pytest.fixture(scope="session")
def httpserver_listen_address() -> tuple[str, int]:
    return ("127.0.0.1", 0)


def interval(name: str, action_type: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    # Never fired by a beat (none runs here): each run is a trigger.
    return {
        "name": name,
        "action_type": action_type,
        "config": config,
        "schedule": {"kind": "interval", "every_s": 86_400},
        **extra,
    }


@pytest.fixture
def flower(tmp_path: Path, redis_url: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATHERING_", "FLOWER_"))}
    env.update(
        GATHERING_REDIS_URL=redis_url,
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH=":".join(AUTH),
        PYTHONPATH=str(ROOT),
    )
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "gathering_tasks", "flower",
         f"--conf={ROOT / 'config' / 'flowerconfig.py'}"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(base, auth=AUTH, timeout=2).ok, 60, "Flower to answer")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


PROBE = "flower-test-probe"


def tasks_by_name(base: str) -> dict[str, list[dict[str, Any]]]:
    """Flower's tasks by name (the probe of :func:`listening` left out)."""
    answer = requests.get(f"{base}/api/tasks", auth=AUTH, timeout=5)
    answer.raise_for_status()
    out: dict[str, list[dict[str, Any]]] = {}
    for task in answer.json().values():
        if task.get("name") != PROBE:
            out.setdefault(str(task.get("name")), []).append(task)
    return out


def listening(base: str, app: Celery) -> None:
    """Wait until Flower receives events: an event sent before it subscribed is lost to it
    (Redis fan-out), and its web page answers before its event consumer is connected."""

    def seen() -> bool:
        with app.events.default_dispatcher() as dispatcher:
            dispatcher.send("task-sent", uuid=uuid.uuid4().hex, name=PROBE)
        answer = requests.get(f"{base}/api/tasks", auth=AUTH, timeout=5)
        return any(t.get("name") == PROBE for t in answer.json().values())

    wait_for(seen, 60, "Flower to receive events", interval_s=0.2)


def states(tasks: list[dict[str, Any]]) -> list[str]:
    return sorted(str(t["state"]) for t in tasks)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_flower_shows_names_true_states_and_no_secret(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    tmp_path: Path,
    httpserver: HTTPServer,
    flower: str,
):
    # Given actions that succeed, fail after a retry, fail on HTTP 500 and sign a webhook,
    # whose secrets live only in the worker's environment
    httpserver.expect_request("/hook", method="POST").respond_with_json({})
    httpserver.expect_request("/broken").respond_with_data("down", status=500)
    app = Celery("flower-test", set_as_current=False)
    app.conf.update(celery_config(settings))
    sent: list[Dispatch] = []

    def send(dispatch: Dispatch) -> None:
        sent.append(dispatch)
        publish(app, [dispatch], default_queue=settings.default_queue)

    # the workers' allowlist (stack_env) names TEST_*; the creating side must agree
    creating = settings.model_copy(update={"secret_env_allow": ["TEST_*"]})
    svc = ActionService(repo, creating, task_allowed=lambda _n: True, publish=send)
    svc.create(interval("flower-good", "run_task", {"task": "demo.add", "args": [1, 2]}))
    svc.create(
        interval(
            "flower-fail", "run_task", {"task": "demo.fail"}, retry_max_attempts=2,
            retry_backoff_s=0, retry_backoff_max_s=0,
        )
    )  # fmt: skip
    svc.create(
        interval(
            "flower-api",
            "call_api",
            {
                "url": httpserver.url_for("/broken"),
                "auth": {"type": "bearer", "token_env": "TEST_FLOWER_API_TOKEN"},
                "retry": False,
            },
        )
    )
    svc.create(
        interval(
            "flower-notify",
            "send_notification",
            {
                "channel": "webhook",
                "url": httpserver.url_for("/hook"),
                "secret_env": "TEST_FLOWER_HOOK_SECRET",
                "title": "t",
                "text": "x",
            },
        )
    )
    env = stack_env(
        db_url, redis_url, TEST_FLOWER_HOOK_SECRET=HOOK_SECRET, TEST_FLOWER_API_TOKEN=API_TOKEN
    )
    listening(flower, app)
    with running_stack(env, tmp_path) as stack:
        worker = stack.worker("w1", concurrency=2)
        wait_for(lambda: " ready." in worker.log_text(), 60, "the worker to be ready")
        # When each is triggered, and the good run's message is delivered a second time
        runs = {name: svc.trigger(name) for name in ("flower-good", "flower-fail", "flower-api")}
        runs["flower-notify"] = svc.trigger("flower-notify")
        for name, run_id in runs.items():
            wait_for(
                lambda r=run_id: (
                    repo.ledger.get(r)["status"] not in ("pending", "running", "retrying")
                ),
                60,
                f"the run of {name} to finish",
            )
        publish(app, [sent[0]], default_queue=settings.default_queue)

        # Then Flower names each task after its action and shows the state the record has
        def settled() -> dict[str, list[dict[str, Any]]] | None:
            seen = tasks_by_name(flower)
            done = {"SUCCESS", "FAILURE", "RETRY"}
            if len(seen.get("run_task flower-good", [])) < 2:
                return None
            if len(seen.get("run_task flower-fail", [])) < 2:  # the retry, then the failure
                return None
            if any(t["state"] not in done for group in seen.values() for t in group):
                return None
            return seen

        seen = wait_for(settled, 60, "Flower to see every task end")
        logs = stack.logs()
    statuses = {name: repo.ledger.get(run_id)["status"] for name, run_id in runs.items()}
    assert statuses == {
        "flower-good": "succeeded",
        "flower-fail": "failed",
        "flower-api": "failed",
        "flower-notify": "succeeded",
    }, logs
    assert states(seen["run_task flower-fail"]) == ["FAILURE", "RETRY"], seen
    assert states(seen["call_api flower-api"]) == ["FAILURE"]
    assert states(seen["send_notification flower-notify"]) == ["SUCCESS"]
    good = sorted(seen["run_task flower-good"], key=lambda t: t["received"])
    assert states(good) == ["SUCCESS", "SUCCESS"]
    assert str(good[0]["result"]).startswith("'succeeded: run ")
    # And the second delivery of the good run is visibly a dropped duplicate
    assert str(good[1]["result"]).startswith("'dropped: run "), good[1]
    # And the arguments say which run, name and attempt; the failure says why
    assert f"run={runs['flower-good']} name=flower-good" in good[0]["args"]
    failure = next(t for t in seen["run_task flower-fail"] if t["state"] == "FAILURE")
    assert (
        "RunFailed" in failure["exception"]
        and "this handler always fails" in (failure["exception"])
    )
    assert "attempt=2" in failure["args"]

    # And no Flower page or API answer holds a secret from an action's environment
    urls = [
        "/",
        "/tasks",
        "/workers",
        "/broker",
        "/api/tasks",
        "/api/task/types",
        "/api/workers",
        "/api/workers?refresh=1",
        "/api/queues/length",
    ]
    for group in seen.values():
        for task in group:
            urls += [f"/task/{task['uuid']}", f"/api/task/info/{task['uuid']}"]
    pages = {url: requests.get(f"{flower}{url}", auth=AUTH, timeout=10) for url in urls}
    assert all(page.status_code == 200 for page in pages.values()), {
        url: page.status_code for url, page in pages.items()
    }
    for url, page in pages.items():
        assert HOOK_SECRET not in page.text and API_TOKEN not in page.text, url
    # And the API stays closed without credentials
    assert requests.get(f"{flower}/api/tasks", timeout=5).status_code == 401
