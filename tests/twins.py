"""In-memory twins for unit tests of the execution guard: leases, a journal, a manual clock.

The ledger's twin is product code (``gathering_tasks.db.memory.MemoryLedger``); these are
test-only: a lease store whose renewals can be scripted, a journal that records what every
party did in order, and a ledger wrapper that writes each call into that journal.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from gathering_tasks.db.ledger import Carry, Closing, Dispatch, Pulse, Record, StartRefused
from gathering_tasks.db.memory import MemoryLedger

Renewal = Literal["held", "lost", "unknown"]


class Journal:
    """Events of every party (leases, ledger, publisher), in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[str] = []

    def add(self, event: str) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[str]:
        with self._lock:
            return list(self._events)

    def first(self, event: str) -> int:
        """Index of the first ``event``; ValueError if it never happened."""
        return self.events.index(event)

    def last(self, event: str) -> int:
        events = self.events
        return len(events) - 1 - events[::-1].index(event)

    def count(self, event: str) -> int:
        return self.events.count(event)

    def matching(self, prefix: str) -> list[str]:
        return [e for e in self.events if e.startswith(prefix)]


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class MemoryLeases:
    """Leases by name in memory: name -> owner token, like the Redis locks of ``locks.Lease``.

    A renewal answers ``held`` while the token owns the lease and ``lost`` once someone else
    does; :meth:`script` overrides the next answers (``unknown`` plays Redis not answering).
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._owners: dict[int, str] = {}
        self._scripts: dict[int, list[Renewal]] = {}
        self.acquire_calls = 0
        self.lost_seen = threading.Event()  # set when a renewal answers "lost"

    def lease_for(self, record_id: int) -> MemoryLease:
        """A new lease handle with its own token, as the guard makes one per delivery."""
        return MemoryLease(self, record_id, uuid.uuid4().hex)

    def hold(self, record_id: int, owner: str = "another-worker") -> None:
        """Another party takes the lease (or takes it over once it lapsed)."""
        with self._lock:
            self._owners[record_id] = owner

    def owner(self, record_id: int) -> str | None:
        with self._lock:
            return self._owners.get(record_id)

    def script(self, record_id: int, *answers: Renewal) -> None:
        """The next renewals of ``record_id``'s lease answer these, in order."""
        with self._lock:
            self._scripts[record_id] = list(answers)

    def _acquire(self, record_id: int, token: str) -> bool:
        with self._lock:
            self.acquire_calls += 1
            taken = record_id not in self._owners
            if taken:
                self._owners[record_id] = token
        self.journal.add("lease.acquire" if taken else "lease.acquire:refused")
        return taken

    def _renew(self, record_id: int, token: str) -> Renewal:
        with self._lock:
            script = self._scripts.get(record_id)
            if script:
                answer = script.pop(0)
            else:
                answer = "held" if self._owners.get(record_id) == token else "lost"
        self.journal.add(f"lease.renew:{answer}")
        if answer == "lost":
            self.lost_seen.set()
        return answer

    def _release(self, record_id: int, token: str) -> None:
        with self._lock:
            mine = self._owners.get(record_id) == token
            if mine:
                del self._owners[record_id]
        # A lost lease is left to its new owner, as Lease.release does.
        self.journal.add("lease.release" if mine else "lease.release:not-owner")


class MemoryLease:
    """One delivery's handle on a lease (``guard.LeaseLike``)."""

    def __init__(self, leases: MemoryLeases, record_id: int, token: str) -> None:
        self._leases, self._record_id, self.token = leases, record_id, token

    def acquire(self) -> bool:
        return self._leases._acquire(self._record_id, self.token)

    def renew(self) -> Renewal:
        return self._leases._renew(self._record_id, self.token)

    def release(self) -> None:
        self._leases._release(self._record_id, self.token)


class JournaledLedger:
    """A ``LedgerPort`` that writes each call of the ledger it wraps into a journal.

    ``ledger.<method>`` when the call returned, ``ledger.<method>:raised`` when it raised.
    """

    def __init__(self, ledger: MemoryLedger, journal: Journal) -> None:
        self.inner, self.journal = ledger, journal

    def _call(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            value = fn(*args, **kwargs)
        except Exception:
            self.journal.add(f"ledger.{name}:raised")
            raise
        self.journal.add(f"ledger.{name}")
        return value

    def start(
        self, record_id: int, *, kind: str, worker: str, task_id: str | None
    ) -> Record | StartRefused:
        result: Record | StartRefused = self._call(
            "start", self.inner.start, record_id, kind=kind, worker=worker, task_id=task_id
        )
        return result

    def start_many(
        self, record_ids: list[int], *, kind: str, worker: str, task_id: str | None
    ) -> list[Record]:
        result: list[Record] = self._call(
            "start_many",
            self.inner.start_many,
            record_ids,
            kind=kind,
            worker=worker,
            task_id=task_id,
        )
        return result

    def heartbeat(self, record_id: int, attempt: int) -> Pulse:
        result: Pulse = self._call("heartbeat", self.inner.heartbeat, record_id, attempt)
        return result

    def hand_back(self, records: list[Record]) -> set[int]:
        back: set[int] = self._call("hand_back", self.inner.hand_back, records)
        return back

    def finish_many(
        self,
        closings: list[Closing],
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> set[int]:
        closed: set[int] = self._call(
            "finish_many", self.inner.finish_many, closings, followups, carry
        )
        return closed

    def finish(
        self,
        record_id: int,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        followups: list[Dispatch] | None = None,
        carry: Carry | None = None,
    ) -> bool:
        written: bool = self._call(
            "finish",
            self.inner.finish,
            record_id,
            attempt,
            status=status,
            result=result,
            error=error,
            followups=followups,
            carry=carry,
        )
        return written

    def schedule_retry(self, record_id: int, attempt: int, *, delay_s: float, error: str) -> bool:
        written: bool = self._call(
            "schedule_retry",
            self.inner.schedule_retry,
            record_id,
            attempt,
            delay_s=delay_s,
            error=error,
        )
        return written

    def dispatch_of(self, record_id: int) -> Dispatch | None:
        result: Dispatch | None = self._call("dispatch_of", self.inner.dispatch_of, record_id)
        return result

    def cancel(self, record_id: int) -> str:
        status: str = self._call("cancel", self.inner.cancel, record_id)
        return status

    def state(self, record_id: int) -> tuple[int, str] | None:
        found: tuple[int, str] | None = self._call("state", self.inner.state, record_id)
        return found


def spin_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Busy-wait until ``condition()`` holds or ``timeout_s`` passes; whether it held.

    For executors that the guard may interrupt with its asynchronous ``ExecutionAborted``:
    delivered inside ``threading.Event.wait``, that exception can land after the event's
    internal lock was given up for waiting and before it is taken back, and the wait then
    fails with ``RuntimeError`` instead. A loop over ``Event.is_set`` holds no lock, so the
    abort lands cleanly (and the GIL's switch interval lets the keepers run meanwhile).
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
    return True
