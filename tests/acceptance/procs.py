"""Real ``celery worker`` and ``celery beat`` processes for acceptance and chaos tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stack_env(database_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for processes of one test stack: fast recovery knobs, loopback HTTP open,
    and secrets referenced as ``TEST_*`` readable (see docs/security.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    env.update(
        GATHERING_DATABASE_URL=database_url,
        GATHERING_REDIS_URL=redis_url,
        GATHERING_BEAT_TICK_S="0.5",
        GATHERING_LEADER_LEASE_TTL_S="3",
        GATHERING_SWEEP_INTERVAL_S="1",
        GATHERING_PENDING_GRACE_S="3",
        GATHERING_RUN_LEASE_TTL_S="3",
        GATHERING_HTTP_ALLOW_NETWORKS="127.0.0.1/32",
        GATHERING_SECRET_ENV_ALLOW="TEST_*",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class CeleryProcess:
    """One celery process in its own process group, so a kill takes its children too."""

    def __init__(self, kind: str, name: str, env: dict[str, str], workdir: Path, *args: str):
        self.kind, self.name, self.env, self.workdir, self.args = kind, name, env, workdir, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def start(self) -> CeleryProcess:
        cmd = [sys.executable, "-m", "celery", "-A", "gathering_tasks", self.kind, *self.args]
        if self.kind == "worker":
            cmd += ["-n", f"{self.name}@%h", "--without-gossip", "--without-mingle"]
        if self.kind == "beat":
            cmd += ["-s", str(self.workdir / f"{self.name}-schedule")]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*cmd, "--loglevel=INFO"],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, no goodbye."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP the whole process group (a prefork pool child does the work): a process
        that is alive but runs nothing, like one stuck in swap or a paused VM."""
        self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the whole process group: a frozen process wakes where it stopped."""
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, signum: signal.Signals) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        os.killpg(self.proc.pid, signum)

    def stop(self, timeout_s: float = 15) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
            # A frozen group would hold the SIGTERM until the deadline: let it act on it.
            os.killpg(self.proc.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stack:
    """The processes a test started; all are stopped on exit, even when the test fails."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env, self.workdir = env, workdir
        self.procs: list[CeleryProcess] = []

    def worker(
        self,
        name: str,
        concurrency: int = 2,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> CeleryProcess:
        """Start a worker; ``args`` go to ``celery worker``, ``env`` replaces the stack's."""
        proc = CeleryProcess(
            "worker", name, env or self.env, self.workdir, f"--concurrency={concurrency}", *args
        )
        self.procs.append(proc.start())
        return proc

    def beat(self, name: str) -> CeleryProcess:
        proc = CeleryProcess("beat", name, self.env, self.workdir)
        self.procs.append(proc.start())
        return proc

    def beat_with(self, *, env: dict[str, str], name: str = "b1") -> CeleryProcess:
        """Start a beat whose environment replaces the stack's."""
        proc = CeleryProcess("beat", name, env, self.workdir)
        self.procs.append(proc.start())
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_text()[-4000:]}" for p in self.procs)


@contextlib.contextmanager
def running_stack(env: dict[str, str], workdir: Path) -> Iterator[Stack]:
    stack = Stack(env, workdir)
    try:
        yield stack
    finally:
        stack.stop_all()
