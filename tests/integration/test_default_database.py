"""The embedded default database is found from any directory, and a missing schema is one
clear line naming the database and the fix, never a silent new empty file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.procs import ROOT
from tests.servers import PostgresServer

pytestmark = pytest.mark.redis


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gathering_tasks.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """No GATHERING_DATABASE_URL: the default applies; HOME and XDG point into tmp_path."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("GATHERING_", "XDG_"))}
    out.update(HOME=str(tmp_path / "home"), GATHERING_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    return out


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "one", tmp_path / "two" / "deeper"
    first.mkdir()
    second.mkdir(parents=True)
    return first, second


def test_the_default_is_one_absolute_file_found_from_any_directory(
    env: dict[str, str], tmp_path: Path
):
    one, two = dirs(tmp_path)
    expected = tmp_path / "home" / ".local" / "share" / "gathering-tasks" / "gathering.db"
    # Given no database yet: a command is refused with the path and the fix, creating nothing
    refused = cli(env, one, "actions", "list")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: no database at {expected}: run `gathering-tasks db upgrade` "
        "(with the same GATHERING_DATABASE_URL) first"
    )
    assert not expected.exists()
    # When it is migrated from one directory
    assert cli(env, one, "db", "upgrade").returncode == 0
    # Then another directory finds the same database
    added = cli(env, two, "actions", "add", "--name", "anywhere", "--type", "run_task",
                "--config", '{"task": "demo.hello"}', "--every", "60")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "anywhere" in cli(env, one, "actions", "list").stdout
    assert expected.is_file()
    assert not list(one.iterdir()) and not list(two.iterdir())


def test_gathering_home_moves_the_default(env: dict[str, str], tmp_path: Path):
    one, two = dirs(tmp_path)
    env["GATHERING_HOME"] = str(tmp_path / "state")
    assert cli(env, one, "db", "upgrade").returncode == 0
    assert (tmp_path / "state" / "gathering.db").is_file()
    assert cli(env, two, "actions", "list").returncode == 0


def test_an_unmigrated_sqlite_file_is_named(env: dict[str, str], tmp_path: Path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    env["GATHERING_DATABASE_URL"] = f"sqlite:///{path}"
    refused = cli(env, tmp_path, "runs", "list")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"error: the database at sqlite:///{path} has no schema: run `gathering-tasks db "
        "upgrade` (with the same GATHERING_DATABASE_URL) first"
    )


@pytest.mark.postgres
def test_an_unmigrated_postgres_database_is_named_without_its_password(
    env: dict[str, str], tmp_path: Path, postgres_server: PostgresServer
):
    name = postgres_server.create_database()
    try:
        env["GATHERING_DATABASE_URL"] = postgres_server.dsn(name)
        refused = cli(env, tmp_path, "actions", "list")
        assert refused.returncode == 1
        line = refused.stderr.strip()
        assert line.startswith("error: the database at postgresql") and "has no schema" in line
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
    finally:
        postgres_server.drop_database(name)
