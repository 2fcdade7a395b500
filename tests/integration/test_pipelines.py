"""Pipelines through the store, the planner and the guard, on both databases.

A pipeline's nodes are ledger records run by the guard; here one in-process "worker" drains
the published records in order (no Celery, no sleeps), so every interleaving is exact. Real
worker processes run pipelines in tests/acceptance/test_pipelines_distributed.py.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from pytest_httpserver import HTTPServer
from sqlalchemy import event

from gathering_tasks import keys
from gathering_tasks.api import ActionService, PipelineService
from gathering_tasks.db.ledger import Dispatch, Record
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import InvalidInput, NotFound
from gathering_tasks.guard import ExecutionGuard, Report
from gathering_tasks.locks import Lease
from gathering_tasks.pipelines import executor
from gathering_tasks.settings import Settings, get_settings
from gathering_tasks.sweeper import Sweeper
from gathering_tasks.work import NODE_SKILLS
from tests.factories import make_guard
from tests.servers import wait_for

Abort = threading.Event


class Drain:
    """One worker that executes published records until none is left."""

    def __init__(self, repo: Repository, settings: Settings) -> None:
        self.repo = repo
        self.queue: deque[Dispatch] = deque()
        self.executed: list[str] = []
        self.guard: ExecutionGuard = make_guard(
            repo, settings, on_publish=lambda d, _delay: self.queue.append(d)
        )
        # the sink make_guard also fills is not used: on_publish feeds the queue

    def publish(self, dispatches: list[Dispatch]) -> None:
        self.queue.extend(dispatches)

    def run(self, limit: int = 5000) -> None:
        steps = 0
        while self.queue and steps < limit:
            dispatch = self.queue.popleft()
            steps += 1
            self.guard.execute(
                dispatch.record_id,
                dispatch.kind,
                self._executor(dispatch.kind),
                worker="w",
                task_id=None,
            )

    def _executor(self, kind: str) -> Any:
        store = self.repo.pipelines
        if kind == "pipeline_node":

            def node(record: Record, abort: Abort) -> Any:
                self.executed.append(str(record.node_id))
                return executor.execute_node(
                    store, record, abort, skills=NODE_SKILLS, task_allowed=lambda _n: True
                )

            return node
        return lambda record, abort: executor.start_pipeline(store, record, abort)


@pytest.fixture
def pipelines(repo: Repository, settings: Settings) -> PipelineService:
    return PipelineService(repo, settings, task_allowed=lambda _n: True)


@pytest.fixture
def drain(repo: Repository, settings: Settings) -> Drain:
    return Drain(repo, settings)


def publishing_to(pipelines: PipelineService, drain: Drain) -> PipelineService:
    """The pipeline service, publishing a run's first nodes to ``drain``."""
    return PipelineService(
        pipelines.repo, pipelines.settings, task_allowed=lambda _n: True, publish=drain.publish
    )


def run(
    pipelines: PipelineService, drain: Drain, name: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Start a run, drain it, return the run with its nodes."""
    service = publishing_to(pipelines, drain)
    run_id = service.run(name, data or {})
    drain.run()
    return service.get_run(run_id)


def add(a: str, b: str) -> dict[str, Any]:
    return {
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [a, b]},
    }


def nodes_of(run_: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["node_id"]: node for node in run_["nodes"]}


DIAMOND = {
    "nodes": [
        {"id": "start", "type": "trigger"},
        {"id": "left", "type": "action", "config": add("{{ trigger.x }}", 1)},
        {"id": "right", "type": "action", "config": add("{{ trigger.x }}", 2)},
        {"id": "both", "type": "join"},
        {
            "id": "total",
            "type": "action",
            "config": add("{{ nodes.left.output.sum }}", "{{ nodes.right.output.sum }}"),
        },
    ],
    "edges": [
        {"from": "start", "to": "left"},
        {"from": "start", "to": "right"},
        {"from": "left", "to": "both"},
        {"from": "right", "to": "both"},
        {"from": "both", "to": "total"},
    ],
}


def test_a_diamond_runs_each_node_once_and_passes_outputs_on(
    pipelines: PipelineService, drain: Drain
):
    # Given a diamond: trigger -> two branches -> join -> a node using both outputs
    pipelines.create("diamond", DIAMOND)
    # When it runs with x = 10
    result = run(pipelines, drain, "diamond", {"x": 10})
    # Then every node ran once, in dependency order, and the outputs flowed through
    assert result["status"] == "succeeded"
    assert Counter(drain.executed) == Counter(
        {n: 1 for n in ("start", "left", "right", "both", "total")}
    )
    nodes = nodes_of(result)
    assert nodes["total"]["output"] == {"sum": 23}
    assert result["outputs"] == {"total": {"sum": 23}}
    # And each node's record keeps what it was given and its idempotency key
    assert nodes["total"]["input"]["inputs"] == {"both": nodes["both"]["output"]}
    assert {n["attempt"] for n in result["nodes"]} == {1}


def test_a_false_condition_skips_its_branch_and_what_only_it_reaches(
    pipelines: PipelineService, drain: Drain
):
    # Given a condition whose true branch leads to "big" and false branch to "small",
    # each followed by a node only that branch reaches, and a final node both reach
    pipelines.create(
        "branch",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {"id": "check", "type": "condition", "config": {"expression": "trigger.x > `5`"}},
                {"id": "big", "type": "action", "config": add(1, 1)},
                {"id": "big-after", "type": "action", "config": add(2, 2)},
                {"id": "small", "type": "action", "config": add(3, 3)},
                {"id": "end", "type": "join", "config": {"policy": "any"}},
            ],
            "edges": [
                {"from": "start", "to": "check"},
                {"from": "check", "to": "big", "branch": "true"},
                {"from": "big", "to": "big-after"},
                {"from": "check", "to": "small", "branch": "false"},
                {"from": "big-after", "to": "end"},
                {"from": "small", "to": "end"},
            ],
        },
    )
    # When it runs with a small x
    result = run(pipelines, drain, "branch", {"x": 1})
    # Then the true branch and the node only it reaches are recorded skipped; the rest ran
    statuses = {n["node_id"]: n["status"] for n in result["nodes"]}
    assert statuses == {
        "start": "succeeded",
        "check": "succeeded",
        "big": "skipped",
        "big-after": "skipped",
        "small": "succeeded",
        "end": "succeeded",
    }
    assert result["status"] == "succeeded"
    assert "big" not in drain.executed


def test_a_map_fans_out_one_record_per_item_and_the_join_gathers_them(
    pipelines: PipelineService, drain: Drain
):
    # Given a map over the trigger's list, each item added to 100, gathered by a join
    pipelines.create(
        "mapped",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {
                    "id": "each",
                    "type": "map",
                    "config": {
                        "source": "{{ nodes.start.output.items }}",
                        "action": add("{{ item }}", 100),
                    },
                },
                {"id": "gather", "type": "join"},
            ],
            "edges": [{"from": "start", "to": "each"}, {"from": "each", "to": "gather"}],
        },
    )
    # When it runs over 25 items
    result = run(pipelines, drain, "mapped", {"items": list(range(25))})
    # Then each item was one record, run once, and the join saw every result in order
    assert result["status"] == "succeeded"
    children = [n for n in result["nodes"] if n["node_id"].startswith("each[")]
    assert len(children) == 25 and {c["status"] for c in children} == {"succeeded"}
    assert Counter(drain.executed)["each[3]"] == 1
    gathered = nodes_of(result)["gather"]["output"]["each"]
    assert [r["sum"] for r in gathered["results"]] == [i + 100 for i in range(25)]


def test_a_failing_node_retries_then_fails_the_run_with_its_error(
    pipelines: PipelineService, drain: Drain
):
    # Given a node that always fails, with two attempts and no backoff, and a node after it
    pipelines.create(
        "failing",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {
                    "id": "boom",
                    "type": "action",
                    "config": {"action_type": "run_task", "config": {"task": "demo.fail"}},
                    "retry": {"max_attempts": 2, "backoff_s": 0, "jitter": 0},
                },
                {"id": "after", "type": "action", "config": add(1, 1)},
            ],
            "edges": [{"from": "start", "to": "boom"}, {"from": "boom", "to": "after"}],
        },
    )
    # When it runs
    result = run(pipelines, drain, "failing")
    # Then the node was attempted twice, the run failed naming it, and nothing ran after it
    boom = nodes_of(result)["boom"]
    assert (boom["status"], boom["attempt"]) == ("failed", 2)
    assert [a["status"] for a in boom["attempts"]] == ["retrying", "failed"]
    assert "this handler always fails" in boom["error"]
    assert result["status"] == "failed" and "boom" in result["error"]
    assert "after" not in nodes_of(result)


def test_a_template_that_does_not_resolve_fails_the_node_naming_the_path(
    pipelines: PipelineService, drain: Drain
):
    pipelines.create(
        "unresolved",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {"id": "use", "type": "action", "config": add("{{ trigger.missing.deep }}", 1)},
            ],
            "edges": [{"from": "start", "to": "use"}],
        },
    )
    result = run(pipelines, drain, "unresolved", {"present": 1})
    use = nodes_of(result)["use"]
    assert use["status"] == "failed"
    assert "'use'" in use["error"] and "missing" in use["error"]


def test_cancel_stops_the_queued_nodes_of_a_run(pipelines: PipelineService, drain: Drain):
    # Given a started diamond whose nodes are queued but not run
    pipelines.create("to-cancel", DIAMOND)
    service = publishing_to(pipelines, drain)
    run_id = service.run("to-cancel", {"x": 1})
    # When it is cancelled, then its queued messages are delivered
    assert service.cancel(run_id) == "cancelled"
    drain.run()
    # Then nothing ran and every queued node ended cancelled
    result = service.get_run(run_id)
    assert result["status"] == "cancelled"
    assert drain.executed == []
    assert {n["status"] for n in result["nodes"]} == {"cancelled"}


def test_a_scheduled_execute_pipeline_action_mirrors_the_pipeline_outcome(
    repo: Repository, settings: Settings, pipelines: PipelineService, drain: Drain
):
    # Given the diamond, and an execute_pipeline action triggered by hand
    pipelines.create("diamond", DIAMOND)
    actions = ActionService(
        repo, settings, task_allowed=lambda _n: True, publish=drain.queue.append
    )
    actions.create(
        {
            "name": "nightly-diamond",
            "action_type": "execute_pipeline",
            "config": {"pipeline": "diamond", "inputs": {"x": 1}},
            "schedule": {"kind": "interval", "every_s": 3600},
        }
    )
    record_id = actions.trigger("nightly-diamond")
    # When the action's record and then the nodes run
    drain.run()
    # Then the action's run waited for the pipeline (holding no worker) and ended as it did
    action_run = actions.get_run(record_id)
    assert action_run["status"] == "succeeded"
    run_id = action_run["result"]["pipeline_run_id"]
    pipeline_run = pipelines.get_run(run_id)
    assert pipeline_run["status"] == "succeeded" and pipeline_run["action_run_id"] == record_id
    assert action_run["result"]["outputs"] == pipeline_run["outputs"]


def test_an_edit_makes_a_new_version_and_a_run_keeps_its_own(
    pipelines: PipelineService, drain: Drain
):
    pipelines.create("versioned", DIAMOND)
    service = publishing_to(pipelines, drain)
    first = service.run("versioned", {"x": 1})
    # When the pipeline is edited while that run is queued
    smaller = {"nodes": DIAMOND["nodes"][:2], "edges": DIAMOND["edges"][:1]}
    assert service.update("versioned", smaller)["version"] == 2
    drain.run()
    # Then the started run finished on version 1's five nodes, a new one uses version 2
    assert {v["version"] for v in service.versions("versioned")} == {1, 2}
    assert service.get_run(first)["pipeline_version"] == 1
    assert len(service.get_run(first)["nodes"]) == 5
    second = service.run("versioned", {"x": 1})
    drain.run()
    assert len(service.get_run(second)["nodes"]) == 2


def test_a_run_key_starts_one_run(pipelines: PipelineService, drain: Drain):
    pipelines.create("keyed", DIAMOND)
    first = pipelines.run("keyed", {"x": 1}, key="order-7")
    assert pipelines.run("keyed", {"x": 1}, key="order-7") == first
    assert pipelines.run("keyed", {"x": 1}) != first


def test_invalid_definitions_are_refused_with_every_error(pipelines: PipelineService):
    with pytest.raises(InvalidInput) as info:
        pipelines.create(
            "broken",
            {
                "nodes": [
                    {"id": "start", "type": "trigger"},
                    {"id": "a", "type": "teleport"},
                    {"id": "b", "type": "action", "config": {"action_type": "execute_pipeline"}},
                ],
                "edges": [{"from": "start", "to": "ghost"}, {"from": "b", "to": "b"}],
            },
        )
    text = str(info.value)
    for piece in ("'a'", "'b'", "ghost"):
        assert piece in text
    assert pipelines.list_pipelines() == []
    with pytest.raises(NotFound):
        pipelines.run("broken")


@pytest.fixture
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the node skills read the process settings: open loopback for the local server
    monkeypatch.setenv("GATHERING_HTTP_ALLOW_NETWORKS", "127.0.0.1/32")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_action_nodes_call_the_real_skills_with_the_node_idempotency_key(
    pipelines: PipelineService, drain: Drain, server: HTTPServer, loopback_allowed: None
):
    # Given a node calling a local HTTP server with a value from the trigger
    server.expect_request("/orders/7").respond_with_json({"total": 12})
    url = server.url_for("/orders/{{ trigger.order }}")
    pipelines.create(
        "http",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {
                    "id": "fetch",
                    "type": "action",
                    "config": {"action_type": "call_api", "config": {"method": "GET", "url": url}},
                },
            ],
            "edges": [{"from": "start", "to": "fetch"}],
        },
    )
    # When it runs
    result = run(pipelines, drain, "http", {"order": 7})
    # Then the call went out with the node's key, and its answer is the node's output
    fetch = nodes_of(result)["fetch"]
    assert fetch["status"] == "succeeded" and fetch["output"]["json"] == {"total": 12}
    (request, _response) = server.log[0]
    assert request.headers["Idempotency-Key"] == f"gathering-node-{result['id']}-fetch"


def test_a_node_that_keeps_failing_opens_its_circuit_and_fails_fast(
    pipelines: PipelineService, drain: Drain
):
    # Given a node that always fails, with a circuit opening after 2 failed runs
    pipelines.create(
        "flaky",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {
                    "id": "call",
                    "type": "action",
                    "config": {
                        "action_type": "run_task",
                        "config": {"task": "demo.fail"},
                        "circuit": {"failures": 2, "cooldown_s": 3600},
                    },
                },
            ],
            "edges": [{"from": "start", "to": "call"}],
        },
    )
    # When it runs three times
    errors = [nodes_of(run(pipelines, drain, "flaky"))["call"]["error"] for _ in range(3)]
    # Then the first two failed doing the work, the third failed fast: the circuit was open
    assert all("this handler always fails" in e for e in errors[:2])
    assert "circuit open" in errors[2] and "this handler" not in errors[2]
    assert drain.executed.count("call") == 3


def test_a_kept_follow_up_is_not_published_and_is_handed_back_to_run_here(
    pipelines: PipelineService, drain: Drain
):
    # Given the diamond started, its trigger's message delivered
    # When the guard runs it with a ``keep`` that accepts the first pipeline node offered
    offered: list[int] = []

    def keep(dispatch: Dispatch) -> bool:
        offered.append(dispatch.record_id)
        return len(offered) == 1

    service, run_id, report = ran_trigger(pipelines, drain, "diamond-kept", DIAMOND, keep)

    # Then of the two branches made ready, the kept one is handed back (recorded pending)
    # and only the other one is published
    assert report.status == "succeeded"
    assert [d.record_id for d in report.kept] == offered[:1]
    published = [d.record_id for d in drain.queue]
    assert len(published) == 1 and published[0] != offered[0]
    kept = pipelines.repo.ledger.get(offered[0])
    assert kept["status"] == "pending"
    # and running it here, then draining the rest, completes the run once per node
    drain.queue.extendleft(report.kept)
    drain.run()
    result = service.get_run(run_id)
    assert result["status"] == "succeeded"
    assert Counter(drain.executed) == Counter(
        {n: 1 for n in ("start", "left", "right", "both", "total")}
    )


def ran_trigger(
    pipelines: PipelineService,
    drain: Drain,
    name: str,
    definition: dict[str, Any],
    keep: Any,
    *,
    worker: str = "w",
) -> tuple[PipelineService, int, Report]:
    """``definition`` created as ``name`` and a run of it started; its trigger's message (the
    only one) delivered to ``worker``, whose guard runs it with ``keep``."""
    pipelines.create(name, definition)
    service = publishing_to(pipelines, drain)
    run_id = service.run(name, {"x": 1})
    trigger = drain.queue.popleft()
    assert not drain.queue
    report = drain.guard.run(
        trigger.record_id,
        trigger.kind,
        drain._executor(trigger.kind),
        worker=worker,
        task_id="t1",
        keep=keep,
    )
    return service, run_id, report


def fan(width: int, *, failing: int | None = None) -> dict[str, Any]:
    """trigger -> parallel -> ``width`` nodes -> join -> one last node."""
    leaves = [f"leaf-{i}" for i in range(width)]

    def task(name: str, *args: int) -> dict[str, Any]:
        return {"action_type": "run_task", "config": {"task": name, "args": list(args)}}

    def leaf(i: int) -> dict[str, Any]:
        return task("demo.fail") if i == failing else task("demo.add", i, 1)

    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            {"id": "split", "type": "parallel"},
            *({"id": n, "type": "action", "config": leaf(i)} for i, n in enumerate(leaves)),
            {"id": "gather", "type": "join"},
            {"id": "after", "type": "action", "config": task("demo.add", 1, 2)},
        ],
        "edges": [
            {"from": "start", "to": "split"},
            *({"from": "split", "to": n} for n in leaves),
            *({"from": n, "to": "gather"} for n in leaves),
            {"from": "gather", "to": "after"},
        ],
    }


def fanned_out(pipelines: PipelineService, drain: Drain, name: str) -> tuple[int, list[Dispatch]]:
    """A run of ``name`` whose trigger and split ran: its leaves are published."""
    service = publishing_to(pipelines, drain)
    run_id = service.run(name, {"x": 1})
    while drain.queue and "split" not in drain.executed:
        drain.run(limit=1)
    leaves = list(drain.queue)
    drain.queue.clear()
    return run_id, leaves


def commits_during(repo: Repository, work: Any) -> tuple[Any, int]:
    engine = repo.ledger.factory.kw["bind"]
    commits: list[int] = []

    def count(_connection: Any) -> None:
        commits.append(1)

    event.listen(engine, "commit", count)
    try:
        return work(), len(commits)
    finally:
        event.remove(engine, "commit", count)


def test_a_batch_of_ready_nodes_starts_in_one_transaction_and_ends_in_another(
    pipelines: PipelineService, drain: Drain
):
    # Given a run fanned out to 12 leaves, their messages published
    pipelines.create("fan-batch", fan(12))
    run_id, leaves = fanned_out(pipelines, drain, "fan-batch")
    assert len(leaves) == 12
    # and the store offering them as the run's pending nodes
    offered = pipelines.repo.pipelines.pending_nodes(run_id, limit=100)
    assert sorted(d.record_id for d in offered) == sorted(d.record_id for d in leaves)

    # When one worker runs them as one batch
    def batch() -> Any:
        return drain.guard.run_many(
            [d.record_id for d in offered],
            "pipeline_node",
            drain._executor("pipeline_node"),
            worker="w",
            task_id="batch",
            keep=lambda d: False,
        )

    (reports, kept), commits = commits_during(pipelines.repo, batch)

    # Then every leaf ran once and succeeded, in two transactions in all
    assert [r.status for r in reports] == ["succeeded"] * 12
    assert {r.pipeline_run_id for r in reports} == {run_id}
    assert commits == 2
    assert Counter(drain.executed)["leaf-3"] == 1
    # and the join, made ready by the batch's outcome, was published once
    assert kept == () and len(drain.queue) == 1
    # Each leaf has its own record: its attempt, its worker and task, its output
    nodes = nodes_of(publishing_to(pipelines, drain).get_run(run_id))
    for i in range(12):
        leaf = nodes[f"leaf-{i}"]
        assert (leaf["status"], leaf["attempt"], leaf["worker"]) == ("succeeded", 1, "w")
        assert leaf["output"] == {"sum": i + 1}
        assert [a["status"] for a in leaf["attempts"]] == ["succeeded"]
    # and the rest of the run completes once per node
    drain.run()
    result = publishing_to(pipelines, drain).get_run(run_id)
    assert result["status"] == "succeeded"
    assert all(n == 1 for n in Counter(drain.executed).values())
    # and a second delivery of a leaf is dropped
    again, _ = drain.guard.run_many(
        [leaves[0].record_id, leaves[1].record_id],
        "pipeline_node",
        drain._executor("pipeline_node"),
        worker="w2",
        task_id=None,
    )
    assert [r.status for r in again] == ["dropped", "dropped"]


def test_a_failing_node_in_a_batch_fails_the_run_and_the_others_keep_their_outcomes(
    pipelines: PipelineService, drain: Drain
):
    # Given a run fanned out to 5 leaves, one of which always fails (no retry)
    pipelines.create("fan-fail", fan(5, failing=2))
    run_id, leaves = fanned_out(pipelines, drain, "fan-fail")

    # When they run as one batch
    reports, _kept = drain.guard.run_many(
        [d.record_id for d in leaves],
        "pipeline_node",
        drain._executor("pipeline_node"),
        worker="w",
        task_id=None,
    )

    # Then the failing leaf failed with its error, the others succeeded
    statuses = [r.status for r in reports]
    assert statuses.count("failed") == 1 and statuses.count("succeeded") == 4
    result = publishing_to(pipelines, drain).get_run(run_id)
    nodes = nodes_of(result)
    assert "this handler always fails" in nodes["leaf-2"]["error"]
    assert nodes["leaf-0"]["status"] == "succeeded"
    # and the run failed, naming it, with nothing after the join started
    assert result["status"] == "failed" and "leaf-2" in result["error"]
    assert "gather" not in nodes and not drain.queue


def test_a_batch_skips_the_nodes_another_worker_holds(
    pipelines: PipelineService, drain: Drain, settings: Settings
):
    # Given a run fanned out to 4 leaves, one of them leased by another worker
    pipelines.create("fan-held", fan(4))
    _run_id, leaves = fanned_out(pipelines, drain, "fan-held")
    client = redis.Redis.from_url(settings.redis_url)
    held = Lease(client, keys.run_lock(settings.key_prefix, leaves[1].record_id), 30)
    assert held.acquire()
    try:
        # When the batch runs
        reports, _kept = drain.guard.run_many(
            [d.record_id for d in leaves],
            "pipeline_node",
            drain._executor("pipeline_node"),
            worker="w",
            task_id=None,
        )
    finally:
        held.release()

    # Then that one is dropped, untouched, and the other three ran
    assert [r.status for r in reports] == ["succeeded", "dropped", "succeeded", "succeeded"]
    assert pipelines.repo.ledger.get(leaves[1].record_id)["status"] == "pending"


HELD_S = 30.0  # the longest a test holds a node in the middle of its batch


def holding_first(drain: Drain, until: Any, before: Any = None) -> tuple[Any, list[str]]:
    """The node executor, except that the first node it runs waits for ``until()`` (after
    ``before()``) before it works: a slow node at the head of a batch."""
    run_node = drain._executor("pipeline_node")
    began: list[str] = []

    def node(record: Record, abort: Any) -> Any:
        began.append(str(record.node_id))
        if len(began) == 1:
            if before is not None:
                before()
            wait_for(until, HELD_S, "the waiting nodes to be handed back")
        return run_node(record, abort)

    return node, began


def test_a_slow_node_hands_back_the_nodes_waiting_behind_it_in_its_batch(
    pipelines: PipelineService, drain: Drain
):
    # Given a run fanned out to 4 leaves, taken as one batch, whose first node is slow: it
    # works only once the three behind it are published again
    pipelines.create("fan-slow", fan(4))
    run_id, leaves = fanned_out(pipelines, drain, "fan-slow")
    ids = [d.record_id for d in leaves]
    node, began = holding_first(drain, until=lambda: len(drain.queue) == 3)

    # When the batch runs
    reports, _kept = drain.guard.run_many(ids, "pipeline_node", node, worker="w", task_id="b")

    # Then only the first ran here; the three behind it were handed back while it ran
    assert len(began) == 1
    assert [r.status for r in reports] == ["succeeded", "dropped", "dropped", "dropped"]
    assert {r.detail for r in reports[1:]} == {"handed back: a slow node held up its batch"}
    assert sorted(d.record_id for d in drain.queue) == sorted(ids[1:])
    # each pending again as if never started: no attempt counted, none in its history
    for record_id in ids[1:]:
        row = pipelines.repo.ledger.get(record_id)
        assert (row["status"], row["attempt"], row["worker"], row["attempts"] or []) == (
            "pending",
            0,
            None,
            [],
        )
    # and free to take: another worker runs them (first attempts), and the run completes
    drain.run()
    result = publishing_to(pipelines, drain).get_run(run_id)
    assert result["status"] == "succeeded", result["error"]
    nodes = nodes_of(result)
    assert [nodes[f"leaf-{i}"]["attempt"] for i in range(4)] == [1, 1, 1, 1]
    assert all(n == 1 for n in Counter(drain.executed).values())


def test_a_node_cancelled_while_it_waits_in_a_batch_is_not_handed_back_and_never_runs(
    pipelines: PipelineService, drain: Drain
):
    # Given a batch of 3 leaves whose first node is slow, and the last one's cancellation
    # asked for while the first works
    pipelines.create("fan-cancel", fan(3))
    _run_id, leaves = fanned_out(pipelines, drain, "fan-cancel")
    ids = [d.record_id for d in leaves]
    ledger = pipelines.repo.ledger
    node, began = holding_first(
        drain, before=lambda: ledger.cancel(ids[2]), until=lambda: len(drain.queue) == 1
    )

    # When the batch runs
    reports, _kept = drain.guard.run_many(ids, "pipeline_node", node, worker="w", task_id="b")

    # Then the middle one was handed back, and the cancelled one stayed to be closed here,
    # cancelled before it began; it never ran
    assert [r.status for r in reports] == ["succeeded", "dropped", "cancelled"]
    assert [d.record_id for d in drain.queue] == [ids[1]]
    assert began == ["leaf-0"]
    row = ledger.get(ids[2])
    assert (row["status"], row["error"]) == ("cancelled", "run cancelled before it began")


CHAIN = {
    "nodes": [
        {"id": "start", "type": "trigger"},
        {"id": "one", "type": "action", "config": add("{{ trigger.x }}", 1)},
        {"id": "two", "type": "action", "config": add("{{ nodes.one.output.sum }}", 1)},
        {"id": "three", "type": "action", "config": add("{{ nodes.two.output.sum }}", 1)},
    ],
    "edges": [
        {"from": "start", "to": "one"},
        {"from": "one", "to": "two"},
        {"from": "two", "to": "three"},
    ],
}


def keep_all(_dispatch: Dispatch) -> bool:
    return True


def test_a_chain_run_by_one_worker_starts_each_next_node_in_its_predecessors_transaction(
    pipelines: PipelineService, drain: Drain
):
    # Given a chain started, its trigger's message delivered to a worker that keeps what
    # the outcome makes ready
    service, run_id, report = ran_trigger(pipelines, drain, "chain-carried", CHAIN, keep_all)
    node = drain._executor("pipeline_node")
    # When it runs each kept node in turn, as the task does
    commits, carried = [], []
    while report.kept:
        (next_node,) = report.kept
        assert next_node.started is not None
        # Then each was committed already started, for this worker, with its input
        record = pipelines.repo.ledger.get(next_node.record_id)
        carried.append(record["node_id"])
        assert (record["status"], record["attempt"], record["worker"]) == ("running", 1, "w")
        assert record["celery_task_id"] == "t1"
        assert record["created_at"] == record["started_at"]
        assert list(record["input"]["inputs"]) == [CHAIN["edges"][len(carried) - 1]["from"]]

        def step(kept: Dispatch = next_node) -> Any:
            reports, more = drain.guard.run_many(
                [kept.record_id],
                kept.kind,
                node,
                worker="w",
                task_id="t1",
                keep=keep_all,
                started=[kept.started] if kept.started else [],
            )
            return replace(reports[0], kept=more)

        report, spent = commits_during(pipelines.repo, step)
        assert report.status == "succeeded"
        commits.append(spent)
    # and each node cost one transaction (its outcome and the next one's start), none of
    # them was published, and the run completed with each node run once
    assert carried == ["one", "two", "three"]
    assert commits == [1, 1, 1]
    assert not drain.queue
    result = service.get_run(run_id)
    assert result["status"] == "succeeded"
    assert result["outputs"] == {"three": {"sum": 4}}
    assert Counter(drain.executed) == Counter({"start": 1, "one": 1, "two": 1, "three": 1})
    assert {n["node_id"]: n["attempt"] for n in result["nodes"]} == dict.fromkeys(
        ("start", "one", "two", "three"), 1
    )


def test_a_carried_node_whose_worker_died_before_running_it_is_taken_over_and_completes(
    pipelines: PipelineService, drain: Drain, settings: Settings
):
    # Given a chain whose trigger ran on a worker that kept its next node, committed started
    # (its first node allowed a second attempt)
    chain = {**CHAIN, "nodes": [dict(n) for n in CHAIN["nodes"]]}
    chain["nodes"][1]["retry"] = {"max_attempts": 2, "backoff_s": 0, "jitter": 0}
    service, run_id, report = ran_trigger(
        pipelines, drain, "chain-orphan", chain, keep_all, worker="dead"
    )
    (orphan,) = report.kept
    assert pipelines.repo.ledger.get(orphan.record_id)["status"] == "running"
    # When that worker dies before running it (it never takes the lease nor beats) and the
    # sweeper runs a minute later by the database clock
    client = redis.Redis.from_url(settings.redis_url)
    sweeper = Sweeper(
        settings,
        pipelines.repo.sweeps,
        lease_alive=lambda rid: bool(client.exists(keys.run_lock(settings.key_prefix, rid))),
        publish=lambda ds: drain.queue.extend(ds) or len(ds),
    )
    assert sweeper.sweep(pipelines.repo.sweeps.read_now() + timedelta(seconds=60)) >= 1
    # Then it is requeued, and draining the run completes it, the orphan as attempt 2
    assert [d.record_id for d in drain.queue] == [orphan.record_id]
    drain.run()
    result = service.get_run(run_id)
    assert result["status"] == "succeeded"
    assert result["outputs"] == {"three": {"sum": 4}}
    attempts = nodes_of(result)["one"]["attempts"]
    assert [(a["attempt"], a["worker"]) for a in attempts] == [(1, "dead"), (2, "w")]
