"""The pipelines commands: validate, add, update, list, show, versions, run, runs, cancel."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.cli_runner import cli_in_process

DEFINITION = {
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


def test_a_pipeline_from_yaml_is_stored_versioned_run_and_cancelled(
    cli_env: dict[str, str], tmp_path: Path
):
    # Given a pipeline written as YAML
    path = tmp_path / "sum.yaml"
    path.write_text(yaml.safe_dump(DEFINITION))
    # When it is validated, added, and edited once
    checked = cli_in_process(cli_env, "pipelines", "validate", str(path))
    assert checked.returncode == 0 and "valid: 2 nodes, 1 edges" in checked.stdout
    added = cli_in_process(cli_env, "pipelines", "add", "sum", str(path))
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 1
    assert (
        json.loads(cli_in_process(cli_env, "pipelines", "update", "sum", str(path)).stdout)[
            "version"
        ]
        == 2
    )
    # Then it is listed with its versions
    assert "sum" in cli_in_process(cli_env, "pipelines", "list").stdout
    versions = cli_in_process(cli_env, "pipelines", "versions", "sum").stdout.split()
    assert [v for v in versions if v.startswith("v")] == ["v1", "v2"]
    assert json.loads(cli_in_process(cli_env, "pipelines", "show", "sum").stdout)["name"] == "sum"
    # And a run starts (no worker here: its first node waits), is listed, and cancels
    started = cli_in_process(cli_env, "pipelines", "run", "sum", "--data", '{"x": 1}')
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[2]
    assert f"{run_id}" in cli_in_process(cli_env, "pipelines", "runs", "sum").stdout
    cancelled = cli_in_process(cli_env, "pipelines", "cancel", run_id)
    assert cancelled.stdout.strip() == f"pipeline run {run_id} cancelled"
    shown = json.loads(cli_in_process(cli_env, "pipelines", "runs", "--run", run_id).stdout)
    assert shown["status"] == "cancelled" and shown["pipeline_version"] == 2
    assert [n["status"] for n in shown["nodes"]] == ["cancelled"]


def test_validate_prints_every_error_and_exits_2(cli_env: dict[str, str], tmp_path: Path):
    # Given a definition with an unknown type, a dangling edge and a cycle
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "nodes": [
                    {"id": "start", "type": "trigger"},
                    {"id": "a", "type": "teleport"},
                    {"id": "b", "type": "parallel"},
                    {"id": "c", "type": "parallel"},
                ],
                "edges": [
                    {"from": "start", "to": "ghost"},
                    {"from": "b", "to": "c"},
                    {"from": "c", "to": "b"},
                ],
            }
        )
    )
    # When it is validated, and added
    checked = cli_in_process(cli_env, "pipelines", "validate", str(path))
    added = cli_in_process(cli_env, "pipelines", "add", "bad", str(path))
    # Then each error is printed, naming its node, with exit code 2; nothing is stored
    for result in (checked, added):
        assert result.returncode == 2, result.stderr
        assert "'a'" in result.stderr and "ghost" in result.stderr and "'b'" in result.stderr
        assert "Traceback" not in result.stderr
    assert cli_in_process(cli_env, "pipelines", "show", "bad").returncode == 3


def test_unknown_pipeline_and_bad_data_are_clear_errors(cli_env: dict[str, str]):
    missing = cli_in_process(cli_env, "pipelines", "run", "nope")
    assert missing.returncode == 3 and "nope" in missing.stderr
    bad = cli_in_process(cli_env, "pipelines", "run", "nope", "--data", "{not json")
    assert bad.returncode == 2 and "data" in bad.stderr
