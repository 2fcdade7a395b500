"""gathering-tasks: database-backed scheduled actions and DAG pipelines on Celery.

``celery -A gathering_tasks`` finds the app through the lazy ``celery`` attribute below, so
importing a pure module (``gathering_tasks.schedules``) does not configure Celery.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "celery":
        return importlib.import_module("gathering_tasks.app").app
    raise AttributeError(f"module 'gathering_tasks' has no attribute {name!r}")
