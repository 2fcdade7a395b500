"""gathering-tasks: database-backed scheduled actions and DAG pipelines on Celery."""

from __future__ import annotations

__version__ = "0.1.0"
