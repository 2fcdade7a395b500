"""The command line: exit code 2 and one line naming the field on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli_runner import cli, cli_in_process

ROOT = Path(__file__).resolve().parents[2]


def test_add_list_pause_resume_trigger_delete(cli_env: dict[str, str]):
    added = cli_in_process(
        cli_env, "actions", "add", "--name", "hello", "--type", "run_task",
        "--config", '{"task": "demo.hello"}', "--cron", "*/5 * * * *", "--tz", "Asia/Tokyo",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["schedule"]["timezone"] == "Asia/Tokyo"
    listed = cli_in_process(cli_env, "actions", "list")
    assert "hello" in listed.stdout and "active" in listed.stdout
    assert '"paused"' in cli_in_process(cli_env, "actions", "pause", "hello").stdout
    assert '"active"' in cli_in_process(cli_env, "actions", "resume", "hello").stdout
    triggered = cli_in_process(cli_env, "actions", "trigger", "hello")
    assert triggered.returncode == 0 and "queued" in triggered.stdout
    runs = cli_in_process(cli_env, "runs", "list", "--action", "hello")
    assert "trigger=manual" in runs.stdout
    assert cli_in_process(cli_env, "actions", "delete", "hello").returncode == 0
    assert cli_in_process(cli_env, "actions", "show", "hello").returncode == 3


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
    result = cli_in_process(
        cli_env, "actions", "add", "--name", "x", "--type", "run_task",
        "--config", '{"task": "demo.hello"}', *args,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0]
    assert "x " not in cli_in_process(cli_env, "actions", "list").stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_unknown_type_and_bad_json(cli_env: dict[str, str]):
    result = cli_in_process(
        cli_env, "actions", "add", "--name", "x", "--type", "teleport", "--config", "{}",
        "--every", "5",
    )  # fmt: skip
    assert result.returncode == 2 and "action_type" in result.stderr
    result = cli_in_process(
        cli_env, "actions", "add", "--name", "x", "--type", "run_task", "--config", "{oops",
        "--every", "5",
    )  # fmt: skip
    assert result.returncode == 2 and "config" in result.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_file_errors_are_one_line(cli_env: dict[str, str], tmp_path: Path):
    missing = cli_in_process(cli_env, "actions", "add", "--file", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: file:")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    as_list = cli_in_process(cli_env, "actions", "add", "--file", str(listed))
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


# --- input one backend would refuse to store is refused for both, before anything is written


def _add_config(config: str) -> list[str]:
    return ["--name", "x", "--type", "run_task", "--config", config, "--every", "60"]


def _add_file(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "action.json"
    path.write_text(text)
    return ["--file", str(path)]


def _definition(**fields: str) -> str:
    """An action definition as JSON text; each value in ``fields`` is raw JSON."""
    base = {
        "name": '"x"',
        "action_type": '"run_task"',
        "config": '{"task": "demo.hello"}',
        "schedule": '{"kind": "interval", "every_s": 60}',
    }
    members = ", ".join(f'"{key}": {value}' for key, value in (base | fields).items())
    return "{" + members + "}"


UNSTORABLE = [
    pytest.param(
        lambda _tmp: _add_config('{"task": "demo.hello", "kwargs": {"who": NaN}}'),
        "config.kwargs.who",
        id="config-nan",
    ),
    pytest.param(
        lambda _tmp: _add_config('{"task": "demo.hello", "args": [1, -Infinity]}'),
        "config.args.1",
        id="config-infinity",
    ),
    pytest.param(
        lambda _tmp: _add_config('{"task": "demo.hello", "kwargs": {"who": "a\\u0000b"}}'),
        "config.kwargs.who",
        id="config-nul-value",
    ),
    pytest.param(
        lambda _tmp: _add_config('{"task": "demo.hello", "kwargs": {"a\\u0000": 1}}'),
        "config.kwargs.a\\x00",
        id="config-nul-key",
    ),
    pytest.param(
        lambda _tmp: _add_config('{"task": "demo.hello", "kwargs": {"who": "\\ud800"}}'),
        "config.kwargs.who",
        id="config-lone-surrogate",
    ),
    pytest.param(
        lambda tmp: _add_file(tmp, _definition(description='"first\\u0000second"')),
        "description",
        id="description-nul",
    ),
    pytest.param(
        lambda tmp: _add_file(
            tmp,
            _definition(
                action_type='"call_api"',
                config='{"url": "https://api.example.com/", "headers": {"X-Token": "t\\u0000"}}',
            ),
        ),
        "config.headers.X-Token",
        id="header-nul",
    ),
    pytest.param(
        lambda tmp: _add_file(tmp, _definition(catchup_grace_s="Infinity")),
        "catchup_grace_s",
        id="grace-infinity",
    ),
    pytest.param(
        lambda tmp: _add_file(tmp, _definition(catchup_max="1001")),
        "catchup_max",
        id="catchup-max-above-planner-limit",
    ),
]


@pytest.mark.parametrize(("make_args", "field"), UNSTORABLE)
def test_unstorable_input_exits_2_naming_the_field_on_every_backend(
    cli_env: dict[str, str], tmp_path: Path, make_args: Any, field: str
):
    # Given input that SQLite would store and PostgreSQL would choke on (or the planner drop)
    args = make_args(tmp_path)

    # When an action is added from it
    result = cli_in_process(cli_env, "actions", "add", *args)

    # Then the CLI exits 2 with one line naming the field, and nothing was stored
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {field}: "), lines[0]
    assert "\x00" not in result.stderr
    assert cli_in_process(cli_env, "actions", "list").stdout == ""


def test_catchup_max_at_the_planner_limit_is_stored(cli_env: dict[str, str], tmp_path: Path):
    # Given a definition asking for the largest catch-up the planner plans in one call
    args = _add_file(tmp_path, _definition(catchup_max="1000", catchup_mode='"all"'))

    # When it is added
    result = cli_in_process(cli_env, "actions", "add", *args)

    # Then it is stored as asked
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["catchup_max"] == 1000
