"""Pipelines on real worker processes (and beat where its sweeper is needed), Redis and
PostgreSQL.

The runs are started through a publishing ``PipelineService``, as ``pipeline_service()``
wires it; every node is a ledger record that some ``celery worker`` executes. Each test then
reads the node records (status, attempt, worker, timings, history) and the side effects the
nodes left: requests at a loopback sink, steps counted in Redis by
``tests.acceptance.handlers_for_tests``. Waits poll a condition against a deadline; nothing
sleeps for a fixed time and nothing asserts on how long something took.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from pytest_httpserver import HTTPServer
from sqlalchemy import select
from werkzeug import Request, Response

from gathering_tasks.api import PipelineService
from gathering_tasks.db.ledger import FINAL, Dispatch
from gathering_tasks.db.models import Execution, PipelineRun
from gathering_tasks.db.repo import Repository
from gathering_tasks.publish import publish
from gathering_tasks.settings import Settings
from tests.acceptance.handlers_for_tests import mark, progress_key
from tests.acceptance.procs import CeleryProcess, Stack, running_stack, stack_env
from tests.servers import serving_http, wait_for

pytestmark = pytest.mark.acceptance
POSTGRES_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
INCLUDE = ("-I", "tests.acceptance.handlers_for_tests")
READY_S = 60.0  # a worker starting on a busy machine
RUN_S = 120.0  # a run (or a node) reaching a state it is headed for
HOLD_S = 20.0  # the longest the sink holds a branch request (below the client's read timeout)
MARKS = "marks"
HOOK_KEY_ENV = "TEST_DIAMOND_HOOK_KEY"
HOOK_KEY = "diamond-test-only-not-a-real-secret"


# -- wiring --------------------------------------------------------------------------------


@pytest.fixture
def pipelines(repo: Repository, settings: Settings, celery_app: Celery) -> PipelineService:
    """The pipeline service, publishing the nodes a run makes ready (as ``pipeline_service()``)."""

    def publish_all(dispatches: list[Dispatch]) -> None:
        publish(celery_app, dispatches, default_queue=settings.default_queue)

    return PipelineService(repo, settings, task_allowed=lambda _n: True, publish=publish_all)


@pytest.fixture
def sink() -> Iterator[HTTPServer]:
    """A threaded HTTP server on 127.0.0.1 (the SSRF guard refuses the name "localhost"):
    the two branches of the diamond must be able to wait inside it at the same time."""
    yield from serving_http(HTTPServer(host="127.0.0.1", port=0, threaded=True))


# -- definitions ---------------------------------------------------------------------------


def add(a: Any, b: Any) -> dict[str, Any]:
    return {"action_type": "run_task", "config": {"task": "demo.add", "args": [a, b]}}


def steps(count: int, **kwargs: Any) -> dict[str, Any]:
    """A long node: ``count`` steps of 0.1 s, each counted in Redis (``tests.steps``)."""
    return {
        "action_type": "run_task",
        "config": {"task": "tests.steps", "kwargs": {"key": MARKS, "count": count, **kwargs}},
    }


def action(node_id: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "type": "action", "config": config, **extra}


def edges(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": source, "to": target} for source, target in pairs]


def diamond(sink: HTTPServer) -> dict[str, Any]:
    """trigger -> two GETs to the sink -> join -> a signed webhook carrying the join's data."""

    def get(path: str) -> dict[str, Any]:
        return {"action_type": "call_api", "config": {"method": "GET", "url": sink.url_for(path)}}

    notify = {
        "action_type": "send_notification",
        "config": {
            "channel": "webhook",
            "url": sink.url_for("/hook"),
            "secret_env": HOOK_KEY_ENV,
            "title": "diamond joined",
            "text": "{{ nodes.left.output.json.branch }}+{{ nodes.right.output.json.branch }}",
            "data": "{{ nodes.both.output }}",
        },
    }
    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            action("left", get("/left")),
            action("right", get("/right")),
            {"id": "both", "type": "join"},
            action("notify", notify),
        ],
        "edges": edges(
            ("start", "left"),
            ("start", "right"),
            ("left", "both"),
            ("right", "both"),
            ("both", "notify"),
        ),
    }


def fan_out(width: int) -> dict[str, Any]:
    """trigger -> parallel -> ``width`` additions -> join -> one node reading the join."""
    branches = [f"a{i}" for i in range(width)]
    last = branches[-1]
    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            {"id": "split", "type": "parallel"},
            *(action(node_id, add(i, 1)) for i, node_id in enumerate(branches)),
            {"id": "gather", "type": "join"},
            action(
                "end", add("{{ nodes.a0.output.sum }}", f"{{{{ nodes.gather.output.{last}.sum }}}}")
            ),
        ],
        "edges": edges(
            ("start", "split"),
            *(("split", node_id) for node_id in branches),
            *((node_id, "gather") for node_id in branches),
            ("gather", "end"),
        ),
    }


MAPPED = {
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
    "edges": edges(("start", "each"), ("each", "gather")),
}


# -- observing -----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request the sink received, copied out of the server thread."""

    path: str
    method: str
    headers: dict[str, str]
    body: str


@dataclass
class Rendezvous:
    """The branch requests at the sink: each is held until every branch's request is in
    (bounded by ``HOLD_S``), so two branches that run at the same time overlap by
    construction, and one worker running both one after the other cannot pass for two."""

    branches: tuple[str, ...]
    seen: list[Seen] = field(default_factory=list)
    arrived: dict[str, threading.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.arrived = {name: threading.Event() for name in self.branches}

    def note(self, request: Request) -> None:
        self.seen.append(
            Seen(
                request.path,
                request.method,
                dict(request.headers.items()),
                request.get_data(as_text=True),
            )
        )

    def branch(self, name: str) -> Any:
        def respond(request: Request) -> Response:
            self.note(request)
            self.arrived[name].set()
            for event in self.arrived.values():
                event.wait(HOLD_S)
            return Response(json.dumps({"branch": name}), content_type="application/json")

        return respond

    def hook(self, request: Request) -> Response:
        self.note(request)
        return Response("{}", content_type="application/json")


def holding_branches(sink: HTTPServer) -> Rendezvous:
    """The sink's GET /left and GET /right, each held until both are in."""
    meet = Rendezvous(("left", "right"))
    for name in meet.branches:
        sink.expect_request(f"/{name}", method="GET").respond_with_handler(meet.branch(name))
    return meet


def ran_together_on_w1_and_w2(left: dict[str, Any], right: dict[str, Any]) -> bool:
    """The two branch records ran on the two workers, at the same time."""
    workers = {left["worker"].split("@")[0], right["worker"].split("@")[0]}
    (left_start, left_end), (right_start, right_end) = interval(left), interval(right)
    return workers == {"w1", "w2"} and max(left_start, right_start) < min(left_end, right_end)


def ready(*procs: CeleryProcess) -> None:
    for proc in procs:
        wait_for(lambda p=proc: " ready." in p.log_text(), READY_S, f"{proc.name} to be ready")


def leading(beat: CeleryProcess) -> None:
    wait_for(lambda: "beat is now the leader" in beat.log_text(), READY_S, "beat to lead")


def run_status(repo: Repository, run_id: int) -> str:
    with repo.factory() as session:
        status = session.execute(select(PipelineRun.status).where(PipelineRun.id == run_id))
        return str(status.scalar_one())


def node_row(repo: Repository, run_id: int, node_id: str) -> Any:
    """The record of ``node_id`` in the run (None before the run created it)."""
    e = Execution
    with repo.factory() as session:
        return session.execute(
            select(e.id, e.status, e.attempt).where(
                e.pipeline_run_id == run_id, e.node_id == node_id
            )
        ).first()


def ended(pipelines: PipelineService, run_id: int) -> dict[str, Any]:
    """The run with its nodes, once it is no longer running."""
    repo = pipelines.repo
    wait_for(
        lambda: run_status(repo, run_id) != "running",
        RUN_S,
        f"pipeline run {run_id} to end",
        interval_s=0.2,
    )
    return pipelines.get_run(run_id)


def node_running(repo: Repository, run_id: int, node_id: str) -> int:
    """Wait for ``node_id`` to be running; its record id."""

    def running() -> int | None:
        row = node_row(repo, run_id, node_id)
        return int(row.id) if row is not None and row.status == "running" else None

    record_id: int = wait_for(running, RUN_S, f"node {node_id} to run")
    return record_id


def node_final(repo: Repository, run_id: int, node_id: str) -> None:
    def final() -> bool:
        row = node_row(repo, run_id, node_id)
        return row is not None and row.status in FINAL

    wait_for(final, RUN_S, f"node {node_id} to end")


def nodes_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {node["node_id"]: node for node in run["nodes"]}


def history(node: dict[str, Any]) -> list[tuple[int, str]]:
    return [(entry["attempt"], entry["status"]) for entry in node["attempts"] or []]


def ran_once(node: dict[str, Any]) -> bool:
    return (node["status"], node["attempt"], history(node)) == ("succeeded", 1, [(1, "succeeded")])


def interval(node: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(node["started_at"]), datetime.fromisoformat(node["finished_at"])


def steps_taken(client: redis.Redis, record_id: int, attempt: int) -> int:
    return int(client.get(progress_key(MARKS, record_id, attempt)) or 0)


def marks(client: redis.Redis) -> list[str]:
    return [str(item) for item in client.lrange(MARKS, 0, -1)]


def inside_the_long_node(
    stack: Stack, pipelines: PipelineService, client: redis.Redis, name: str
) -> tuple[CeleryProcess, int, int]:
    """One worker ("victim") and a leading beat; a run of ``name`` started, and its node
    "long" at work. The worker, the run's id and the long node's record id."""
    victim = stack.worker("victim", 1, *INCLUDE)
    beat = stack.beat("b1")
    ready(victim)
    leading(beat)
    run_id = pipelines.run(name)
    long_id = node_running(pipelines.repo, run_id, "long")
    wait_for(lambda: steps_taken(client, long_id, 1) >= 1, RUN_S, "the long node to work")
    return victim, run_id, long_id


# -- the tests -----------------------------------------------------------------------------


@POSTGRES_ONLY
def test_a_diamond_runs_its_branches_on_two_workers_at_once_and_notifies_once(
    db_url: str, redis_url: str, pipelines: PipelineService, sink: HTTPServer, tmp_path: Path
) -> None:
    # Given a sink that holds each branch request until both are in, and two workers that
    # each run one node at a time
    meet = holding_branches(sink)
    sink.expect_request("/hook", method="POST").respond_with_handler(meet.hook)
    pipelines.create("diamond", diamond(sink))
    env = stack_env(db_url, redis_url, **{HOOK_KEY_ENV: HOOK_KEY})
    with running_stack(env, tmp_path) as stack:
        ready(stack.worker("w1", 1), stack.worker("w2", 1))

        # When the diamond runs
        run_id = pipelines.run("diamond")
        done = ended(pipelines, run_id)

    # Then it succeeded, every node recorded once
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    assert len(done["nodes"]) == 5
    assert sorted(nodes) == ["both", "left", "notify", "right", "start"]
    assert all(ran_once(node) for node in done["nodes"]), done["nodes"]
    # the two branches ran on different workers, at the same time
    left, right = nodes["left"], nodes["right"]
    assert ran_together_on_w1_and_w2(left, right), (left, right)
    assert (left["output"]["json"], left["output"]["attempts"]) == ({"branch": "left"}, 1)
    assert (right["output"]["json"], right["output"]["attempts"]) == ({"branch": "right"}, 1)
    # the webhook arrived once, carrying the join's data
    hooks = [seen for seen in meet.seen if seen.path == "/hook"]
    assert len(hooks) == 1
    payload = json.loads(hooks[0].body)
    assert (
        payload["data"]
        == nodes["both"]["output"]
        == {
            "left": left["output"],
            "right": right["output"],
        }
    )
    assert payload["text"] == "left+right"
    # and each request carried its node's idempotency key
    keys = {seen.path: seen.headers["Idempotency-Key"] for seen in meet.seen}
    assert len(meet.seen) == 3
    paths = {"/left": "left", "/right": "right", "/hook": "notify"}
    assert keys == {path: f"gathering-node-{run_id}-{node}" for path, node in paths.items()}
    assert hooks[0].headers["Webhook-Id"] == f"gathering-node-{run_id}-notify"


@POSTGRES_ONLY
def test_a_fan_out_to_200_nodes_fans_back_in_with_each_node_run_once(
    db_url: str, redis_url: str, pipelines: PipelineService, tmp_path: Path
) -> None:
    # Given trigger -> parallel -> 200 additions -> join -> one node, and two workers
    width = 200
    pipelines.create("wide", fan_out(width))
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 2), stack.worker("w2", 2))

        # When it runs
        done = ended(pipelines, pipelines.run("wide"))

    # Then it completed with exactly one record per node, each succeeded on its first attempt
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    assert len(done["nodes"]) == len(nodes) == width + 4
    assert [node for node in done["nodes"] if not ran_once(node)] == []
    # and the join gathered every branch, which the last node read
    gathered = nodes["gather"]["output"]
    assert gathered == {f"a{i}": {"sum": i + 1} for i in range(width)}
    assert nodes["end"]["output"] == {"sum": 1 + width}
    assert done["outputs"] == {"end": {"sum": 1 + width}}


@POSTGRES_ONLY
def test_a_worker_whose_inline_budget_runs_out_hands_the_rest_of_a_map_on(
    db_url: str, redis_url: str, pipelines: PipelineService, tmp_path: Path
) -> None:
    # Given a map over 500 items, two workers, no beat (so no sweeper to publish what is
    # left pending), and an inline budget that runs out while a task drains the map
    count = 500
    pipelines.create("budget", MAPPED)
    env = stack_env(db_url, redis_url, GATHERING_PIPELINE_INLINE_BUDGET_S="0.5")
    with running_stack(env, tmp_path) as stack:
        ready(stack.worker("w1", 2), stack.worker("w2", 2))
        # When it runs
        done = ended(pipelines, pipelines.run("budget", {"items": list(range(count))}))

    # Then the messages a task sends while it drains, and on running out, went on with the
    # rest: the run completed, each item once
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    assert len(done["nodes"]) == count + 3
    assert [node for node in done["nodes"] if not ran_once(node)] == []


@POSTGRES_ONLY
def test_a_map_over_500_items_runs_each_item_once_and_the_join_keeps_their_order(
    db_url: str, redis_url: str, pipelines: PipelineService, tmp_path: Path
) -> None:
    # Given a map over the trigger's 500 items, each added to 100, gathered by a join
    count = 500
    pipelines.create("mapped", MAPPED)
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 2), stack.worker("w2", 2))

        # When it runs
        done = ended(pipelines, pipelines.run("mapped", {"items": list(range(count))}))

    # Then it completed: one record per item, each run once
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    children = [node for node in done["nodes"] if node["node_id"].startswith("each[")]
    assert sorted(node["node_id"] for node in children) == sorted(
        f"each[{i}]" for i in range(count)
    )
    assert len(done["nodes"]) == len(nodes) == count + 3
    assert [node for node in done["nodes"] if not ran_once(node)] == []
    assert [nodes[f"each[{i}]"]["output"] for i in range(count)] == [
        {"sum": i + 100} for i in range(count)
    ]
    # and the join holds the 500 results, in item order
    gathered = nodes["gather"]["output"]["each"]
    assert gathered["items"] == list(range(count))
    assert gathered["results"] == [{"sum": i + 100} for i in range(count)]


@POSTGRES_ONLY
def test_a_node_whose_worker_is_killed_is_recovered_and_the_run_completes(
    db_url: str, redis_url: str, pipelines: PipelineService, client: redis.Redis, tmp_path: Path
) -> None:
    # Given a pipeline with a long node (600 steps on its first attempt, 1 on later ones,
    # two attempts allowed) beside a quick one, both joined, then a last node
    retry = {"max_attempts": 2, "backoff_s": 0, "jitter": 0}
    pipelines.create(
        "survivor",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                action("long", steps(600, later_count=1), retry=retry),
                action("quick", add(1, 2)),
                {"id": "both", "type": "join"},
                action("end", add("{{ nodes.quick.output.sum }}", 1)),
            ],
            "edges": edges(
                ("start", "long"),
                ("start", "quick"),
                ("long", "both"),
                ("quick", "both"),
                ("both", "end"),
            ),
        },
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        victim, run_id, long_id = inside_the_long_node(stack, pipelines, client, "survivor")

        # When its worker is SIGKILLed in the middle of the node, and another one starts
        victim.kill()
        ready(stack.worker("heir", 1, *INCLUDE))
        steps_after_kill = steps_taken(client, long_id, 1)
        done = ended(pipelines, run_id)
        steps_of_first = steps_taken(client, long_id, 1)

    # Then the run completed; the killed node ran again as attempt 2 on the new worker, its
    # first attempt (on the killed worker) handed back by the sweeper in its history
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    long = nodes["long"]
    assert (long["status"], long["attempt"]) == ("succeeded", 2), long["error"]
    assert history(long) == [(1, "pending"), (2, "succeeded")]
    assert long["attempts"][0]["worker"].startswith("victim@")
    assert long["worker"].startswith("heir@")
    # the first attempt stopped where it was killed; only the second one finished
    assert 1 <= steps_after_kill == steps_of_first < 600
    assert marks(client) == [mark(long_id, 2)]
    # and every other node ran once
    assert len(done["nodes"]) == 5
    assert [n["node_id"] for n in done["nodes"] if n["node_id"] != "long" and not ran_once(n)] == []
    assert nodes["end"]["output"] == {"sum": 4}


@POSTGRES_ONLY
def test_cancelling_a_run_aborts_its_running_node_and_its_queued_ones_never_run(
    db_url: str, redis_url: str, pipelines: PipelineService, client: redis.Redis, tmp_path: Path
) -> None:
    # Given a run whose long node (300 steps) is working, beside a delay node queued for
    # ten minutes, both leading to a last node
    pipelines.create(
        "doomed",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                action("long", steps(300)),
                {"id": "later", "type": "delay", "config": {"seconds": 600}},
                action("after", add(1, 1)),
            ],
            "edges": edges(
                ("start", "long"), ("start", "later"), ("long", "after"), ("later", "after")
            ),
        },
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        worker = stack.worker("w1", 2, *INCLUDE)
        ready(worker)
        run_id = pipelines.run("doomed")
        long_id = node_running(pipelines.repo, run_id, "long")
        wait_for(lambda: steps_taken(client, long_id, 1) >= 3, RUN_S, "the long node to work")

        # When the run is cancelled
        assert pipelines.cancel(run_id) == "cancelled"
        node_final(pipelines.repo, run_id, "long")
        done = pipelines.get_run(run_id)
        steps_when_done = steps_taken(client, long_id, 1)
        worker_log = worker.log_text()
    steps_after_stop = steps_taken(client, long_id, 1)

    # Then the run is cancelled; the running node's worker aborted it early
    assert (done["status"], done["error"]) == ("cancelled", "cancelled")
    nodes = nodes_of(done)
    long = nodes["long"]
    assert (long["status"], long["attempt"]) == ("cancelled", 1), long["error"]
    assert history(long) == [(1, "cancelled")]
    assert long["worker"].startswith("w1@")
    assert "run cancellation requested; aborting" in worker_log
    assert 3 <= steps_when_done == steps_after_stop < 300
    assert marks(client) == []
    # the queued delay node ended without starting, and the last node was never created
    later = nodes["later"]
    assert (later["status"], later["attempt"], later["started_at"]) == ("cancelled", 0, None)
    assert "after" not in nodes
    assert sorted(nodes) == ["later", "long", "start"]


@POSTGRES_ONLY
def test_a_run_past_its_timeout_is_timed_out_by_beat_and_its_running_node_stopped(
    db_url: str, redis_url: str, pipelines: PipelineService, client: redis.Redis, tmp_path: Path
) -> None:
    # Given a pipeline with a 2 s timeout whose long node (600 steps) is working; beat (whose
    # sweeper enforces the timeout) starts only once the node runs, so the node is surely
    # running when the run is timed out
    pipelines.create(
        "slow",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                action("long", steps(600)),
                action("after", add(1, 1)),
            ],
            "edges": edges(("start", "long"), ("long", "after")),
            "timeout_s": 2,
        },
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        worker = stack.worker("w1", 1, *INCLUDE)
        ready(worker)
        run_id = pipelines.run("slow")
        long_id = node_running(pipelines.repo, run_id, "long")
        wait_for(lambda: steps_taken(client, long_id, 1) >= 1, RUN_S, "the long node to work")

        # When beat's sweeper finds the run past its deadline
        stack.beat("b1")
        ended(pipelines, run_id)
        node_final(pipelines.repo, run_id, "long")
        done = pipelines.get_run(run_id)
        worker_log = worker.log_text()
    steps_after_stop = steps_taken(client, long_id, 1)

    # Then the run is timed out, and its running node was told to stop and did
    assert (done["status"], done["error"]) == ("timed_out", "the run exceeded its timeout")
    nodes = nodes_of(done)
    long = nodes["long"]
    assert long["status"] in ("cancelled", "timed_out"), long
    assert long["attempt"] == 1 and long["started_at"] is not None
    assert "run cancellation requested; aborting" in worker_log
    assert 1 <= steps_after_stop < 600
    assert marks(client) == []
    assert "after" not in nodes


@POSTGRES_ONLY
def test_a_false_condition_skips_the_branch_not_taken_and_what_only_it_reaches(
    db_url: str, redis_url: str, pipelines: PipelineService, tmp_path: Path
) -> None:
    # Given a condition (x > 5) whose true branch leads to "big" then "big-after", whose
    # false branch leads to "small", and a join both branches reach, then a last node
    pipelines.create(
        "branch",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                {"id": "check", "type": "condition", "config": {"expression": "trigger.x > `5`"}},
                action("big", add(1, 1)),
                action("big-after", add(2, 2)),
                action("small", add(3, 3)),
                {"id": "end", "type": "join"},
                action("last", add("{{ nodes.small.output.sum }}", 1)),
            ],
            "edges": [
                {"from": "start", "to": "check"},
                {"from": "check", "to": "big", "branch": "true"},
                {"from": "big", "to": "big-after"},
                {"from": "check", "to": "small", "branch": "false"},
                {"from": "big-after", "to": "end"},
                {"from": "small", "to": "end"},
                {"from": "end", "to": "last"},
            ],
        },
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 2))

        # When it runs with x = 1
        done = ended(pipelines, pipelines.run("branch", {"x": 1}))

    # Then the condition said false; the true branch and what only it reaches are recorded
    # skipped, never started; the rest ran once
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    assert nodes["check"]["output"] == {"result": False}
    assert {n: node["status"] for n, node in nodes.items()} == {
        "start": "succeeded",
        "check": "succeeded",
        "big": "skipped",
        "big-after": "skipped",
        "small": "succeeded",
        "end": "succeeded",
        "last": "succeeded",
    }
    for skipped in ("big", "big-after"):
        node = nodes[skipped]
        assert (node["attempt"], node["worker"], node["started_at"]) == (0, None, None)
    assert all(ran_once(node) for node in done["nodes"] if node["status"] != "skipped")
    assert nodes["end"]["output"] == {"small": {"sum": 6}}
    assert done["outputs"] == {"last": {"sum": 7}}


def task_ids(repo: Repository, run_id: int) -> dict[str, str | None]:
    """The Celery task that ran each node record of the run (the one its start recorded)."""
    e = Execution
    with repo.factory() as session:
        rows = session.execute(
            select(e.node_id, e.celery_task_id).where(e.pipeline_run_id == run_id)
        ).all()
    return {str(row.node_id): row.celery_task_id for row in rows}


def created_started(repo: Repository, run_id: int) -> set[str]:
    """The node records of the run created at the moment they started (carried)."""
    e = Execution
    with repo.factory() as session:
        rows = session.execute(
            select(e.node_id).where(e.pipeline_run_id == run_id, e.created_at == e.started_at)
        ).all()
    return {str(row.node_id) for row in rows}


def chain_with_a_long_middle() -> dict[str, Any]:
    retry = {"max_attempts": 2, "backoff_s": 0, "jitter": 0}
    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            action("first", add(1, 2)),
            action("long", steps(600, later_count=1), retry=retry),
            action("last", add("{{ nodes.first.output.sum }}", 10)),
        ],
        "edges": edges(("start", "first"), ("first", "long"), ("long", "last")),
    }


@POSTGRES_ONLY
def test_a_worker_runs_the_next_node_of_a_chain_itself_and_a_kill_there_is_recovered(
    db_url: str, redis_url: str, pipelines: PipelineService, client: redis.Redis, tmp_path: Path
) -> None:
    # Given a chain start -> first -> long -> last, and one worker
    pipelines.create("chain-here", chain_with_a_long_middle())
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        victim, run_id, long_id = inside_the_long_node(stack, pipelines, client, "chain-here")
        # Then the nodes after the trigger came with no message of their own: the task that
        # brought the trigger ran each next node itself (its start records that task)
        carried = task_ids(pipelines.repo, run_id)
        assert carried["start"] is not None
        assert carried["first"] == carried["long"] == carried["start"]
        # and each was created already started, in its predecessor's outcome transaction
        assert created_started(pipelines.repo, run_id) == {"first", "long"}

        # When that worker is SIGKILLed inside the node it took on itself
        victim.kill()
        ready(stack.worker("heir", 1, *INCLUDE))
        done = ended(pipelines, run_id)

    # Then the sweeper handed the node on (it had no message to come back), and the run
    # completed with every node recorded once, the killed one on its second attempt
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    assert history(nodes["long"]) == [(1, "pending"), (2, "succeeded")]
    assert nodes["long"]["attempts"][0]["worker"].startswith("victim@")
    assert nodes["long"]["worker"].startswith("heir@")
    assert marks(client) == [mark(long_id, 2)]
    assert [n for n in ("start", "first", "last") if not ran_once(nodes[n])] == []
    assert nodes["last"]["output"] == {"sum": 13}


@POSTGRES_ONLY
def test_with_no_inline_budget_every_node_of_a_chain_comes_in_its_own_message(
    db_url: str, redis_url: str, pipelines: PipelineService, tmp_path: Path
) -> None:
    # Given a chain of three quick nodes, and a worker with pipeline_inline_budget_s = 0
    pipelines.create(
        "chain-messages",
        {
            "nodes": [
                {"id": "start", "type": "trigger"},
                action("a", add(1, 2)),
                action("b", add("{{ nodes.a.output.sum }}", 1)),
            ],
            "edges": edges(("start", "a"), ("a", "b")),
        },
    )
    env = stack_env(db_url, redis_url, GATHERING_PIPELINE_INLINE_BUDGET_S="0")
    with running_stack(env, tmp_path) as stack:
        ready(stack.worker("w", 1, *INCLUDE))
        # When the chain runs
        done = ended(pipelines, pipelines.run("chain-messages"))
        carried = task_ids(pipelines.repo, done["id"])

    # Then it completed, each node started by a task of its own
    assert done["status"] == "succeeded", done["error"]
    assert nodes_of(done)["b"]["output"] == {"sum": 4}
    assert None not in carried.values()
    assert len(set(carried.values())) == 3


QUICK_CHAIN = 6  # quick nodes one after another: enough for a worker's batches to grow


def after_quick_chain(*branches: dict[str, Any]) -> dict[str, Any]:
    """trigger -> QUICK_CHAIN additions in a row -> parallel -> ``branches`` -> join."""
    chain = [f"c{i}" for i in range(QUICK_CHAIN)]
    names = [str(branch["id"]) for branch in branches]
    return {
        "nodes": [
            {"id": "start", "type": "trigger"},
            *(action(node_id, add(i, 1)) for i, node_id in enumerate(chain)),
            {"id": "split", "type": "parallel"},
            *branches,
            {"id": "both", "type": "join"},
        ],
        "edges": edges(
            *zip(["start", *chain[:-1]], chain, strict=True),
            (chain[-1], "split"),
            *(("split", name) for name in names),
            *((name, "both") for name in names),
        ),
    }


@POSTGRES_ONLY
def test_branches_ready_after_a_run_of_quick_nodes_still_run_on_two_workers_at_once(
    db_url: str, redis_url: str, pipelines: PipelineService, sink: HTTPServer, tmp_path: Path
) -> None:
    # Given quick nodes in a row (so the worker running them takes ready nodes in growing
    # batches), then two branches that each wait at the sink until both are in
    holding_branches(sink)

    def get(node_id: str) -> dict[str, Any]:
        config = {"method": "GET", "url": sink.url_for(f"/{node_id}")}
        return action(node_id, {"action_type": "call_api", "config": config})

    pipelines.create("quick-then-wide", after_quick_chain(get("left"), get("right")))
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        ready(stack.worker("w1", 1), stack.worker("w2", 1))

        # When it runs
        done = ended(pipelines, pipelines.run("quick-then-wide"))
        carried = task_ids(pipelines.repo, done["id"])

    # Then the quick nodes ran in the task that brought the first of them
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    assert len({carried[f"c{i}"] for i in range(QUICK_CHAIN)}) == 1
    # and the branch waiting behind the other was handed back, so the two ran at the same
    # time on the two workers, each once
    nodes = nodes_of(done)
    assert ran_together_on_w1_and_w2(nodes["left"], nodes["right"]), done["nodes"]
    assert all(ran_once(node) for node in done["nodes"]), done["nodes"]


@POSTGRES_ONLY
def test_a_worker_killed_in_the_middle_of_a_batch_leaves_a_run_that_completes(
    db_url: str, redis_url: str, pipelines: PipelineService, client: redis.Redis, tmp_path: Path
) -> None:
    # Given quick nodes in a row, then a long node (first in its batch) and three quick ones
    # beside it, each allowed two attempts
    retry = {"max_attempts": 2, "backoff_s": 0, "jitter": 0}
    quick = [action(f"q{i}", add(i, 10), retry=retry) for i in range(3)]
    pipelines.create(
        "killed-batch",
        after_quick_chain(action("long", steps(600, later_count=1), retry=retry), *quick),
    )
    with running_stack(stack_env(db_url, redis_url), tmp_path) as stack:
        victim, run_id, long_id = inside_the_long_node(stack, pipelines, client, "killed-batch")
        # the quick ones behind it in its batch were handed back: pending, never started
        for i in range(3):
            wait_for(
                lambda i=i: node_row(pipelines.repo, run_id, f"q{i}").attempt == 0,
                RUN_S,
                f"q{i} to be handed back",
            )

        # When the worker is SIGKILLed inside the long node, and another one starts
        victim.kill()
        ready(stack.worker("heir", 1, *INCLUDE))
        done = ended(pipelines, run_id)

    # Then the run completed: the long node on its second attempt, handed on by the sweeper
    assert done["status"] == "succeeded", (done["error"], done["nodes"])
    nodes = nodes_of(done)
    assert history(nodes["long"]) == [(1, "pending"), (2, "succeeded")]
    assert nodes["long"]["worker"].startswith("heir@")
    assert marks(client) == [mark(long_id, 2)]
    # and every other node ran once: the quick ones behind the long one were not charged
    # an attempt for the batch they waited in
    assert [n["node_id"] for n in done["nodes"] if n["node_id"] != "long" and not ran_once(n)] == []
    assert [nodes[f"q{i}"]["output"] for i in range(3)] == [{"sum": i + 10} for i in range(3)]
