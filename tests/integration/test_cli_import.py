"""``gathering-tasks actions import``: many actions from a JSON or YAML list, all or none."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli_runner import cli_in_process


def definition(name: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "demo.hello", "kwargs": {"who": name}},
        "schedule": {"kind": "interval", "every_s": 3600},
    }
    return {**base, **overrides}


def names(env: dict[str, str]) -> list[str]:
    listed = cli_in_process(env, "actions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [action["name"] for action in json.loads(listed.stdout)]


def write_yaml(path: Path, entries: list[Any]) -> Path:
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def test_a_yaml_list_is_imported_and_counted(cli_env: dict[str, str], tmp_path: Path):
    # Given five definitions, one of them in `actions show` form (state fields, times as text)
    shown = {
        **definition("from-show", schedule={"kind": "cron", "expr": "30 2 * * *",
                                            "timezone": "Europe/Paris"}),
        "id": 41, "status": "paused", "run_count": 9, "next_run_at": "2026-01-01T00:00:00+00:00",
        "start_at": "2026-01-01T00:00:00+00:00",
    }  # fmt: skip
    entries = [definition(f"bulk-{i}") for i in range(4)] + [shown]
    path = write_yaml(tmp_path / "actions.yaml", entries)
    # When they are imported
    result = cli_in_process(cli_env, "actions", "import", str(path))
    # Then all five are stored, reported and counted, with fresh state
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 5 actions (5 created, 0 updated)"
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    assert names(cli_env) == sorted(e["name"] for e in entries)
    made = json.loads(cli_in_process(cli_env, "actions", "show", "from-show").stdout)
    assert (made["status"], made["run_count"]) == ("active", 0)
    assert made["start_at"].startswith("2026-01-01T00:00:00")
    assert made["config"] == {"task": "demo.hello", "kwargs": {"who": "from-show"}}


def test_two_bad_entries_are_both_reported_and_nothing_is_stored(
    cli_env: dict[str, str], tmp_path: Path
):
    # Given four definitions, the second and the fourth invalid
    entries = [
        definition("good-1"),
        definition("bad-cron", schedule={"kind": "cron", "expr": "61 * * * *"}),
        definition("good-2"),
        definition("bad-type", action_type="launch_rocket"),
    ]
    path = write_yaml(tmp_path / "actions.yaml", entries)
    # When they are imported
    result = cli_in_process(cli_env, "actions", "import", str(path))
    # Then the exit code says invalid input, each error names entry, name and field
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: entry 2 (bad-cron): schedule.expr: ")
    assert lines[1].startswith("error: entry 4 (bad-type): action_type: unknown action type")
    assert lines[2] == "error: 2 invalid of 4 entries; nothing was stored"
    assert len(lines) == 3
    # And not even the valid entries were stored
    assert names(cli_env) == []
    # And with --json the same errors are on stdout, as data
    as_json = cli_in_process(cli_env, "actions", "import", str(path), "--json")
    assert as_json.returncode == 2
    report = json.loads(as_json.stdout)
    assert report["stored"] is False
    assert [(e["entry"], e["name"], e["field"]) for e in report["errors"]] == [
        (2, "bad-cron", "schedule.expr"),
        (4, "bad-type", "action_type"),
    ]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_malformed_files_are_one_line_errors(cli_env: dict[str, str], tmp_path: Path):
    cases = {
        "broken.yaml": ("- name: x\n  config: [1, 2\n", "file: is not JSON or YAML: "),
        "object.json": (json.dumps(definition("one")), "file: must hold a list"),
        "alias.yaml": ("- &a {name: x}\n- *a\n", "aliases (*name) are not accepted"),
    }
    for file_name, (text, expected) in cases.items():
        path = tmp_path / file_name
        path.write_text(text)
        result = cli_in_process(cli_env, "actions", "import", str(path))
        assert result.returncode == 2, (file_name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert expected in lines[0], lines
    missing = cli_in_process(cli_env, "actions", "import", str(tmp_path / "nosuch.yaml"))
    assert missing.returncode == 2 and "file: cannot be read" in missing.stderr
    assert names(cli_env) == []


def test_a_dry_run_checks_everything_and_stores_nothing(cli_env: dict[str, str], tmp_path: Path):
    path = tmp_path / "actions.json"
    path.write_text(json.dumps([definition("dry-1"), definition("dry-2")]))
    result = cli_in_process(cli_env, "actions", "import", str(path), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "dry_run": True,
        "count": 2,
        "created": ["dry-1", "dry-2"],
        "updated": [],
    }
    assert names(cli_env) == []
    # A dry run also finds the problems an import would
    path.write_text(json.dumps([definition("dry-1"), definition("dry-1")]))
    twice = cli_in_process(cli_env, "actions", "import", str(path), "--dry-run")
    assert twice.returncode == 2
    assert "error: entry 2 (dry-1): name: is also the name of entry 1" in twice.stderr


def test_existing_names_are_refused_unless_upsert_replaces_them(
    cli_env: dict[str, str], tmp_path: Path
):
    # Given a paused action
    existing = tmp_path / "existing.json"
    existing.write_text(json.dumps(definition("kept")))
    assert cli_in_process(cli_env, "actions", "add", "--file", str(existing)).returncode == 0
    assert cli_in_process(cli_env, "actions", "pause", "kept").returncode == 0
    changed = definition("kept", config={"task": "demo.hello", "kwargs": {"who": "new"}})
    path = write_yaml(tmp_path / "actions.yaml", [definition("fresh"), changed])
    # When a file naming it is imported without --upsert: refused, nothing stored
    refused = cli_in_process(cli_env, "actions", "import", str(path))
    assert refused.returncode == 2
    assert "error: entry 2 (kept): name: an action with this name exists (--upsert" in (
        refused.stderr
    )
    assert names(cli_env) == ["kept"]
    # When it is imported with --upsert: created and replaced, the pause kept
    upserted = cli_in_process(cli_env, "actions", "import", str(path), "--upsert", "--json")
    assert upserted.returncode == 0, upserted.stderr
    assert json.loads(upserted.stdout) == {
        "dry_run": False,
        "count": 2,
        "created": ["fresh"],
        "updated": ["kept"],
    }
    kept = json.loads(cli_in_process(cli_env, "actions", "show", "kept").stdout)
    assert kept["config"]["kwargs"] == {"who": "new"} and kept["status"] == "paused"
    assert names(cli_env) == ["fresh", "kept"]


def on_terminal(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the CLI with stderr on a pseudo-terminal; what it drew there, read as it comes."""
    controller, terminal = pty.openpty()
    drawn: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the other end closed: everything was read
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gathering_tasks.cli", *args],
            env={**env, "TERM": "xterm", "COLUMNS": "100"},
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(terminal)
    reader.join(timeout=10)
    os.close(controller)
    return done, b"".join(drawn).decode(errors="replace")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_progress_bar_is_drawn_on_a_terminal_only(cli_env: dict[str, str], tmp_path: Path):
    path = write_yaml(tmp_path / "actions.yaml", [definition(f"tty-{i}") for i in range(3)])
    # When stderr is a terminal
    done, drawn = on_terminal(cli_env, "actions", "import", str(path))
    # Then the bar shows both phases and their counts there, and stdout stays clean
    assert done.returncode == 0, drawn
    assert done.stdout == "imported 3 actions (3 created, 0 updated)\n"
    assert "checking" in drawn and "storing" in drawn and "3/3" in drawn
    # And --json keeps the terminal quiet
    quiet, drawn = on_terminal(cli_env, "actions", "import", str(path), "--upsert", "--json")
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["count"] == 3
    assert drawn == ""


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_listing_of_one_database_imports_into_another(cli_env: dict[str, str], tmp_path: Path):
    # Given two actions in one database, one of them paused
    for entry in (definition("copy-a"), definition("copy-b", description="second")):
        path = tmp_path / f"{entry['name']}.json"
        path.write_text(json.dumps(entry))
        assert cli_in_process(cli_env, "actions", "add", "--file", str(path)).returncode == 0
    assert cli_in_process(cli_env, "actions", "pause", "copy-b").returncode == 0
    listing = tmp_path / "listing.json"
    listing.write_text(cli_in_process(cli_env, "actions", "list", "--json").stdout)
    # When the listing is imported into a fresh database
    other = {**cli_env, "GATHERING_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}"}
    assert cli_in_process(other, "db", "upgrade").returncode == 0
    imported = cli_in_process(other, "actions", "import", str(listing))
    # Then the same definitions are there, with fresh state
    assert imported.returncode == 0, imported.stderr
    before = {a["name"]: a for a in json.loads(listing.read_text())}
    after = {
        a["name"]: a for a in json.loads(cli_in_process(other, "actions", "list", "--json").stdout)
    }
    assert sorted(after) == ["copy-a", "copy-b"]
    for name, action in after.items():
        for field in ("action_type", "config", "schedule", "description", "retry_max_attempts"):
            assert action[field] == before[name][field], (name, field)
    assert after["copy-b"]["status"] == "active"
