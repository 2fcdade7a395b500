"""The execution guard: a record executes once at a time, and its record tells the truth.

For each delivery of a record's message a worker:

1. takes the record's Redis lease (token-checked);
2. moves the record ``pending|retrying -> running`` if it is of the delivery's kind
   (a conditional UPDATE); a delivery whose kind does not match is dropped untouched;
3. executes, while two independent keepers (one thread each per worker process, serving
   every record executing in it) run beside the work:
   * the **lease keeper** renews the Redis lease. It never waits on the database, so a
     stalled database cannot make a live run's lease lapse. A lease found lost is never
     re-taken (another worker may be inside the work by now);
   * the **heartbeat** stamps ``heartbeat_at`` with the database clock. If the database
     answers that the attempt no longer owns the record (the sweeper gave it away), or that
     the record was cancelled, the work is aborted;
4. writes the outcome fenced by the attempt; a failed write is retried (bounded, with
   backoff) while both keepers go on, so the sweeper never hands a finished run to another
   worker just because the database was restarting;
5. releases the lease, and only then publishes a retry, so its message finds the lease free.

The sweeper takes a record from its worker only when the heartbeat is stale AND the lease is
gone: a worker cut off from the database keeps its record as long as it is alive.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from gathering_tasks.db.ledger import (
    FINAL,
    Carry,
    Closing,
    Dispatch,
    LedgerPort,
    Record,
    StartRefused,
    dispatch_for,
)
from gathering_tasks.errors import ExecutionAborted, PermanentFailure, TaskTimedOut
from gathering_tasks.keys import OUTCOME_RETRY_MAX_WAIT_S
from gathering_tasks.locks import Lease, acquire_all, release_all
from gathering_tasks.policy import bounded_result, describe_error, retry_delay_s

log = logging.getLogger(__name__)
T = TypeVar("T")
# A record of a batch that has run this long hands back the records still waiting behind
# it (see _Turns), so that a slow node never holds the others up while workers are free.
BATCH_HOLD_S = 0.1

Executor = Callable[[Record, threading.Event], "Mapping[str, Any] | Detached | None"]
Outcome = Literal[
    "succeeded",
    "failed",
    "timed_out",
    "retrying",
    "cancelled",
    "superseded",
    "dropped",
    "waiting",
]
AbortReason = Literal["cancelled", "superseded"]


class LeaseLike(Protocol):
    def acquire(self) -> bool: ...

    def renew(self) -> Literal["held", "lost", "unknown"]: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class GuardConfig:
    lease_ttl_s: float
    heartbeat_interval_s: float
    max_result_bytes: int
    outcome_retry_s: float = 300.0
    retry_jitter: float = 0.0
    batch_hold_s: float = BATCH_HOLD_S


class _Interrupter:
    """Raises :class:`ExecutionAborted` in the thread executing the work, while it is armed.

    Cooperative executors watch the abort event; this reaches the rest at their next Python
    instruction (a blocking call returns first, within its own timeout).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread_id: int | None = None

    @contextmanager
    def armed(self) -> Iterator[None]:
        with self._lock:
            self._thread_id = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                thread_id, self._thread_id = self._thread_id, None
                # Clear an abort that was raised too late to land inside the work.
                if thread_id is not None:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)

    def fire(self) -> None:
        with self._lock:
            if self._thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread_id), ctypes.py_object(ExecutionAborted)
                )


class _Abort:
    """Why the work must stop, set once by a keeper."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: AbortReason | None = None
        self.interrupter = _Interrupter()
        self._lock = threading.Lock()

    def trigger(self, reason: AbortReason) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            self.event.set()
        self.interrupter.fire()


class _Ticker:
    """One thread of a process that calls, for every record executing in the process, its
    duty every interval (renew its lease; stamp its heartbeat). Started on first use, and
    afresh in a forked child (threads do not survive ``fork``).

    A duty returns False when it is done for good (lease lost, attempt taken over).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self.reset()

    def reset(self) -> None:
        """Forget the thread and its duties (in a forked child, whose copy of the lock may
        have been held by a thread that does not exist there)."""
        self._cond = threading.Condition()
        # key -> [next call (monotonic s), duty, interval s]
        self._duties: dict[int, list[Any]] = {}
        self._busy: int | None = None  # the key whose duty runs now
        self._started = False

    def add(self, key: int, duty: Callable[[], bool], interval_s: float) -> None:
        with self._cond:
            if not self._started:
                self._started = True
                threading.Thread(target=self._loop, name=self._name, daemon=True).start()
            self._duties[key] = [time.monotonic() + interval_s, duty, interval_s]
            self._cond.notify_all()

    def remove(self, key: int, *, wait_s: float) -> None:
        """Stop calling ``key``'s duty; wait (bounded) for a call in progress to return.
        A duty stuck in a stalled database call is left to return on its own."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._duties.pop(key, None)
            while self._busy == key and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _next(self) -> tuple[int, Callable[[], bool]]:
        with self._cond:
            while True:
                now = time.monotonic()
                due = min(self._duties.items(), key=lambda kv: kv[1][0], default=None)
                if due is not None and due[1][0] <= now:
                    key, entry = due
                    entry[0] = now + entry[2]
                    self._busy = key
                    return key, entry[1]
                self._cond.wait(None if due is None else due[1][0] - now)

    def _loop(self) -> None:
        while True:
            key, duty = self._next()
            try:
                keep = duty()
            except Exception as exc:  # a duty must not end the thread of every record
                log.warning("%s: %s", self._name, describe_error(exc))
                keep = True
            with self._cond:
                self._busy = None
                if not keep:
                    self._duties.pop(key, None)
                self._cond.notify_all()


_LEASES = _Ticker("gathering-lease-keeper")
_HEARTBEATS = _Ticker("gathering-heartbeat")


def _after_fork_in_child() -> None:
    _LEASES.reset()
    _HEARTBEATS.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Keepers:
    """While the block runs: the record's lease renewed and its heartbeat stamped, by the
    process's two keeper threads (one never waits on the database, the other on Redis)."""

    def __init__(
        self, ledger: LedgerPort, lease: LeaseLike, record: Record, config: GuardConfig
    ) -> None:
        self._ledger, self._lease, self._record = ledger, lease, record
        self._interval_s = config.heartbeat_interval_s
        self.abort = _Abort()
        self.lease_lost = False
        self._key = id(self)
        # Set once the work is over and its outcome is being written: then a heartbeat that
        # finds the attempt closed (a call stuck in a stalled database while the outcome
        # landed) says nothing new; the outcome write's own fence tells whether it was ours.
        self._closing = threading.Event()
        # Set when the block exits: a keeper call returning after that is ignored.
        self._done = threading.Event()

    def __enter__(self) -> _Keepers:
        _LEASES.add(self._key, self._keep_lease, self._interval_s)
        _HEARTBEATS.add(self._key, self._heartbeat, self._interval_s)
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._done.set()
        _LEASES.remove(self._key, wait_s=self._interval_s + 1)
        _HEARTBEATS.remove(self._key, wait_s=self._interval_s + 1)

    def closing(self) -> None:
        """The work is over; its outcome is about to be written (the keepers go on)."""
        self._closing.set()

    @property
    def lease(self) -> LeaseLike:
        return self._lease

    def stop(self) -> None:
        """What leaving the block does, now (a second call, or the exit, does nothing)."""
        self.__exit__(None, None, None)

    def check(self) -> None:
        """Stamp the heartbeat now: a record taken over or being cancelled sets the abort."""
        self._heartbeat()

    @property
    def _extra(self) -> dict[str, Any]:
        return {"run_id": self._record.id, "attempt": self._record.attempt}

    def _keep_lease(self) -> bool:
        if self._lease.renew() != "lost" or self._done.is_set():
            return not self._done.is_set()
        self.lease_lost = True
        # The record still fences this attempt; a lost lease is never re-taken.
        log.warning("run lease lost; the heartbeat alone guards it now", extra=self._extra)
        return False

    def _heartbeat(self) -> bool:
        try:
            pulse = self._ledger.heartbeat(self._record.id, self._record.attempt)
        except Exception as exc:
            if not self._done.is_set():
                log.warning("heartbeat write failed: %s", describe_error(exc), extra=self._extra)
            return not self._done.is_set()
        if self._done.is_set():
            return False
        if not pulse.owned and self._closing.is_set():
            log.debug("heartbeat found the attempt closed while its outcome is written")
            return False
        if not pulse.owned:
            log.warning("run was taken over by another attempt; aborting", extra=self._extra)
            self.abort.trigger("superseded")
            return False
        if pulse.cancel_requested:
            log.warning("run cancellation requested; aborting", extra=self._extra)
            self.abort.trigger("cancelled")
        return True


class _Turns:
    """The records of a batch, each with its keepers, in the order they run. Once the one
    running has run ``hold_s``, those still waiting are handed back (the heartbeat thread's
    duty :meth:`watch`): undone in the ledger, their leases released, published, for free
    workers to take. A lock keeps that from racing the next turn."""

    def __init__(
        self,
        entries: list[tuple[Record, _Keepers]],
        hold_s: float,
        hand_back: Callable[[list[tuple[Record, _Keepers]]], set[int]],
        handed_back: set[int],
    ) -> None:
        self._lock = threading.Lock()
        self._waiting = list(entries)
        self._hold_s = hold_s
        self._hand_back = hand_back
        self._began = time.monotonic()
        self.handed_back = handed_back  # filled in place

    def next(self) -> tuple[Record, _Keepers] | None:
        """The next record to run (None: the batch is over)."""
        with self._lock:
            if not self._waiting:
                return None
            self._began = time.monotonic()
            return self._waiting.pop(0)

    def watch(self) -> bool:
        """Hand the waiting records back if the running one is past ``hold_s``, once (those
        that did not go back wait for their turn); False once there is nothing to watch."""
        with self._lock:
            if not self._waiting:
                return False
            if time.monotonic() - self._began < self._hold_s:
                return True
            back = self._hand_back(self._waiting)
            self.handed_back |= back
            self._waiting = [entry for entry in self._waiting if entry[0].id not in back]
            return False

    @contextmanager
    def watched(self) -> Iterator[_Turns]:
        key = id(self)
        _HEARTBEATS.add(key, self.watch, self._hold_s / 2)
        try:
            yield self
        finally:
            _HEARTBEATS.remove(key, wait_s=self._hold_s + 1)


@dataclass(frozen=True)
class Detached:
    """What an executor returns when it handed its work on (it started a pipeline run): the
    record waits, holding no worker, until that work ends and writes its final status.
    ``followups`` are published once the record is marked waiting."""

    result: Mapping[str, Any]
    followups: tuple[Dispatch, ...] = ()


@dataclass(frozen=True)
class Report:
    """What one delivery of a record came to: the outcome, and enough to explain it."""

    status: Outcome
    record_id: int
    name: str | None = None
    attempt: int | None = None
    error: str | None = None
    retry_delay_s: float | None = None
    detail: str | None = None  # why a delivery was dropped
    pipeline_run_id: int | None = None  # the pipeline run the record is a node of
    # Follow-up records this process runs itself instead of publishing them (those the
    # ``keep`` of :meth:`ExecutionGuard.run` accepted); they are recorded ``pending``.
    kept: tuple[Dispatch, ...] = ()


@dataclass
class _Verdict:
    status: Outcome
    result: Mapping[str, Any] | None = None
    error: str | None = None
    retry_delay_s: float | None = None
    # records to publish once the lease is released: a pipeline's next nodes
    followups: list[Dispatch] = field(default_factory=list)


class ExecutionGuard:
    """Executes a ledger record under the lease + record guard, and records the outcome."""

    def __init__(
        self,
        ledger: LedgerPort,
        lease_for: Callable[[int], LeaseLike],
        config: GuardConfig,
        *,
        publish_retry: Callable[[Dispatch, float], None],
        publish_many: Callable[[list[Dispatch]], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._lease_for = lease_for
        self._config = config
        self._publish_retry = publish_retry
        self._publish_many = publish_many or self._publish_each

    def execute(
        self, record_id: int, kind: str, executor: Executor, *, worker: str, task_id: str | None
    ) -> Outcome:
        """Execute ``record_id`` once. ``dropped``: another delivery has it, it is done, or
        the delivery's ``kind`` is not the record's."""
        return self.run(record_id, kind, executor, worker=worker, task_id=task_id).status

    def run(
        self,
        record_id: int,
        kind: str,
        executor: Executor,
        *,
        worker: str,
        task_id: str | None,
        keep: Callable[[Dispatch], bool] | None = None,
    ) -> Report:
        """Like :meth:`execute`, with what the task needs to tell Celery what happened.

        ``keep``: the follow-ups the outcome made ready (a pipeline's next nodes) that it
        accepts are not published but returned as ``Report.kept``, for the caller to run in
        this process. They are committed ``pending`` like the others (if this process dies
        before running them, the sweeper publishes them), but for the one node a chain goes
        on with, which is committed already started for this worker (its dispatch carries
        the started record, see :class:`Carry`; pass it to :meth:`run_many` as
        ``started``): if this process dies before running it, the sweeper takes it over as
        it does any running record whose worker died.
        """
        reports, kept = self.run_many(
            [record_id], kind, executor, worker=worker, task_id=task_id, keep=keep
        )
        return replace(reports[0], kept=kept)

    def run_many(
        self,
        record_ids: list[int],
        kind: str,
        executor: Executor,
        *,
        worker: str,
        task_id: str | None,
        keep: Callable[[Dispatch], bool] | None = None,
        started: Iterable[Record] = (),
    ) -> tuple[list[Report], tuple[Dispatch, ...]]:
        """:meth:`run` for a batch: ready nodes of one pipeline run, executed one after the
        other in this process. Their leases are taken first and they start in one
        transaction; each has its own lease keeper, heartbeat and abort from then on, and
        their final outcomes are written in one transaction that moves the run on once. An
        outcome that is not final (a retry) is written on its own, as a lone record's is.
        ``started``: records of ``record_ids`` already started for this worker (kept
        follow-ups that carried their start): they are not started again.
        Returns a report per record id, in order, and the follow-ups ``keep`` accepted."""
        reports: dict[int, Report] = {}
        carry = None if keep is None else Carry(worker, task_id, keep)
        leases = self._acquire(record_ids, kind, reports)
        done: list[tuple[Record, _Verdict]] = []
        back: set[int] = set()  # handed back (their leases released then)
        try:
            records = self._start(list(leases), kind, worker, task_id, reports, started=started)
            for record_id in [i for i in leases if i in reports]:
                leases.pop(record_id).release()
            done = self._take_turns(records, leases, executor, back, carry)
        finally:
            _release_all([lease for record_id, lease in leases.items() if record_id not in back])
        for record_id in back:
            reports[record_id] = Report(
                "dropped", record_id, detail="handed back: a slow node held up its batch"
            )
        followups: list[Dispatch] = []
        for record, verdict in done:
            if verdict.retry_delay_s is not None:
                self._publish_retry_of(record, verdict.retry_delay_s)
            followups += verdict.followups
            reports[record.id] = Report(
                verdict.status,
                record.id,
                name=record.name,
                attempt=record.attempt,
                error=verdict.error,
                retry_delay_s=verdict.retry_delay_s,
                pipeline_run_id=record.pipeline_run_id,
            )
        kept = tuple(
            d for d in followups if d.started is not None or (keep is not None and keep(d))
        )
        others = [d for d in followups if d not in kept]
        if others:
            self._publish_followups(others)
        return [reports[i] for i in record_ids], kept

    def _acquire(
        self, record_ids: list[int], kind: str, reports: dict[int, Report]
    ) -> dict[int, LeaseLike]:
        """The records' leases; a report for each that another worker holds."""
        leases: dict[int, LeaseLike] = {}
        wanted = [self._lease_for(record_id) for record_id in record_ids]
        for record_id, lease, taken in zip(record_ids, wanted, _acquire_all(wanted), strict=True):
            if taken:
                leases[record_id] = lease
            else:
                log.info(
                    "run is leased by another worker; dropping this delivery",
                    extra={"run_id": record_id, "kind": kind},
                )
                reports[record_id] = Report("dropped", record_id, detail="leased by another worker")
        return leases

    def _take_turns(
        self,
        records: list[Record],
        leases: dict[int, LeaseLike],
        executor: Executor,
        back: set[int],
        carry: Carry | None = None,
    ) -> list[tuple[Record, _Verdict]]:
        """Run the started records in turn, each under its keepers, and write their
        outcomes. The ids of those handed back meanwhile are added to ``back``."""
        done: list[tuple[Record, _Verdict]] = []
        with ExitStack() as stack:
            entries = [
                (r, stack.enter_context(_Keepers(self._ledger, leases[r.id], r, self._config)))
                for r in records
            ]
            turns = _Turns(entries, self._config.batch_hold_s, self._hand_back, back)
            if len(entries) > 1:
                stack.enter_context(turns.watched())
            while (entry := turns.next()) is not None:
                record, keeper = entry
                reason = keeper.abort.reason
                verdict = (
                    self._run(record, executor, keeper.abort)
                    if reason is None
                    # Cancelled or taken over while it waited for its turn in a batch.
                    else _Verdict(reason, error=f"run {reason} before it began")
                )
                keeper.closing()
                done.append((record, verdict))
            return self._record_outcomes(done, carry)

    def _hand_back(self, waiting: list[tuple[Record, _Keepers]]) -> set[int]:
        """Hand the records that wait in a batch back (see :class:`_Turns`): the ids that
        went back. Those that did not (cancelled, or taken over) learn why before their turn."""
        try:
            back = self._ledger.hand_back([record for record, _k in waiting])
        except Exception as exc:  # they wait for their turn after all
            log.warning("handing back %d waiting run(s) failed: %s", len(waiting), exc)
            return set()
        for record, keeper in waiting:
            if record.id in back:
                keeper.stop()
            else:
                keeper.check()
        _release_all([keeper.lease for record, keeper in waiting if record.id in back])
        dispatches = [
            dispatch_for(r.id, r.kind, r.definition, slot=r.scheduled_for, attempt=r.attempt)
            for r, _k in waiting
            if r.id in back
        ]
        if dispatches:
            log.info("handed back %d run(s) a slow node held up", len(dispatches))
            self._publish_followups(dispatches)
        return back

    def _start(
        self,
        record_ids: list[int],
        kind: str,
        worker: str,
        task_id: str | None,
        reports: dict[int, Report],
        *,
        started: Iterable[Record] = (),
    ) -> list[Record]:
        """Start the records (but those ``started`` already); a report for each that may
        not start."""
        carried = {r.id: r for r in started if r.id in record_ids}
        if carried:
            others = [i for i in record_ids if i not in carried]
            fresh = self._start(others, kind, worker, task_id, reports)
            return sorted([*carried.values(), *fresh], key=lambda r: r.id)
        if not record_ids:
            return []
        if len(record_ids) == 1:
            one = self._ledger.start(record_ids[0], kind=kind, worker=worker, task_id=task_id)
            if not isinstance(one, StartRefused):
                return [one]
            _log_refusal(one, kind, {"run_id": record_ids[0], "kind": kind})
            reports[record_ids[0]] = Report("dropped", record_ids[0], detail=_refusal_text(one))
            return []
        records = self._ledger.start_many(record_ids, kind=kind, worker=worker, task_id=task_id)
        ids = {r.id for r in records}
        for record_id in record_ids:
            if record_id not in ids:
                # Taken by another worker since it was offered, or ended meanwhile.
                reports[record_id] = Report("dropped", record_id, detail="no longer startable")
        return records

    def _run(self, record: Record, executor: Executor, abort: _Abort) -> _Verdict:
        log.info("run %s started", record.name, extra=_extra(record))
        try:
            with abort.interrupter.armed():
                result = executor(record, abort.event)
        except ExecutionAborted as exc:
            return _Verdict(abort.reason or "cancelled", error=describe_error(exc))
        except Exception as exc:
            if abort.reason is not None:
                # The work turned the abort into an error of its own: it is still the abort.
                return _Verdict(abort.reason, error=describe_error(exc))
            return self._judge_failure(record, exc)
        if abort.reason is not None:
            # Finished, but the record was cancelled or taken over meanwhile: say so.
            outcome = result.result if isinstance(result, Detached) else result
            return _Verdict(abort.reason, result=outcome, error=f"run {abort.reason} while working")
        if isinstance(result, Detached):
            return _Verdict("waiting", result=result.result, followups=list(result.followups))
        return _Verdict("succeeded", result=result)

    def _judge_failure(self, record: Record, exc: Exception) -> _Verdict:
        if isinstance(exc, TaskTimedOut):
            return _Verdict("timed_out", error=describe_error(exc))
        if isinstance(exc, PermanentFailure):
            return _Verdict("failed", result=_failure_data(exc), error=describe_error(exc))
        return self._retry_or_fail(record, exc)

    def _retry_or_fail(self, record: Record, exc: Exception) -> _Verdict:
        error = describe_error(exc)
        policy = record.retry
        if record.attempt >= policy.max_attempts:
            log.warning(
                "run %s failed after %d attempts: %s",
                record.name,
                record.attempt,
                error,
                extra=_extra(record),
            )
            return _Verdict("failed", result=_failure_data(exc), error=error)
        delay_s = retry_delay_s(
            record.attempt,
            policy.backoff_s,
            policy.backoff_max_s,
            jitter=policy.jitter or self._config.retry_jitter,
        )
        return _Verdict("retrying", error=error, retry_delay_s=delay_s)

    def _record_outcomes(
        self, done: list[tuple[Record, _Verdict]], carry: Carry | None = None
    ) -> list[tuple[Record, _Verdict]]:
        """Write each outcome: a batch's final ones together, any other on its own."""
        together = [i for i, (_r, v) in enumerate(done) if v.status in FINAL]
        if len(done) < 2 or not together:
            return [
                (record, self._record_outcome(record, verdict, carry)) for record, verdict in done
            ]
        batch = [done[i] for i in together]
        written = self._record_batch(batch, carry)
        return [
            (record, written[record.id] if i in together else self._record_outcome(record, verdict))
            for i, (record, verdict) in enumerate(done)
        ]

    def _record_batch(
        self, batch: list[tuple[Record, _Verdict]], carry: Carry | None = None
    ) -> dict[int, _Verdict]:
        closings = [
            Closing(
                record,
                verdict.status,
                bounded_result(verdict.result, self._config.max_result_bytes),
                verdict.error,
            )
            for record, verdict in batch
        ]
        ready: list[Dispatch] = []

        def write() -> set[int]:
            ready.clear()
            return self._ledger.finish_many(closings, ready, carry)

        closed, retried = self._with_retries(write, _extra(batch[0][0]))
        written: dict[int, _Verdict] = {}
        for record, verdict in batch:
            mine = record.id in closed or (
                retried and self._ledger.state(record.id) == (record.attempt, verdict.status)
            )
            written[record.id] = self._logged(record, verdict if mine else _Verdict("superseded"))
        # The run moved on once, for the whole batch: its follow-ups go with the last record.
        written[batch[-1][0].id].followups.extend(ready)
        return written

    def _record_outcome(
        self, record: Record, verdict: _Verdict, carry: Carry | None = None
    ) -> _Verdict:
        """Write the outcome, retrying while the database is unreachable."""
        if verdict.status == "superseded":
            return self._logged(record, verdict)
        written, retried = self._with_retries(
            lambda: self._write(record, verdict, carry), _extra(record)
        )
        if not written and retried:
            # A try that raised may have committed with its reply lost: then the fence
            # turned away our own retry. The record says whether it was ours.
            written = self._ledger.state(record.id) == (record.attempt, verdict.status)
        return self._logged(record, verdict if written else _Verdict("superseded"))

    def _with_retries(self, write: Callable[[], T], extra: dict[str, Any]) -> tuple[T, bool]:
        """``write()``, tried again while the database is unreachable (within
        ``outcome_retry_s``). Also says whether it took more than one try."""
        tries: list[int] = []

        def attempt() -> T:
            tries.append(1)
            return write()

        retrying = Retrying(
            stop=stop_after_delay(self._config.outcome_retry_s),
            wait=wait_exponential(multiplier=0.1, max=OUTCOME_RETRY_MAX_WAIT_S),
            retry=retry_if_exception_type(SQLAlchemyError),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "outcome write failed (try %d), retrying", state.attempt_number, extra=extra
            ),
        )
        return retrying(attempt), len(tries) > 1

    def _logged(self, record: Record, verdict: _Verdict) -> _Verdict:
        if verdict.status == "superseded":
            log.warning("run %s outcome dropped: taken over", record.name, extra=_extra(record))
        else:
            log.info("run %s %s", record.name, verdict.status, extra=_extra(record))
        return verdict

    def _write(self, record: Record, verdict: _Verdict, carry: Carry | None = None) -> bool:
        if verdict.status == "retrying":
            return self._ledger.schedule_retry(
                record.id,
                record.attempt,
                delay_s=verdict.retry_delay_s or 0.0,
                error=verdict.error or "",
            )
        stored = bounded_result(verdict.result, self._config.max_result_bytes)
        ready: list[Dispatch] = []
        written = self._ledger.finish(
            record.id,
            record.attempt,
            status=verdict.status,
            result=stored,
            error=verdict.error,
            followups=ready,
            carry=carry,
        )
        verdict.followups.extend(ready)
        return written

    def _publish_each(self, dispatches: list[Dispatch]) -> None:
        for dispatch in dispatches:
            self._publish_retry(dispatch, 0.0)

    def _publish_followups(self, dispatches: list[Dispatch]) -> None:
        try:
            self._publish_many(dispatches)
        except Exception as exc:
            # They are recorded pending: the sweeper publishes them after the grace.
            log.warning("publishing %d follow-up(s) failed: %s", len(dispatches), exc)

    def _publish_retry_of(self, record: Record, delay_s: float) -> None:
        # The record already says where its messages go: no database call here.
        dispatch = dispatch_for(
            record.id,
            record.kind,
            record.definition,
            slot=record.scheduled_for,
            attempt=record.attempt + 1,
        )
        try:
            self._publish_retry(dispatch, delay_s)
        except Exception as exc:
            # The record is ``retrying`` with its time: the sweeper re-publishes it.
            log.warning("retry publish failed: %s", describe_error(exc), extra=_extra(record))


def _acquire_all(leases: list[LeaseLike]) -> list[bool]:
    """Each lease taken, Redis leases of a batch in one round trip."""
    redis_leases = [lease for lease in leases if isinstance(lease, Lease)]
    if len(redis_leases) == len(leases) > 1:
        return acquire_all(redis_leases)
    return [lease.acquire() for lease in leases]


def _release_all(leases: list[LeaseLike]) -> None:
    redis_leases = [lease for lease in leases if isinstance(lease, Lease)]
    if len(redis_leases) == len(leases) > 1:
        release_all(redis_leases)
    else:
        for lease in leases:
            lease.release()


def _extra(record: Record) -> dict[str, Any]:
    return {
        "run_id": record.id,
        "action_id": record.action_id,
        "action": record.name,
        "attempt": record.attempt,
    }


def _log_refusal(refused: StartRefused, kind: str, extra: dict[str, Any]) -> None:
    if refused.reason == "kind_mismatch":
        log.warning(
            "delivery for %s carries a %s run; dropped without touching it",
            kind,
            refused.kind,
            extra=extra,
        )
    elif refused.reason == "missing":
        log.warning("no such run; dropping this delivery", extra=extra)
    else:
        log.info("run is %s; dropping this delivery", refused.status, extra=extra)


def _refusal_text(refused: StartRefused) -> str:
    if refused.reason == "kind_mismatch":
        return f"the run is a {refused.kind} run, not of this task"
    if refused.reason == "missing":
        return "no such run"
    return f"the run is {refused.status}"


def _failure_data(exc: BaseException) -> dict[str, Any] | None:
    data = getattr(exc, "record", None)
    if callable(data):
        value = data()
        return dict(value) if isinstance(value, Mapping) else None
    return None
