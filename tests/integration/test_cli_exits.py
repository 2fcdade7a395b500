"""Exit codes chosen by a command are kept: they are not turned into error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_runner import cli

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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_pipelines_run_wait_gives_up_with_its_own_message(cli_env: dict[str, str], tmp_path: Path):
    # Given a pipeline and no worker to run it
    path = tmp_path / "sum.json"
    path.write_text(json.dumps(PIPELINE))
    assert cli(cli_env, "pipelines", "add", "sum", str(path)).returncode == 0
    # When a run is started and waited for, briefly
    result = cli(cli_env, "pipelines", "run", "sum", "--wait", "--timeout", "1")
    # Then the wait ends with exit 1 and says why, in one line
    assert result.returncode == 1, (result.stdout, result.stderr)
    run_id = result.stdout.split()[2]
    assert result.stderr.strip() == f"error: pipeline run {run_id} still running after 1s"
