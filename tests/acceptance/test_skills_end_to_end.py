"""call_api and send_notification actions through a real beat and worker; time limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from gathering_tasks.api import ActionService
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import InvalidInput
from gathering_tasks.settings import Settings, get_settings
from tests.acceptance.procs import running_stack, stack_env
from tests.servers import wait_for

pytestmark = pytest.mark.acceptance
SECRET = "whsec-test-only-not-a-real-secret"


@pytest.fixture(scope="session")
def httpserver_listen_address() -> tuple[str, int]:
    # Loopback by address: the name "localhost" is refused by the SSRF guard, by design.
    return ("127.0.0.1", 0)


def once_soon(name: str, action_type: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    at = datetime.now(UTC) + timedelta(seconds=2)
    return {
        "name": name,
        "action_type": action_type,
        "config": config,
        "schedule": {"kind": "once", "at": at.isoformat()},
        "retry_max_attempts": 1,
        **extra,
    }


@pytest.fixture(autouse=True)
def _process_settings_forgotten() -> Iterator[None]:
    """The settings cached while this process's environment was patched do not outlive it."""
    yield
    get_settings.cache_clear()


def creating_with(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, repo: Repository, **env: str
) -> ActionService:
    """A service whose creation-time checks see ``env``: through ``settings`` and through
    this process's settings (which they read when the service does not pass its own)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    changes = {name.removeprefix("GATHERING_").lower(): value for name, value in env.items()}
    lists = {"http_allow_networks", "secret_env_allow"}
    update = {k: v.split(",") if k in lists else v for k, v in changes.items()}
    return ActionService(repo, settings.model_copy(update=update), task_allowed=lambda _n: True)


def final_run(repo: Repository, action: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = repo.ledger.list_runs(action=action)
        if runs and runs[0]["status"] not in ("pending", "running", "retrying"):
            return runs[0]
        return None

    result: dict[str, Any] = wait_for(done, 60, f"the run of {action} to finish")
    return result


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_http_and_notification_actions_record_their_outcome(
    db_url: str,
    redis_url: str,
    settings: Settings,
    repo: Repository,
    tmp_path: Path,
    httpserver: HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
):
    # Given a local API and webhook receiver on 127.0.0.1
    received: list[Request] = []

    def hook(request: Request) -> Response:
        received.append(request)
        return Response("{}", status=200, content_type="application/json")

    httpserver.expect_request("/api/ok", method="POST").respond_with_json({"created": 7})
    httpserver.expect_request("/api/missing").respond_with_data("nope", status=404)
    httpserver.expect_request("/hook", method="POST").respond_with_handler(hook)
    allow = {
        "GATHERING_HTTP_ALLOW_NETWORKS": "127.0.0.1/32",
        "GATHERING_SECRET_ENV_ALLOW": "TEST_*",
    }
    svc = creating_with(monkeypatch, settings, repo, **allow)
    svc.create(
        once_soon(
            "api-ok",
            "call_api",
            {"method": "POST", "url": httpserver.url_for("/api/ok"), "json": {"a": 1}},
        )
    )
    svc.create(once_soon("api-404", "call_api", {"url": httpserver.url_for("/api/missing")}))
    # (the metadata URL is refused at creation; created where the dangerous setting opens it,
    # it is refused again by the worker, which does not)
    metadata = once_soon(
        "api-ssrf", "call_api", {"url": "http://169.254.169.254/latest/meta-data/"}
    )
    with pytest.raises(InvalidInput) as refused:
        svc.create(metadata)
    assert refused.value.field == "config.url" and "(cloud-metadata)" in refused.value.reason
    dangerous = {
        "GATHERING_HTTP_ALLOW_METADATA_ADDRESS_I_KNOW_THIS_IS_DANGEROUS": "169.254.169.254"
    }
    creating_with(monkeypatch, settings, repo, **allow, **dangerous).create(metadata)
    monkeypatch.delenv("GATHERING_HTTP_ALLOW_METADATA_ADDRESS_I_KNOW_THIS_IS_DANGEROUS")
    get_settings.cache_clear()
    svc.create(
        once_soon(
            "notify",
            "send_notification",
            {
                "channel": "webhook",
                "url": httpserver.url_for("/hook"),
                "secret_env": "TEST_WEBHOOK_SECRET",
                "title": "Backup done",
                "text": "All good",
            },
        )
    )
    svc.create(
        once_soon(
            "slow", "run_task", {"task": "demo.sleep", "kwargs": {"seconds": 30}}, timeout_s=1
        )
    )
    env = stack_env(db_url, redis_url, TEST_WEBHOOK_SECRET=SECRET)
    with running_stack(env, tmp_path) as stack:
        stack.worker("w1", concurrency=4)
        stack.beat("b1")
        ok, missing, ssrf = (
            final_run(repo, "api-ok"),
            final_run(repo, "api-404"),
            final_run(repo, "api-ssrf"),
        )
        notify, slow = final_run(repo, "notify"), final_run(repo, "slow")
        logs = stack.logs()

    # Then each run record shows its real outcome
    assert ok["status"] == "succeeded", (ok["error"], ok["result"])
    assert ok["result"]["status_code"] == 200 and ok["result"]["json"] == {"created": 7}
    assert missing["status"] == "failed" and "404" in missing["error"]
    assert ssrf["status"] == "failed" and "169.254.169.254" not in json.dumps(ssrf.get("result"))
    assert "refused" in ssrf["error"]
    assert notify["status"] == "succeeded", notify
    assert slow["status"] == "timed_out", slow
    # And the webhook carried a signature a receiver can verify, and the run's key
    (request,) = received
    msg_id = request.headers["webhook-id"]
    assert msg_id == notify["idempotency_key"]
    signed = f"{msg_id}.{request.headers['webhook-timestamp']}.{request.get_data(as_text=True)}"
    expected = base64.b64encode(hmac.new(SECRET.encode(), signed.encode(), hashlib.sha256).digest())
    assert f"v1,{expected.decode()}" in request.headers["webhook-signature"].split(" ")
    # And no secret reached the logs
    assert SECRET not in logs
