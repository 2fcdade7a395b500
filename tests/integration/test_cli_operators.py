"""The CLI as operators script it: --version, --json listings, edit, show/add round trips,
refused filters, runs show --wait, status, exit codes, tracebacks only with --debug."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from gathering_tasks import __version__
from gathering_tasks.db.repo import Repository
from gathering_tasks.locks import Lease
from gathering_tasks.settings import Settings
from tests.cli_runner import cli, cli_in_process
from tests.factories import make_guard


def add_hello(env: dict[str, str], name: str = "hello") -> None:
    added = cli_in_process(
        env, "actions", "add", "--name", name, "--type", "run_task",
        "--config", '{"task": "demo.hello", "kwargs": {"who": "you"}}', "--every", "3600",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def one_error_line(result: object, code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return str(lines[0])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_version_and_documented_exit_codes(cli_env: dict[str, str]):
    assert cli_in_process(cli_env, "--version").stdout.strip() == f"gathering-tasks {__version__}"
    text = " ".join(cli_in_process(cli_env, "--help").stdout.split())
    for code in ("0 ok", "2 invalid input", "3 not found", "4 gave up waiting", "--debug"):
        assert code in text


def test_listings_print_json_with_names(cli_env: dict[str, str]):
    # Given two actions, one triggered
    add_hello(cli_env)
    add_hello(cli_env, "other")
    assert cli_in_process(cli_env, "actions", "trigger", "hello").returncode == 0
    # Then every listing has a --json form
    actions = json.loads(cli_in_process(cli_env, "actions", "list", "--json").stdout)
    assert [a["name"] for a in actions] == ["hello", "other"]
    assert actions[0]["config"] == {"task": "demo.hello", "kwargs": {"who": "you"}}
    runs = json.loads(cli_in_process(cli_env, "runs", "list", "--json").stdout)
    assert [(r["action"], r["status"], r["trigger"]) for r in runs] == [
        ("hello", "pending", "manual")
    ]
    assert json.loads(cli_in_process(cli_env, "pipelines", "list", "--json").stdout) == []
    assert json.loads(cli_in_process(cli_env, "pipelines", "runs", "--json").stdout) == []
    # And the text listing of runs names the action
    text = cli_in_process(cli_env, "runs", "list").stdout
    assert " hello " in text and "action=" not in text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_show_output_is_accepted_by_add_and_name_is_honoured(
    cli_env: dict[str, str], tmp_path: Path
):
    add_hello(cli_env)
    shown = tmp_path / "hello.json"
    shown.write_text(cli_in_process(cli_env, "actions", "show", "hello").stdout)
    assert "action_config" not in json.loads(shown.read_text())
    # When show's output is added back under another name
    copy = cli_in_process(cli_env, "actions", "add", "--file", str(shown), "--name", "hello-copy")
    assert copy.returncode == 0, copy.stderr
    # Then the copy has the same definition, and fresh state
    made = json.loads(copy.stdout)
    assert made["name"] == "hello-copy" and made["run_count"] == 0
    assert made["config"] == {"task": "demo.hello", "kwargs": {"who": "you"}}
    # And the older key action_config is read as config
    legacy = tmp_path / "legacy.json"
    legacy.write_text(
        json.dumps(
            {
                "name": "legacy",
                "action_type": "run_task",
                "action_config": {"task": "demo.hello"},
                "schedule": {"kind": "interval", "every_s": 60},
            }
        )
    )
    assert cli_in_process(cli_env, "actions", "add", "--file", str(legacy)).returncode == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_edit_sets_fields_by_path_or_from_a_file(cli_env: dict[str, str], tmp_path: Path):
    add_hello(cli_env)
    edited = cli_in_process(cli_env, "actions", "edit", "hello", "--set", "config.kwargs.who=ops",
                 "--set", "timeout_s=30", "--set", "description=nightly greeting")  # fmt: skip
    assert edited.returncode == 0, edited.stderr
    action = json.loads(edited.stdout)
    assert action["config"]["kwargs"] == {"who": "ops"}
    assert (action["timeout_s"], action["description"]) == (30, "nightly greeting")
    changes = tmp_path / "changes.json"
    changes.write_text(json.dumps({"schedule": {"kind": "interval", "every_s": 120}}))
    from_file = cli_in_process(cli_env, "actions", "edit", "hello", "--file", str(changes))
    assert json.loads(from_file.stdout)["schedule"]["every_s"] == 120
    # And bad edits are one line with the right code, changing nothing
    line = one_error_line(
        cli_in_process(cli_env, "actions", "edit", "hello", "--set", "bogus=1"), 2
    )
    assert "bogus" in line
    line = one_error_line(
        cli_in_process(cli_env, "actions", "edit", "hello", "--set", "timeout_s=-1"), 2
    )
    assert "timeout_s" in line
    one_error_line(cli_in_process(cli_env, "actions", "edit", "nosuch", "--set", "timeout_s=3"), 3)
    one_error_line(cli_in_process(cli_env, "actions", "edit", "hello"), 2)
    assert json.loads(cli_in_process(cli_env, "actions", "show", "hello").stdout)["timeout_s"] == 30


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_unknown_filters_are_refused(cli_env: dict[str, str]):
    add_hello(cli_env)
    assert "status" in one_error_line(
        cli_in_process(cli_env, "actions", "list", "--status", "bogus"), 2
    )
    assert "status" in one_error_line(
        cli_in_process(cli_env, "runs", "list", "--status", "bogus"), 2
    )
    line = one_error_line(cli_in_process(cli_env, "runs", "list", "--action", "nosuch"), 3)
    assert line == "error: no action named 'nosuch'"
    # A known action without runs is an empty listing, not an error
    assert cli_in_process(cli_env, "runs", "list", "--action", "hello").returncode == 0


def test_runs_show_wait_exits_with_the_outcome(
    cli_env: dict[str, str], repo: Repository, settings: Settings
):
    add_hello(cli_env)
    run_id = int(cli_in_process(cli_env, "actions", "trigger", "hello").stdout.split()[1])
    # A queued run that nobody takes: the wait gives up with exit 4
    line = one_error_line(
        cli_in_process(cli_env, "runs", "show", str(run_id), "--wait", "--timeout", "0.3"), 4
    )
    assert line == f"error: run {run_id} is still pending after 0.3s"
    # When a worker's guard executes it, the wait returns it with exit 0
    guard = make_guard(repo, settings)
    outcome = guard.execute(
        run_id, "run_task", lambda _r, _a: {"ok": True}, worker="w", task_id="t"
    )
    assert outcome == "succeeded"
    shown = cli_in_process(cli_env, "runs", "show", str(run_id), "--wait")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["action"] == "hello"
    # And a run that ended otherwise exits 1
    other = int(cli_in_process(cli_env, "actions", "trigger", "hello").stdout.split()[1])
    assert cli_in_process(cli_env, "runs", "cancel", str(other)).returncode == 0
    cancelled = cli_in_process(cli_env, "runs", "show", str(other), "--wait")
    assert cancelled.returncode == 1 and json.loads(cancelled.stdout)["status"] == "cancelled"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_status_reports_leader_workers_queues_and_recent_runs(
    cli_env: dict[str, str], redis_url: str
):
    # Given a queued run, nobody consuming, and no beat
    add_hello(cli_env)
    assert cli_in_process(cli_env, "actions", "trigger", "hello").returncode == 0
    report = json.loads(cli_in_process(cli_env, "status", "--json", "--ping-timeout", "0.3").stdout)
    assert report == {
        "leader": {"held": False, "expires_in_s": None, "holder": None},
        "workers": [],
        "queues": {"celery": 0, "gathering": 1},
        "runs_last_hour": {"pending": 1},
    }
    # When a beat holds the leader lease (a beat names itself, host:pid, in its token)
    lease = Lease(redis.Redis.from_url(redis_url), "gathering:beat:leader", 8, owner="beat-host:42")
    assert lease.acquire()
    text = cli_in_process(cli_env, "status", "--ping-timeout", "0.3").stdout
    assert "beat leader: held by beat-host:42 (expires in" in text
    assert "gathering" in text and "pending" in text
    shown = json.loads(cli_in_process(cli_env, "status", "--json", "--ping-timeout", "0.3").stdout)
    assert shown["leader"]["held"] and shown["leader"]["holder"] == "beat-host:42"


def test_errors_are_one_line_and_tracebacks_need_debug(cli_env: dict[str, str]):
    env = {**cli_env, "GATHERING_DATABASE_URL": "postgresql+psycopg2://nobody@127.0.0.1:1/x"}
    line = one_error_line(cli(env, "actions", "list"), 1)
    assert line.startswith("error: database error: OperationalError")
    debug = cli(env, "--debug", "actions", "list")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
