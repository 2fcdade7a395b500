"""The contract for other services, through a real worker: the README's snippet, copied as
written, from a process that never imports gathering_tasks; bad payloads refused cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gathering_tasks.api import ActionService
from gathering_tasks.client import GatheringClient
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings
from tests.acceptance.procs import ROOT, running_stack, stack_env
from tests.servers import wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]


def readme_snippet() -> str:
    """The README's "other services" code block, exactly as a user would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (snippet,) = [b for b in blocks if "send_task(" in b]
    return snippet


def run_outside(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a fresh interpreter that must not import gathering_tasks."""
    check = (
        "\nimport sys\n"
        "assert not [m for m in sys.modules if m.startswith('gathering_tasks')], 'imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATHERING_", "PYTHON"))}
    done = subprocess.run(
        [sys.executable, "-c", code + check],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def api_runs(repo: Repository, status: str) -> list[dict[str, object]]:
    return [r for r in repo.ledger.list_runs(action="nightly", status=status)]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_the_readme_snippet_runs_and_bad_payloads_are_refused(
    db_url: str, redis_url: str, settings: Settings, repo: Repository, tmp_path: Path
):
    # Given the action the README names, and a worker started without -Q
    ActionService(repo, settings, task_allowed=lambda _n: True).create(
        {
            "name": "nightly",
            "action_type": "run_task",
            "config": {"task": "demo.add", "args": [2, 3]},
            "schedule": {"kind": "interval", "every_s": 86_400},
        }
    )
    snippet = readme_snippet().replace("redis://...", redis_url)
    assert 'queue="gathering"' in snippet
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        worker = stack.worker("w1", concurrency=2)
        wait_for(lambda: " ready." in worker.log_text(), 60, "the worker to be ready")

        # When another service runs the snippet as written, and once without queue=
        run_outside(snippet, tmp_path)
        run_outside(snippet.replace(', queue="gathering"', ""), tmp_path)

        # Then both messages make a run of the action, and each succeeds
        wait_for(lambda: len(api_runs(repo, "succeeded")) == 2, 60, "both runs to succeed")

        # When payloads that break the contract arrive, from the same plain Celery
        bad = (
            'from celery import Celery\n'
            f'app = Celery(broker="{redis_url}")\n'
            'app.send_task("gathering.run_task", args=["abc"], queue="gathering")\n'
            'app.send_task("gathering.trigger_action", args=[42], queue="gathering")\n'
            'app.send_task("gathering.trigger_action", args=["nightly"], kwargs={"bogus": 1},'
            ' queue="gathering")\n'
            'app.send_task("gathering.trigger_action", args=["no-such-action"],'
            ' queue="gathering")\n'
            'app.send_task("gathering.run_pipeline", args=["p", [1, 2]], queue="gathering")\n'
        )  # fmt: skip
        run_outside(bad, tmp_path)

        # Then each is refused with one line saying where, and the worker keeps working:
        # a client trigger after them runs, and the client waits for its outcome
        client = GatheringClient(redis_url, database_url=db_url)
        try:
            message_id = client.trigger("nightly", key="after-the-bad-ones")
            run = client.wait_action_run("nightly", "after-the-bad-ones", timeout_s=60)
            again = client.find_action_run("nightly", "after-the-bad-ones")
        finally:
            client.close()
        log = worker.log_text()
        assert worker.alive
    assert run["status"] == "succeeded" and run["result"] == {"sum": 5}
    assert again is not None and again["id"] == run["id"] and message_id
    assert "gathering.run_task args[0]: must be of type integer" in log
    assert "gathering.trigger_action args[0]: must be of type string" in log
    assert "gathering.trigger_action kwargs: has an unknown field; allowed: key" in log
    assert "no action named 'no-such-action'" in log
    assert "gathering.run_pipeline args[1]: must be of type object or null" in log
    assert "Traceback" not in log
    # And nothing was recorded for them: only the three good runs exist
    assert len(repo.ledger.list_runs(action="nightly")) == 3
