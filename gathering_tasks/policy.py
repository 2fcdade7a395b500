"""Pure decisions of the execution core: retry timing, lost-record recovery, storable results.

No I/O here: the guard and the sweeper call these with data and act on the answer.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from gathering_tasks.db.sweeps import StaleRecord


def retry_delay_s(
    attempt: int, backoff_s: float, backoff_max_s: float, *, jitter: float = 0.0
) -> float:
    """Exponential backoff ``backoff_s * 2**(attempt-1)``, capped; ``jitter`` spreads it by
    up to that fraction so that many failures at once do not retry in lockstep."""
    delay = float(min(backoff_max_s, backoff_s * (2 ** max(0, attempt - 1))))
    if jitter > 0 and delay > 0:
        delay *= 1 + random.uniform(-jitter, jitter)
    return max(0.0, delay)


def lost_record_decision(
    stale: StaleRecord, now: datetime, *, default_time_limit_s: int
) -> Literal["timed_out", "failed", "requeue"]:
    """What to do with a record whose worker stopped heartbeating (and lost its lease)."""
    limit_s = stale.timeout_s or default_time_limit_s
    if (now - stale.started_at).total_seconds() > limit_s:
        return "timed_out"
    if stale.attempt >= stale.retry_max_attempts:
        return "failed"
    return "requeue"


def storable(value: Any) -> Any:
    """A JSON value every database accepts: NaN/infinities -> null, NUL characters dropped."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


def bounded_result(value: Mapping[str, Any] | None, max_bytes: int) -> dict[str, Any] | None:
    """Keep a result storable and small: an oversized result is stored as an excerpt."""
    if value is None:
        return None
    clean: dict[str, Any] = storable(json.loads(json.dumps(value, default=str)))
    text = json.dumps(clean, separators=(",", ":"))
    if len(text) <= max_bytes:
        return clean
    return {"truncated": True, "size": len(text), "excerpt": text[: max_bytes // 2]}


def describe_error(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 3] + "..."
