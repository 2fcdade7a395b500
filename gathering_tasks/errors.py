"""Exceptions, grouped by how the caller must respond.

* :class:`InvalidInput` -- the caller sent something wrong; nothing was written. Fix the input.
* :class:`PermanentFailure` -- the work failed and retrying will not help.
* :class:`RetryableFailure` -- the work failed for a reason that may pass; retry within policy.
* :class:`NotFound` -- the named object does not exist.
"""

from __future__ import annotations


class GatheringError(Exception):
    """A gathering-tasks error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidInput(GatheringError):
    """The input is invalid."""

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        self.field = field
        text = message or (self.__doc__ or "").strip()
        self.reason = text
        super().__init__(f"{field}: {text}" if field else text)


class ConfigError(InvalidInput):
    """The configuration is invalid."""


class NotFound(GatheringError):
    """The requested object does not exist."""


class PermanentFailure(GatheringError):
    """The work failed and retrying will not help."""


class RetryableFailure(GatheringError):
    """The work failed for a reason that may pass; it can be retried."""


class NotAvailable(PermanentFailure):
    """This action type is not available in this deployment."""


class TaskTimedOut(PermanentFailure):
    """The work exceeded its time limit."""


class ExecutionAborted(GatheringError):
    """The work was stopped: its record was cancelled or taken over by another attempt."""


class RunFailed(GatheringError):
    """The run failed; its record says why.

    Raised by a task after the record is written, so that Celery (and Flower) count the task
    as a FAILURE. Never retried by Celery: retries are the record's own policy.
    """


class RunTimedOut(RunFailed):
    """The run exceeded its time limit; its record says so."""


class RunRetrying(GatheringError):
    """The attempt failed and the run will be retried (the reason a task shows RETRY)."""


class InvalidPayload(InvalidInput):
    """The message does not match the task's published contract (docs/contract.md)."""


class WaitTimedOut(GatheringError):
    """Gave up waiting: the run had not finished by the deadline (it goes on)."""


class SchemaMissing(GatheringError):
    """The database has no schema yet: run `gathering-tasks db upgrade`."""
