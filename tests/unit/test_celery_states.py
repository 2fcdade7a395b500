"""What Celery (and so Flower) is told about each guard outcome, and how messages are labelled."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from celery.exceptions import Retry

from gathering_tasks.db.ledger import Dispatch
from gathering_tasks.errors import RunFailed, RunRetrying, RunTimedOut
from gathering_tasks.guard import Report
from gathering_tasks.publish import message_labels
from gathering_tasks.tasks.actions import celery_outcome


def report(status: str, **extra: object) -> Report:
    return Report(status, 22, name="nightly-report", attempt=1, **extra)  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "error"), [("failed", RunFailed), ("timed_out", RunTimedOut)])
def test_a_failed_or_timed_out_run_raises_so_celery_records_failure(status: str, error: type):
    with pytest.raises(error, match=r"run 22 \(nightly-report\) attempt 1 .*: boom"):
        celery_outcome(report(status, error="RuntimeError: boom"))


def test_a_retry_raises_celery_retry_carrying_the_reason():
    with pytest.raises(Retry) as caught:
        celery_outcome(report("retrying", error="RuntimeError: boom", retry_delay_s=5.0))
    assert isinstance(caught.value.exc, RunRetrying)
    assert "retrying in 5s" in str(caught.value.exc)


@pytest.mark.parametrize(
    ("status", "prefix"),
    [
        ("succeeded", "succeeded: run 22 (nightly-report)"),
        ("waiting", "waiting: run 22"),
        ("cancelled", "cancelled: run 22"),
        ("superseded", "superseded: run 22"),
    ],
)
def test_other_outcomes_are_successes_named_by_their_result(status: str, prefix: str):
    assert celery_outcome(report(status)).startswith(prefix)


def test_a_dropped_delivery_says_why():
    text = celery_outcome(Report("dropped", 22, detail="the run is succeeded"))
    assert text == "dropped: run 22: the run is succeeded (duplicate delivery)"


def test_messages_carry_a_readable_name_and_arguments_only():
    slot = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    dispatch = Dispatch(22, "run_task", label="nightly-report", slot=slot, attempt=2)
    assert message_labels(dispatch) == {
        "shadow": "run_task nightly-report",
        "argsrepr": "run=22 name=nightly-report slot=2026-12-01T02:30:00+00:00 attempt=2",
        "kwargsrepr": "{}",
    }
    # Without a label (a record from before labels), the task name stays
    assert message_labels(Dispatch(5, "call_api"))["shadow"] == "gathering.call_api"
