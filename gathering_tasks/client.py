"""For other services: enqueue gathering-tasks work by task name over the broker.

Needs only Celery and the broker URL, not this package's code or database::

    from celery import Celery
    Celery(broker="redis://...").send_task(
        "gathering.trigger_action", args=["nightly-report"], queue="gathering"
    )

:class:`GatheringClient` wraps exactly that, with JSON-only settings. The task names, queues
and payloads are the contract of ``docs/contract.md``.

Waiting for the outcome: a run's record in the database is its truth (Celery's result backend
is not used), so a client that is given ``database_url`` can find the run a message made and
wait for its end::

    client = GatheringClient(broker, database_url=db)
    message_id = client.trigger("nightly-report")
    run = client.wait_action_run("nightly-report", message_id, timeout_s=600)
    run["status"]  # succeeded | failed | timed_out | cancelled | skipped

A message dedupes on its ``key``, or else on its message id: either finds its run.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from gathering_tasks.api import (
    ActionService,
    PipelineService,
    pipeline_run_is_final,
    run_is_final,
    wait_until,
)
from gathering_tasks.contract import DEFAULT_QUEUE, RUN_PIPELINE, TRIGGER_ACTION
from gathering_tasks.db.repo import Repository
from gathering_tasks.runtime import open_repository
from gathering_tasks.settings import Settings

__all__ = ["DEFAULT_QUEUE", "RUN_PIPELINE", "TRIGGER_ACTION", "GatheringClient"]


class GatheringClient:
    """Publishes ``gathering.*`` tasks with JSON payloads; with ``database_url``, finds and
    waits for the runs they made."""

    def __init__(
        self, broker_url: str, *, queue: str = DEFAULT_QUEUE, database_url: str | None = None
    ) -> None:
        self._queue = queue
        self._database_url = database_url
        self._app = Celery("gathering-client", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_ignore_result=True,
            broker_connection_retry_on_startup=True,
        )

    def trigger(self, action_name: str, *, key: str | None = None) -> str:
        """Run ``action_name`` now (trigger ``api``). Returns the message (Celery task) id.

        With ``key``, a repeated call makes no second run."""
        kwargs = {"key": key} if key is not None else {}
        result = self._app.send_task(
            TRIGGER_ACTION, args=[action_name], kwargs=kwargs, queue=self._queue
        )
        return str(result.id)

    def run_pipeline(
        self, pipeline_name: str, data: dict[str, Any] | None = None, *, key: str | None = None
    ) -> str:
        """Start a run of ``pipeline_name`` with ``data``. Returns the message id.

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

    # -- outcomes (through the database) ----------------------------------------------------

    def find_action_run(self, action_name: str, key: str) -> dict[str, Any] | None:
        """The run a trigger made (``key``: the trigger's key, else its message id), or None
        while the message has not been taken yet."""
        return self._actions().find_trigger(action_name, key)

    def wait_action_run(
        self, action_name: str, key: str, *, timeout_s: float = 300, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """The run a trigger made, once it has ended; ``WaitTimedOut`` after ``timeout_s``."""
        actions = self._actions()
        return wait_until(
            lambda: actions.find_trigger(action_name, key),
            done=run_is_final,
            timeout_s=timeout_s,
            poll_s=poll_s,
            what=f"the run of {action_name} for {key}",
        )

    def find_pipeline_run(self, key: str) -> dict[str, Any] | None:
        """The pipeline run a message started (its key, else its message id), or None."""
        return self._pipelines().find_run(key)

    def wait_pipeline_run(
        self, key: str, *, timeout_s: float = 300, poll_s: float = 0.5
    ) -> dict[str, Any]:
        """The pipeline run a message started, once it has ended."""
        pipelines = self._pipelines()
        return wait_until(
            lambda: pipelines.find_run(key),
            done=pipeline_run_is_final,
            timeout_s=timeout_s,
            poll_s=poll_s,
            what=f"the pipeline run for {key}",
        )

    def _repository(self) -> Repository:
        if self._database_url is None:
            raise ValueError("finding runs needs the client's database_url")
        return open_repository(self._database_url)

    def _actions(self) -> ActionService:
        settings = Settings(database_url=self._database_url or "")
        return ActionService(self._repository(), settings, task_allowed=lambda _n: False)

    def _pipelines(self) -> PipelineService:
        settings = Settings(database_url=self._database_url or "")
        return PipelineService(self._repository(), settings, task_allowed=lambda _n: False)

    def close(self) -> None:
        self._app.close()
