"""For other services: enqueue gathering-tasks work by task name over the broker.

Needs only Celery and the broker URL, not this package's code or database::

    from celery import Celery
    Celery(broker="redis://...").send_task("gathering.trigger_action", args=["nightly-report"])

:class:`GatheringClient` wraps exactly that, with JSON-only settings.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

TRIGGER_ACTION = "gathering.trigger_action"
RUN_PIPELINE = "gathering.run_pipeline"
DEFAULT_QUEUE = "gathering"


class GatheringClient:
    """Publishes ``gathering.*`` tasks with JSON payloads."""

    def __init__(self, broker_url: str, *, queue: str = DEFAULT_QUEUE) -> None:
        self._queue = queue
        self._app = Celery("gathering-client", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_ignore_result=True,
            broker_connection_retry_on_startup=True,
        )

    def trigger(self, action_name: str) -> str:
        """Run ``action_name`` now (trigger ``api``). Returns the Celery task id."""
        return self.send(TRIGGER_ACTION, action_name)

    def run_pipeline(
        self, pipeline_name: str, data: dict[str, Any] | None = None, *, key: str | None = None
    ) -> str:
        """Start a run of ``pipeline_name`` with ``data``. Returns the Celery task id.

        With ``key``, a repeated call starts no second run."""
        result = self._app.send_task(
            RUN_PIPELINE, args=[pipeline_name, data or {}], kwargs={"key": key}, queue=self._queue
        )
        return str(result.id)

    def send(self, task_name: str, *args: Any) -> str:
        """Publish any ``gathering.*`` task by name with JSON arguments."""
        if not task_name.startswith("gathering."):
            raise ValueError(f"not a gathering task: {task_name!r}")
        result = self._app.send_task(task_name, args=list(args), queue=self._queue)
        return str(result.id)

    def close(self) -> None:
        self._app.close()
