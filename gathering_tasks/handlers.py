"""Handlers that ``run_task`` actions may call by name.

A handler is a plain function registered here, or a Celery task registered with the app;
``run_task`` only calls names that are registered handlers or listed in
``GATHERING_RUN_TASK_ALLOWLIST``. Users' modules listed in ``GATHERING_IMPORTS`` are imported
before any name is looked up (by workers at start, through Celery's ``imports``, and by the
CLI and API when they validate an action), so their ``@handler`` functions register.
See docs/handlers.md.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gathering_tasks import runtime
from gathering_tasks.errors import ConfigError

log = logging.getLogger(__name__)

Handler = Callable[..., Any]
_HANDLERS: dict[str, Handler] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as a ``run_task`` handler under ``name``."""

    def register(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        return fn

    return register


@functools.cache
def load_user_modules() -> tuple[str, ...]:
    """Import the modules of ``GATHERING_IMPORTS`` (once per process). Their names."""
    names = tuple(runtime.settings().imports)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"cannot import {name!r}: {exc}", field="GATHERING_IMPORTS") from exc
    return names


def get_handler(name: str) -> Handler | None:
    load_user_modules()
    return _HANDLERS.get(name)


def handler_names() -> list[str]:
    load_user_modules()
    return sorted(_HANDLERS)


@handler("demo.hello")
def hello(who: str = "world", **context: Any) -> dict[str, Any]:
    """Say hello in the worker log: the demo's visible heartbeat."""
    log.warning("hello, %s (action %s, slot %s)", who, context.get("action"), context.get("slot"))
    return {"greeted": who}


@handler("demo.add")
def add(a: float, b: float, **_context: Any) -> dict[str, Any]:
    """Add two numbers."""
    return {"sum": a + b}


@handler("demo.fail")
def fail(message: str = "this handler always fails", **_context: Any) -> None:
    """Always fail: shows retries and failed runs."""
    raise RuntimeError(message)


@handler("demo.record")
def record(key: str, **context: Any) -> dict[str, Any]:
    """Append ``run_id@slot`` to the Redis list ``key``: an observable, countable effect."""
    mark = f"{context.get('run_id')}@{context.get('slot')}"
    runtime.redis_client().rpush(key, mark)
    return {"recorded": mark}


@handler("demo.sleep")
def sleep(seconds: float = 1.0, **_context: Any) -> dict[str, Any]:
    """Sleep: shows time limits (a run past its ``timeout_s`` is recorded ``timed_out``)."""
    time.sleep(seconds)
    return {"slept_s": seconds}
