"""Redis lease locks with tokens: acquire, compare-and-extend, compare-and-release.

A lease is a key holding its holder's token, with a TTL: ``SET NX PX`` takes it, and two
Lua scripts extend or delete it only while it still holds that token (the scheme of
redis-py's :class:`redis.lock.Lock`, which offers no way to take or give back many leases
in one round trip). :func:`acquire_all` and :func:`release_all` do that for a batch of
records, through one pipeline each. Nothing here waits or raises: the guard and the beat
leader get ``False`` or ``"unknown"`` when Redis does not answer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# KEYS[1]: the lease; ARGV[1]: the holder's token; ARGV[2]: the new TTL in milliseconds.
_EXTEND = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('del', KEYS[1])
"""


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
        self.client = client
        self._held = False

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def acquire(self) -> bool:
        """Take the lease if nobody holds it. False (never an exception) when taken or down."""
        try:
            self._held = bool(self.client.set(self.name, self.token, nx=True, px=self._ttl_ms))
        except RedisError as exc:
            log.warning("lease acquire failed: %s", exc, extra={"lease": self.name})
            return False
        return self._held

    def extend(self) -> bool:
        """Reset the TTL if we still hold the lease; False if it was lost (or Redis is down)."""
        return self.renew() == "held"

    def renew(self) -> Literal["held", "lost", "unknown"]:
        """Reset the TTL if we still hold the lease.

        ``lost``: somebody else holds it or it expired (a holder never re-takes a lost
        lease: another worker may be inside the work by now). ``unknown``: Redis did not
        answer; the lease may still be ours, so the caller may try again.
        """
        if not self._held:
            return "lost"
        try:
            extended = self.client.eval(_EXTEND, 1, self.name, self.token, self._ttl_ms)
        except RedisError as exc:
            log.warning("lease renewal failed: %s", exc, extra={"lease": self.name})
            return "unknown"
        if extended:
            return "held"
        self._held = False
        log.warning("lease lost: no longer held by this token", extra={"lease": self.name})
        return "lost"

    def release(self) -> None:
        """Give the lease back if we still hold it; a lost lease is left alone."""
        release_all([self])

    def _released(self, deleted: Any) -> None:
        if self._held and not deleted:
            log.info("lease not released: no longer held", extra={"lease": self.name})
        self._held = False


def acquire_all(leases: Sequence[Lease]) -> list[bool]:
    """:meth:`Lease.acquire` of each lease (all on one client), in one round trip."""
    if len(leases) < 2:
        return [lease.acquire() for lease in leases]
    pipe = leases[0].client.pipeline(transaction=False)
    for lease in leases:
        pipe.set(lease.name, lease.token, nx=True, px=lease._ttl_ms)
    try:
        replies = pipe.execute()
    except RedisError as exc:
        log.warning("lease acquire failed for %d: %s", len(leases), exc)
        return [False] * len(leases)
    for lease, reply in zip(leases, replies, strict=True):
        lease._held = bool(reply)
    return [lease._held for lease in leases]


def release_all(leases: Sequence[Lease]) -> None:
    """:meth:`Lease.release` of each lease (all on one client), in one round trip."""
    held = [lease for lease in leases if lease._held]
    for lease in leases:
        if not lease._held:
            log.info("lease not released: not held", extra={"lease": lease.name})
    if not held:
        return
    pipe = held[0].client.pipeline(transaction=False)
    for lease in held:
        pipe.eval(_RELEASE, 1, lease.name, lease.token)
    try:
        replies = pipe.execute()
    except RedisError as exc:  # it expires with its TTL
        log.info("lease not released: %s", exc, extra={"lease": held[0].name})
        return
    for lease, reply in zip(held, replies, strict=True):
        lease._released(reply)
