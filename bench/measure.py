"""Measuring helpers shared by the benchmark's processes (standard library only).

Kept free of Celery, SQLAlchemy and the product so that importing it does not change the
peak RSS that a measuring subprocess reports.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# The name Celery gives the default queue's list on a Redis broker (our default_queue).
QUEUE = "gathering"


@dataclass(frozen=True)
class TickStats:
    """Wall time of repeated scheduler ticks, in milliseconds."""

    count: int
    median_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_s: list[float]) -> TickStats:
        samples_ms = sorted(s * 1000 for s in samples_s)
        p99 = statistics.quantiles(samples_ms, n=100, method="inclusive")[98]
        return cls(len(samples_ms), statistics.median(samples_ms), p99, samples_ms[-1])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_ticks(
    tick: Callable[[int], object], *, count: int, min_count: int, budget_s: float
) -> list[float]:
    """Call ``tick(i)`` ``count`` times back to back; stop early past ``budget_s``.

    At least ``min_count`` calls are always made, so a slow scheduler still yields a p99.
    """
    samples_s: list[float] = []
    deadline = time.monotonic() + budget_s
    for i in range(count):
        if i >= min_count and time.monotonic() > deadline:
            break
        started = time.perf_counter()
        tick(i)
        samples_s.append(time.perf_counter() - started)
    return samples_s


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    On Linux this is ``VmHWM`` (the high-water mark of this process's own memory map), not
    ``getrusage().ru_maxrss``: the kernel carries ru_maxrss across ``execve`` from the process
    that spawned us, so a fresh subprocess would report at least its parent's RSS.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """``getrusage().ru_maxrss`` in MiB (on Linux: at least the spawning parent's RSS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def emit(result: dict[str, Any]) -> None:
    """Hand the result to the parent: one JSON line, the last line on stdout."""
    print(json.dumps(result), flush=True)


@dataclass(frozen=True)
class Pumped:
    """Back-to-back ticks until a goal was met or a cap passed."""

    total_s: float
    cpu_s: float
    ticks: int
    done: int  # what was counted (slots published)
    capped: bool  # the cap passed before the goal
    last_tick_s: float  # the cost of the last tick (the one that met the goal)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pump(
    tick: Callable[[], object], count: Callable[[], int], *, goal: int, cap_s: float
) -> Pumped:
    """Call ``tick()`` back to back (no sleeps) until ``count() >= goal`` or ``cap_s`` passed.

    This is how a scheduler's loop behaves when it has work: Celery's ``Service`` sleeps only
    when ``tick()`` returns a positive interval, and every peer returns 0 while entries are due.
    """
    ticks, last_s = 0, 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + cap_s
    while count() < goal:
        if time.perf_counter() > deadline:
            break
        tick_started = time.perf_counter()
        tick()
        last_s = time.perf_counter() - tick_started
        ticks += 1
    done = count()
    return Pumped(
        total_s=time.perf_counter() - started,
        cpu_s=time.process_time() - cpu_started,
        ticks=ticks,
        done=done,
        capped=done < goal,
        last_tick_s=last_s,
    )


class Counter:
    """Counts calls of a wrapped callable (a scheduler's ``apply_async``)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def spread_ids(n: int, k: int) -> list[int]:
    """``k`` indices out of ``range(n)``, evenly spread (the due set mixes every kind)."""
    stride = max(1, n // k)
    return [i * stride for i in range(min(k, n))]
