"""What every benchmark shares: the throwaway servers, subprocesses, the machine's description.

Everything started here is stopped on exit, Ctrl-C and SIGTERM included (``stop_on_sigterm``
turns SIGTERM into KeyboardInterrupt, so the ``ExitStack`` callbacks run).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from gathering_tasks.db.engine import make_engine
from tests.servers import PostgresServer, RedisServer, free_port, running_postgres

ROOT = Path(__file__).resolve().parent.parent
Log = Callable[[str], None]

PACKAGES = (
    "celery",
    "kombu",
    "sqlalchemy",
    "psycopg2-binary",
    "redis",
    "celery-redbeat",
    "sqlalchemy-celery-beat",
    "django-celery-beat",
    "django",
    "matplotlib",
)


@dataclass
class Servers:
    pg: PostgresServer
    redis: RedisServer

    def redis_url(self, db: int) -> str:
        return self.redis.url.rsplit("/", 1)[0] + f"/{db}"


def start_servers(stack: ExitStack) -> Servers:
    """A throwaway PostgreSQL cluster and Redis server, stopped when ``stack`` closes."""
    pg = stack.enter_context(running_postgres())
    # Not running_redis(): it starts the server outside its try, so an interrupt while Redis
    # boots would leave it running. RedisServer.stop() leaves its directory: removed after.
    broker = RedisServer(free_port(), dir=tempfile.mkdtemp(prefix="gt-redis-"))
    stack.callback(shutil.rmtree, broker.dir, ignore_errors=True)
    stack.callback(broker.stop)
    broker.start()
    return Servers(pg, broker)


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class ChildTimeout(RuntimeError):
    """A measuring subprocess did not finish within its time cap."""


def run_child(
    module: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 600
) -> dict[str, Any]:
    """Run ``python -m module args`` from the repo root; return its last stdout line (JSON)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            # Out of the terminal's process group: Ctrl-C reaches only this process, which
            # then kills the child (subprocess.run does on any exception) and stops the servers.
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChildTimeout(f"{module} {' '.join(args[:2])}: > {timeout_s:g} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so that the finally blocks stop the servers."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def make_log() -> Log:
    started = time.monotonic()

    def log(message: str) -> None:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"[{time.monotonic() - started:6.1f}s load {load}] {message}",
            file=sys.stderr,
            flush=True,
        )

    return log


def markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout
        return out.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def machine(servers: Servers) -> dict[str, Any]:
    """Machine, load, versions and commit, for the report and the JSON."""
    engine = make_engine(servers.pg.dsn())
    try:
        with engine.connect() as conn:
            pg_version = conn.exec_driver_sql("SHOW server_version").scalar_one()
    finally:
        engine.dispose()
    client = redis.Redis.from_url(servers.redis.url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    return {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_mb": round(ram_mb()),
        "os": f"{platform.system()} {platform.release()}",
        "load_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "redis": redis_version,
        "packages": {name: package_version(name) for name in PACKAGES},
        "commit": git_commit(),
    }


def machine_lines(info: dict[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    return [
        f"date:     {info['date']}",
        f"machine:  {info['arch']}, {info['cpu']}, nproc={info['nproc']}, "
        f"usable={info['usable_cores']}, RAM {info['ram_mb'] / 1024:.1f} GiB, {info['os']}",
        f"load:     {' '.join(f'{x:.2f}' for x in info['load_at_start'])} (1/5/15 min average "
        "at start; other work on the machine shows up in the p99s)",
        f"software: Python {info['python']}, PostgreSQL {info['postgresql']}, "
        f"Redis {info['redis']}, {packages}",
        f"commit:   {info['commit']}",
    ]


def machine_info(pg: PostgresServer, broker: RedisServer) -> list[str]:
    """The machine's description as lines (``bench/pipelines.py``'s header)."""
    return machine_lines(machine(Servers(pg, broker)))
