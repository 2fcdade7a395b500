"""The Procfile's processes under honcho: beat, worker and Flower come up and do work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gathering_tasks.api import ActionService, PipelineService
from gathering_tasks.db.repo import Repository
from gathering_tasks.demo import (
    DEMO_ACTIONS,
    DEMO_PIPELINE_ACTION,
    DEMO_PIPELINE_NAME,
    demo_pipeline,
)
from gathering_tasks.settings import Settings
from tests.acceptance.procs import ROOT, stack_env
from tests.servers import free_port, wait_for

pytestmark = pytest.mark.acceptance


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_honcho_runs_worker_beat_and_flower(
    db_url: str, redis_url: str, settings: Settings, repo: Repository, tmp_path: Path
):
    # Given the demo actions and the demo pipeline on the embedded default (SQLite)
    sink_port = free_port()
    PipelineService(repo, settings, task_allowed=lambda _n: True).create(
        DEMO_PIPELINE_NAME, demo_pipeline(sink_port)
    )
    svc = ActionService(repo, settings, task_allowed=lambda _n: True)
    for action in [*DEMO_ACTIONS, DEMO_PIPELINE_ACTION]:
        svc.create(action)
    port = free_port()
    env = stack_env(
        db_url,
        redis_url,
        FLOWER_PORT=str(port),
        FLOWER_ADDRESS="127.0.0.1",
        GATHERING_DEMO_SINK_PORT=str(sink_port),
        GATHERING_SECRET_ENV_ALLOW="DEMO_HOOK_*",
        DEMO_HOOK_KEY="procfile-test-key",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = (tmp_path / "honcho.log").open("wb")
    # When honcho starts the Procfile's long-running processes
    proc = subprocess.Popen(
        [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile"),
         "-d", str(ROOT), "worker", "beat", "flower", "sink"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # Then Flower answers on loopback and the demo's hello action runs
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200,
            60,
            "Flower to answer",
        )
        wait_for(
            lambda: repo.ledger.list_runs(action="demo-hello-every-5s", status="succeeded"),
            60,
            "the demo action to run",
        )
        # And the demo pipeline fans out to the sink's two endpoints, joins, and notifies
        wait_for(
            lambda: repo.ledger.list_runs(action="demo-pipeline-every-30s", status="succeeded"),
            90,
            "the demo pipeline to finish",
        )
        # Flower's JSON API stays closed unless explicitly opened
        api = requests.get(f"http://127.0.0.1:{port}/api/workers", timeout=5)
        assert api.status_code == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    text = (tmp_path / "honcho.log").read_text(errors="replace")
    assert "hello, every five seconds" in text
    assert "demo sink: webhook received on /hook" in text
    assert "42 items at 9.5 each" in text
