"""The built wheel, installed in a clean virtualenv outside the checkout, migrates and runs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gathering_tasks import __version__
from tests.acceptance.procs import ROOT
from tests.servers import wait_for

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(900)]


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 600) -> str:
    done = subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def status_of(db: Path, name: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT r.status FROM executions r JOIN scheduled_actions a ON a.id = r.action_id"
            " WHERE a.name = ? ORDER BY r.id DESC LIMIT 1",
            (name,),
        ).fetchone()
    return row[0] if row else None


def test_the_wheel_migrates_and_runs_an_action_from_a_clean_venv(tmp_path: Path, redis_url: str):
    # Given the wheel built from the checkout, installed with its dependencies into a new venv
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)],
        dict(os.environ), tmp_path)  # fmt: skip
    (wheel,) = dist.glob("gathering_tasks-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], dict(os.environ), tmp_path)
    bin_dir = venv / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)],
        dict(os.environ), tmp_path)  # fmt: skip
    home = tmp_path / "elsewhere"
    home.mkdir()
    db = home / "gathering.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATHERING_", "PYTHON"))}
    env.update(
        GATHERING_DATABASE_URL=f"sqlite:///{db}",
        GATHERING_REDIS_URL=redis_url,
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    cli = str(bin_dir / "gathering-tasks")

    # Then it is the package of the venv, not the checkout, and it knows its version
    show_file = "import gathering_tasks; print(gathering_tasks.__file__)"
    where = run([str(bin_dir / "python"), "-c", show_file], env, home)
    assert str(venv) in where and str(ROOT) not in where
    assert run([cli, "--version"], env, home).strip() == f"gathering-tasks {__version__}"
    # And it carries its migrations and the Flower config
    packaged = Path(where.strip()).parent
    assert (packaged / "_migrations" / "env.py").is_file()
    assert (packaged / "_config" / "flowerconfig.py").is_file()
    assert (packaged / "contract" / "gathering.run_task.schema.json").is_file()

    # When the database is migrated, an action added, and a worker of the venv started
    run([cli, "db", "upgrade"], env, home)
    config = '{"task": "demo.add", "args": [40, 2]}'
    run([cli, "actions", "add", "--name", "from-wheel", "--type", "run_task",
         "--config", config, "--every", "86400"], env, home)  # fmt: skip
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [str(bin_dir / "celery"), "-A", "gathering_tasks", "worker", "--concurrency=1",
             "--without-gossip", "--without-mingle", "--loglevel=INFO"],
            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        run([cli, "actions", "trigger", "from-wheel"], env, home)
        # Then the run succeeds
        wait_for(lambda: status_of(db, "from-wheel") == "succeeded", 120, "the run to succeed")
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
    assert "succeeded: run" in log_path.read_text(errors="replace")
