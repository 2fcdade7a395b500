"""Run the ``gathering-tasks`` command: its exit code and output.

:func:`cli` runs it as a user would, a subprocess (the entry point, the import-time checks,
the interpreter's own exit). :func:`cli_in_process` runs the same command line in this process
with the same environment: the same code from the command's callback on, without the
interpreter start each command pays as a subprocess. Only ``GATHERING_*`` variables may differ
from this process's environment there (the settings); anything else needs :func:`cli`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kombu import pools
from typer.testing import CliRunner

from gathering_tasks import runtime
from gathering_tasks.app import app as celery_app
from gathering_tasks.app import celery_config
from gathering_tasks.cli import app as cli_app
from gathering_tasks.handlers import load_user_modules
from gathering_tasks.settings import get_settings

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "GATHERING_"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gathering_tasks.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli_in_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command line ``args`` run in this process under the ``GATHERING_*`` of ``env``.

    Like a subprocess, it starts from settings read from that environment, its own database
    engines, Redis client and broker connections, and gives them all up at the end. An
    exception that escapes the command is what the interpreter would print: its traceback on
    stderr, exit code 1.
    """
    if "GATHERING_IMPORTS" in env:
        # User modules register handlers process-wide: that takes a process of its own.
        raise ValueError("GATHERING_IMPORTS needs a subprocess: use cli()")
    changes: dict[str, str | None] = {k: v for k, v in env.items() if k.startswith(PREFIX)}
    changes |= {k: None for k in os.environ if k.startswith(PREFIX) and k not in env}
    runner = CliRunner()
    with _process_state(changes):
        result = runner.invoke(cli_app, list(args), env=changes, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(
        [sys.executable, "-m", "gathering_tasks.cli", *args],
        result.exit_code,
        result.stdout,
        stderr,
    )


@contextmanager
def _process_state(changes: dict[str, str | None]) -> Iterator[None]:
    """Per-process state built from the settings, fresh for the command and dropped after it;
    the Celery app is configured from the command's settings meanwhile, then put back."""
    _forget()
    saved = {k: os.environ.get(k) for k in changes}
    try:
        _set_environ(changes)
        _configure_celery()
    finally:
        _set_environ(saved)
    try:
        yield
    finally:
        _forget()
        _configure_celery()


def _set_environ(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _forget() -> None:
    get_settings.cache_clear()
    load_user_modules.cache_clear()
    runtime.reset()


def _configure_celery() -> None:
    """Point the Celery app at the current settings' broker, with no connection kept."""
    settings = get_settings()
    get_settings.cache_clear()
    celery_app.conf.update(celery_config(settings))
    amqp = celery_app.__dict__.get("amqp")
    stale = [celery_app._pool, amqp._producer_pool if amqp is not None else None]
    for group in (pools.connections, pools.producers):
        # kombu keeps one pool per broker address: a closed one must not be handed out again
        for key, pool in list(group.items()):
            if pool in stale:
                dict.__delitem__(group, key)  # the stored key, not one to hash again
    for pool in stale:
        if pool is not None:
            pool.force_close_all()
    celery_app._pool = None
    if amqp is not None:
        amqp._producer_pool = None
