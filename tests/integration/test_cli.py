"""The command line: exit code 2 and one line naming the field on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli_env(db_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    env.update(GATHERING_DATABASE_URL=db_url, GATHERING_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    return env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gathering_tasks.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_add_list_pause_resume_trigger_delete(cli_env: dict[str, str]):
    added = cli(
        cli_env, "actions", "add", "--name", "hello", "--type", "run_task",
        "--config", '{"task": "demo.hello"}', "--cron", "*/5 * * * *", "--tz", "Asia/Tokyo",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["schedule"]["timezone"] == "Asia/Tokyo"
    listed = cli(cli_env, "actions", "list")
    assert "hello" in listed.stdout and "active" in listed.stdout
    assert '"paused"' in cli(cli_env, "actions", "pause", "hello").stdout
    assert '"active"' in cli(cli_env, "actions", "resume", "hello").stdout
    triggered = cli(cli_env, "actions", "trigger", "hello")
    assert triggered.returncode == 0 and "queued" in triggered.stdout
    runs = cli(cli_env, "runs", "list", "--action", "hello")
    assert "trigger=manual" in runs.stdout
    assert cli(cli_env, "actions", "delete", "hello").returncode == 0
    assert cli(cli_env, "actions", "show", "hello").returncode == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--cron", "99 * * * *"], "schedule.expr"),
        (["--cron", "0 * * * *", "--tz", "Nowhere/Land"], "schedule.timezone"),
        (["--every", "0"], "schedule"),
        (["--every", "-3"], "schedule.every_s"),
        (["--cron", "0 * * * *", "--every", "5"], "schedule"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli_env: dict[str, str], args: list[str], field: str):
    result = cli(
        cli_env, "actions", "add", "--name", "x", "--type", "run_task",
        "--config", '{"task": "demo.hello"}', *args,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0]
    assert "x " not in cli(cli_env, "actions", "list").stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_unknown_type_and_bad_json(cli_env: dict[str, str]):
    result = cli(
        cli_env, "actions", "add", "--name", "x", "--type", "teleport", "--config", "{}",
        "--every", "5",
    )  # fmt: skip
    assert result.returncode == 2 and "action_type" in result.stderr
    result = cli(
        cli_env, "actions", "add", "--name", "x", "--type", "run_task", "--config", "{oops",
        "--every", "5",
    )  # fmt: skip
    assert result.returncode == 2 and "config" in result.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_file_errors_are_one_line(cli_env: dict[str, str], tmp_path: Path):
    missing = cli(cli_env, "actions", "add", "--file", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: file:")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    as_list = cli(cli_env, "actions", "add", "--file", str(listed))
    assert as_list.returncode == 2 and "one JSON object" in as_list.stderr
    assert "Traceback" not in missing.stderr + as_list.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_trigger_with_the_broker_down_records_the_run(cli_env: dict[str, str]):
    added = cli(
        cli_env, "actions", "add", "--name", "t", "--type", "run_task",
        "--config", '{"task": "demo.hello"}', "--every", "3600",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    down = {**cli_env, "GATHERING_REDIS_URL": "redis://127.0.0.1:9/0"}
    result = cli(down, "actions", "trigger", "t")
    assert result.returncode == 0 and "queued" in result.stdout, result.stderr
    assert "trigger=manual" in cli(cli_env, "runs", "list", "--action", "t").stdout
