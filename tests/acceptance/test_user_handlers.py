"""A user's own module, named in GATHERING_IMPORTS: its handlers and Celery tasks run in a real
worker, and the CLI accepts actions that name them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gathering_tasks.db.repo import Repository
from tests.acceptance.procs import ROOT, running_stack, stack_env
from tests.servers import wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(600)]

USER_MODULE = '''
"""The example of docs/handlers.md."""
from gathering_tasks.app import app
from gathering_tasks.handlers import handler


@handler("acme.greet")
def greet(who: str, **context):
    return {"greeting": f"hello {who}", "action": context["action"]}


@app.task(name="acme.shout")
def shout(text: str) -> str:
    return text.upper()
'''


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gathering_tasks.cli", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def final(repo: Repository, name: str) -> dict[str, object] | None:
    runs = repo.ledger.list_runs(action=name)
    if runs and runs[0]["status"] in ("succeeded", "failed", "timed_out"):
        return runs[0]
    return None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_user_modules_register_handlers_and_tasks(
    db_url: str, redis_url: str, repo: Repository, tmp_path: Path
):
    # Given a user's module on the path, named in GATHERING_IMPORTS
    code = tmp_path / "code"
    code.mkdir()
    (code / "acme_jobs.py").write_text(textwrap.dedent(USER_MODULE))
    env = stack_env(
        db_url,
        redis_url,
        GATHERING_IMPORTS="acme_jobs",
        GATHERING_RUN_TASK_ALLOWLIST="acme.shout",
        PYTHONPATH=f"{ROOT}:{code}",
    )
    # When actions naming its handler and its Celery task are added with the CLI
    for name, config in (
        ("greet", {"task": "acme.greet", "kwargs": {"who": "ops"}}),
        ("shout", {"task": "acme.shout", "args": ["quiet"]}),
    ):
        added = cli(env, "actions", "add", "--name", name, "--type", "run_task",
                    "--config", json.dumps(config), "--every", "86400")  # fmt: skip
        assert added.returncode == 0, added.stderr
    # And a worker runs them
    with running_stack(env, tmp_path) as stack:
        worker = stack.worker("w1", concurrency=1)
        wait_for(lambda: " ready." in worker.log_text(), 60, "the worker to be ready")
        for name in ("greet", "shout"):
            assert cli(env, "actions", "trigger", name).returncode == 0
        greet = wait_for(lambda: final(repo, "greet"), 60, "the handler's run")
        shout = wait_for(lambda: final(repo, "shout"), 60, "the task's run")
    # Then both ran in the worker, the handler with the run's context
    assert greet["status"] == "succeeded", greet
    assert greet["result"] == {"greeting": "hello ops", "action": "greet"}
    assert shout["status"] == "succeeded" and shout["result"] == {"value": "QUIET"}
    # And a module that cannot be imported is one clear line, not a traceback
    broken = cli({**env, "GATHERING_IMPORTS": "acme_missing"}, "actions", "list")
    assert broken.returncode == 2
    assert broken.stderr.strip() == (
        "error: GATHERING_IMPORTS: cannot import 'acme_missing': No module named 'acme_missing'"
    )
