"""The registry of kinds of work: one entry per kind, and nothing else to edit to add one.

Each kind names its Celery task, the function that executes a record of it, and (for action
types) the function that validates an action's config at the door. Functions are named as
``module:attribute`` and imported when first used, so that this registry stays free of
imports: the schema, the validation and the worker all read it.

A record's kind decides what a worker executes; a delivery whose task name is not the
record's kind is dropped (see ``gathering_tasks.guard``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Kind:
    """One kind of work."""

    name: str
    task_name: str
    executor: str  # "module:function(record, abort_event) -> result mapping | None"
    config_check: str | None = None  # "module:function(config, task_allowed)"; action types
    summary: str = ""

    @property
    def is_action(self) -> bool:
        return self.config_check is not None


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "run_task",
            "gathering.run_task",
            "gathering_tasks.work:execute_run_task",
            "gathering_tasks.work:check_run_task",
            "call a registered handler or an allowlisted Celery task",
        ),
        Kind(
            "execute_pipeline",
            "gathering.execute_pipeline",
            "gathering_tasks.work:execute_pipeline",
            "gathering_tasks.work:check_pipeline",
            "start a run of a pipeline",
        ),
        Kind(
            "send_notification",
            "gathering.send_notification",
            "gathering_tasks.work:execute_notification",
            "gathering_tasks.work:check_notification",
            "send a notification (webhook, Slack, Discord, Teams, email)",
        ),
        Kind(
            "call_api",
            "gathering.call_api",
            "gathering_tasks.work:execute_call_api",
            "gathering_tasks.work:check_call_api",
            "make an HTTP call through the guarded client",
        ),
        Kind(
            "pipeline_node",
            "gathering.pipeline_node",
            "gathering_tasks.work:execute_node",
            None,
            "execute one node of a pipeline run",
        ),
    )
}
ACTION_TYPES: tuple[str, ...] = tuple(name for name, kind in KINDS.items() if kind.is_action)
EXECUTION_KINDS: tuple[str, ...] = tuple(KINDS)


def kind(name: str) -> Kind:
    """The kind called ``name``; KeyError for an unknown one."""
    return KINDS[name]


@functools.cache
def resolve(path: str) -> Any:
    """Import ``module:attribute``."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
