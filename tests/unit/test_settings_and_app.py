"""The Celery configuration derived from settings, and the deployment files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gathering_tasks.app import celery_config
from gathering_tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_json_only_and_late_acks():
    conf = celery_config(Settings())
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_send_task_events"] is True
    assert conf["worker_prefetch_multiplier"] == 1


def test_visibility_timeout_is_above_the_longest_time_limit():
    settings = Settings(task_time_limit_s=600)
    conf = celery_config(settings)
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
    assert conf["task_soft_time_limit"] < conf["task_time_limit"]


def test_broker_defaults_to_redis_url(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GATHERING_REDIS_URL", "redis://127.0.0.1:6390/2")
    assert Settings().broker_url == "redis://127.0.0.1:6390/2"
    monkeypatch.setenv("GATHERING_BROKER_URL", "redis://127.0.0.1:6391/0")
    assert Settings().broker_url == "redis://127.0.0.1:6391/0"


def test_lists_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GATHERING_HTTP_ALLOW_NETWORKS", "127.0.0.1/32, ::1/128")
    monkeypatch.setenv("GATHERING_RUN_TASK_ALLOWLIST", '["a.b", "c.d"]')
    settings = Settings()
    assert settings.http_allow_networks == ["127.0.0.1/32", "::1/128"]
    assert settings.run_task_allowlist == ["a.b", "c.d"]


def test_secrets_and_urls_are_not_printed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GATHERING_SMTP_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("GATHERING_DATABASE_URL", "postgresql://u:pg-secret@127.0.0.1/db")
    text = repr(Settings()) + str(Settings())
    assert "hunter2-secret" not in text
    assert "pg-secret" not in text


def test_malformed_setting_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GATHERING_BEAT_TICK_S", "soon")
    with pytest.raises(ValueError, match="beat_tick_s"):
        Settings()


def test_compose_file_is_valid_and_consistent():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "worker", "beat", "flower"} <= set(services)
    assert services["beat"]["deploy"]["replicas"] == 2
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    db_urls = {
        services[name]["environment"]["GATHERING_DATABASE_URL"]
        for name in ("migrate", "worker", "beat", "flower")
    }
    redis_urls = {
        services[name]["environment"]["GATHERING_REDIS_URL"]
        for name in ("migrate", "worker", "beat", "flower")
    }
    assert len(db_urls) == 1 and len(redis_urls) == 1
    assert services["migrate"]["command"] == ["gathering-tasks", "db", "upgrade"]


def test_procfile_has_the_services_and_the_demo_sink():
    lines = (ROOT / "Procfile").read_text().splitlines()
    kinds = {line.split(":", 1)[0] for line in lines if line.strip()}
    assert kinds == {"release", "worker", "beat", "flower", "sink"}
    assert any("celery -A gathering_tasks beat" in line for line in lines)


def test_flower_refuses_exposure_without_auth():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    code = "import runpy; runpy.run_path('config/flowerconfig.py')"
    exposed = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "FLOWER_ADDRESS": "0.0.0.0"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert exposed.returncode != 0 and "without authentication" in exposed.stderr
    with_auth = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "FLOWER_ADDRESS": "0.0.0.0", "FLOWER_BASIC_AUTH": "u:p"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    loopback = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert with_auth.returncode == 0 and loopback.returncode == 0


def test_a_worker_imports_its_executors_before_the_pool_forks():
    # Given a fresh interpreter that loaded the app and its tasks, as `celery worker` does
    code = (
        "import sys\n"
        "from celery.signals import celeryd_init\n"
        "from gathering_tasks.app import app\n"
        "import gathering_tasks.tasks\n"
        "from gathering_tasks.db.models import Execution\n"
        "before = 'gathering_tasks.work' in sys.modules, Execution.__mapper__.configured\n"
        "celeryd_init.send(sender='w@test', instance=None, conf=app.conf, options={})\n"
        "print(before, ('gathering_tasks.work' in sys.modules, Execution.__mapper__.configured))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    # When the worker's main process starts (celeryd_init, before the pool forks)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    # Then the executors are imported and the ORM configured there, so that a pool process
    # inherits both instead of paying for them on its first task
    assert done.stdout.split("\n")[0] == "(False, False) (True, True)", done.stderr


def test_a_pool_process_has_time_to_connect_before_it_is_given_up():
    settings = Settings(db_connect_timeout_s=5, db_statement_timeout_s=5, run_lease_ttl_s=30)
    assert celery_config(settings)["worker_proc_alive_timeout"] > 5 + 5
