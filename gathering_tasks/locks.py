"""Redis lease locks with tokens: acquire, compare-and-extend, compare-and-release.

redis-py's :class:`redis.lock.Lock` already does the token bookkeeping with Lua scripts
(release and extend only succeed for the holder of the token); this module gives it the
non-blocking, never-raising shape the guard and the beat leader need.
"""

from __future__ import annotations

import logging
import uuid
from typing import Literal

import redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger(__name__)


def holder(token: str | bytes | None) -> str | None:
    """The owner named in a lease's token (see ``Lease(owner=...)``), if any."""
    if isinstance(token, bytes):
        token = token.decode(errors="replace")
    if not token or " " not in token:
        return None
    return token.rsplit(" ", 1)[0]


class Lease:
    """A token-checked lease on ``name`` that lives ``ttl_s`` unless extended."""

    def __init__(
        self, client: redis.Redis, name: str, ttl_s: float, *, owner: str | None = None
    ) -> None:
        self.name = name
        self.ttl_s = ttl_s
        # ``owner`` (e.g. host:pid) goes first in the token, so who holds it can be read back.
        self.token = f"{owner} {uuid.uuid4().hex}" if owner else uuid.uuid4().hex
        self._lock = client.lock(name, timeout=ttl_s, blocking=False, thread_local=False)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it. False (never an exception) when taken or down."""
        try:
            return bool(self._lock.acquire(blocking=False, token=self.token))
        except RedisError as exc:
            log.warning("lease acquire failed: %s", exc, extra={"lease": self.name})
            return False

    def extend(self) -> bool:
        """Reset the TTL if we still hold the lease; False if it was lost (or Redis is down)."""
        return self.renew() == "held"

    def renew(self) -> Literal["held", "lost", "unknown"]:
        """Reset the TTL if we still hold the lease.

        ``lost``: somebody else holds it or it expired (a holder never re-takes a lost
        lease: another worker may be inside the work by now). ``unknown``: Redis did not
        answer; the lease may still be ours, so the caller may try again.
        """
        try:
            return "held" if self._lock.extend(self.ttl_s, replace_ttl=True) else "lost"
        except LockError as exc:
            log.warning("lease lost: %s", exc, extra={"lease": self.name})
            return "lost"
        except RedisError as exc:
            log.warning("lease renewal failed: %s", exc, extra={"lease": self.name})
            return "unknown"

    def release(self) -> None:
        """Give the lease back if we still hold it; a lost lease is left alone."""
        try:
            self._lock.release()
        except (LockError, RedisError) as exc:
            log.info("lease not released: %s", exc, extra={"lease": self.name})
