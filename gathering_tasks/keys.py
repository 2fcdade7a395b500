"""Every Redis key gathering-tasks uses, in one place."""

from __future__ import annotations


def run_lock(prefix: str, run_id: int) -> str:
    """The lease lock held by the worker executing run ``run_id``."""
    return f"{prefix}:lock:run:{run_id}"


def beat_leader(prefix: str) -> str:
    """The lease that makes one beat replica the leader."""
    return f"{prefix}:beat:leader"
