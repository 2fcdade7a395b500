"""Beat loads what it schedules with, not what workers execute; workers still register every
task before they consume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What only a worker (or a process with metrics on, or one that edits pipelines) needs.
WORKER_ONLY = (
    "gathering_tasks.tasks",
    "gathering_tasks.tasks.actions",
    "gathering_tasks.guard",
    "gathering_tasks.contract",
    "gathering_tasks.work",
    "gathering_tasks.handlers",
    "gathering_tasks.skills.executors",
    "gathering_tasks.pipelines.executor",
    "gathering_tasks.pipelines.definition",
    "gathering_tasks.db.pipelines",
    "gathering_tasks.db.repo",
    "jsonschema",
    "tenacity",
    "jmespath",
    "prometheus_client",
)

# What `celery -A gathering_tasks beat` does before it ticks (celery.apps.beat.Beat.run:
# the loader imports the configured modules), then a few ticks and a sweep.
BEAT_RUNS = (
    "import json, sys\n"
    "from gathering_tasks.app import app\n"
    "from gathering_tasks.beat import DatabaseScheduler\n"
    "app.loader.init_worker()\n"
    "app.finalize()\n"
    "scheduler = DatabaseScheduler(app)\n"
    "scheduler.info\n"
    "for _ in range(3):\n"
    "    scheduler.tick()\n"
    "scheduler.engine.sweep()\n"
    "assert scheduler.engine.is_leader\n"
    "scheduler.close()\n"
    f"loaded = [m for m in {WORKER_ONLY!r} if m in sys.modules]\n"
    "ours = sorted(n for n in app.tasks if n.startswith('gathering.'))\n"
    "print(json.dumps({'loaded': loaded, 'tasks': ours}))\n"
)

WORKER_STARTS = (
    "import json\n"
    "from celery.signals import worker_init\n"
    "from gathering_tasks.app import app\n"
    "before = sorted(n for n in app.tasks if n.startswith('gathering.'))\n"
    "worker_init.send(sender=None)\n"
    "after = set(app.tasks)\n"
    "from gathering_tasks.tasks import TASKS, run_pipeline, trigger_action\n"
    "names = [t.name for t in (*TASKS.values(), run_pipeline, trigger_action)]\n"
    "print(json.dumps({'before': before, 'missing': [n for n in names if n not in after]}))\n"
)


def _run(code: str, env: dict[str, str]) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return result


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return {**env, **values}


def test_beat_does_not_import_what_only_workers_run(db_url: str, redis_url: str):
    # Given a fresh process configured like a deployed beat
    env = _env(GATHERING_DATABASE_URL=db_url, GATHERING_REDIS_URL=redis_url)
    # When it starts the scheduler as `celery beat` does, leads, ticks and sweeps
    seen = _run(BEAT_RUNS, env)
    # Then none of the workers' modules (tasks, guard, executors, payload schemas, the
    # pipelines' definitions) nor metrics' client was imported, and no task was registered
    assert seen == {"loaded": [], "tasks": []}


def test_a_worker_registers_every_task_before_it_consumes():
    # Given a fresh process that loaded the app, as a worker's main process does
    # When the worker initialises (worker_init: before its consumer and its pool start)
    seen = _run(WORKER_STARTS, _env())
    # Then every task of ours is registered, and none was before
    assert seen == {"before": [], "missing": []}
