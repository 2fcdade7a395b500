"""The peer of the pipeline benchmark: a plain Celery app with one no-op task, nothing of ours.

``bench/pipelines.py`` runs it as ``celery -A bench.canvas_app worker`` and builds its chains
and chords in the measuring process. The configuration (ours, minus what only our app uses,
plus the Redis result backend that a chord needs) comes as JSON in ``BENCH_CANVAS_CONFIG``,
so that the worker and the client read the same settings.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

CONFIG_ENV = "BENCH_CANVAS_CONFIG"
NOOP_TASK = "bench.noop"

app = Celery("bench_canvas")
app.conf.update(json.loads(os.environ.get(CONFIG_ENV, "{}")))


def _noop(*_args: Any, **_kwargs: Any) -> None:
    """Do nothing: what is measured is the hand-off between tasks."""


# Registered without decorator syntax: Celery is untyped, and the task object is Any.
noop: Any = app.task(name=NOOP_TASK)(_noop)
