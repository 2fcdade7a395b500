"""A run's request budget: the guard's attempts are the run's retries, and the record shows
every request. Real guard over the in-memory ledger and lease twins, a real local server."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from pytest_httpserver import HTTPServer

from gathering_tasks.db.ledger import Record
from gathering_tasks.db.memory import MemoryLedger
from gathering_tasks.guard import ExecutionGuard, GuardConfig
from gathering_tasks.settings import Settings
from gathering_tasks.skills import executors
from tests.twins import Journal, ManualClock, MemoryLeases

LOOPBACK = ["127.0.0.1/32"]


def call_api_definition(url: str, **overrides: Any) -> dict[str, Any]:
    """A ``call_api`` record's snapshot with the action defaults (3 attempts)."""
    return {
        "name": "poll-inventory",
        "config": {"url": url},
        "retry_max_attempts": 3,
        "retry_backoff_s": 0.0,
        "retry_backoff_max_s": 0.0,
        "timeout_s": None,
        **overrides,
    }


def run_to_the_end(settings: Settings, definition: Mapping[str, Any]) -> dict[str, Any]:
    """Execute one record through the guard, attempt after attempt, until it is final."""
    ledger = MemoryLedger(clock=ManualClock())
    guard = ExecutionGuard(
        ledger,
        MemoryLeases(Journal()).lease_for,
        GuardConfig(
            lease_ttl_s=5.0, heartbeat_interval_s=0.05, max_result_bytes=16384, outcome_retry_s=5
        ),
        publish_retry=lambda _dispatch, _delay_s: None,
    )
    record_id = ledger.add("call_api", "trigger:budget:1", definition)

    def executor(record: Record, _abort: threading.Event) -> Mapping[str, Any] | None:
        return executors.call_api(record.config, record.idempotency_key, settings=settings)

    for _ in range(20):
        if guard.execute(record_id, "call_api", executor, worker="w1", task_id="t") != "retrying":
            break
    return ledger.get(record_id)


def test_default_budget_is_one_request_per_guard_attempt(server: HTTPServer) -> None:
    # Given an API that is down, and an action with the default 3 attempts
    server.expect_request("/inventory").respond_with_data("down", status=503)
    settings = Settings(http_allow_networks=LOOPBACK)

    # When its run is executed to the end by the guard
    record = run_to_the_end(settings, call_api_definition(server.url_for("/inventory")))

    # Then the run made 3 requests in all (not 3 attempts of 3 requests each)
    assert len(server.log) == 3
    assert record["status"] == "failed"
    assert [entry["attempt"] for entry in record["attempts"]] == [1, 2, 3]
    # And the record lists the requests of its last attempt: one, with status and time
    (request,) = record["result"]["requests"]
    assert request["attempt"] == 1
    assert request["status"] == 503
    assert request["elapsed_ms"] >= 0


def test_client_retries_within_an_attempt_only_when_configured(server: HTTPServer) -> None:
    # Given client retries turned on (3 requests per guard attempt) and a single guard attempt
    server.expect_request("/inventory").respond_with_data("down", status=503)
    settings = Settings(http_allow_networks=LOOPBACK, http_max_attempts=3)
    definition = call_api_definition(server.url_for("/inventory"), retry_max_attempts=1)

    # When its run is executed
    record = run_to_the_end(settings, definition)

    # Then the budget is 1 x 3 requests, and the record shows each of them
    assert len(server.log) == 3
    assert [(r["attempt"], r["status"]) for r in record["result"]["requests"]] == [
        (1, 503),
        (2, 503),
        (3, 503),
    ]


def test_success_record_lists_each_request_of_the_attempt(server: HTTPServer) -> None:
    # Given an API answering through a redirect
    server.expect_request("/start").respond_with_data("", status=302, headers={"Location": "/end"})
    server.expect_request("/end").respond_with_json({"items": 42})
    settings = Settings(http_allow_networks=LOOPBACK)
    definition = call_api_definition(server.url_for("/start"))
    definition["config"]["follow_redirects"] = True

    # When its run is executed
    record = run_to_the_end(settings, definition)

    # Then it succeeded, and the result lists both hops of the one attempt
    assert record["status"] == "succeeded"
    hops = [(r["attempt"], r["hop"], r["status"]) for r in record["result"]["requests"]]
    assert hops == [(1, 0, 302), (1, 1, 200)]
    assert all(r["host"] == "127.0.0.1" for r in record["result"]["requests"])
