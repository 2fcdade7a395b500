"""ActionService.import_actions: all or none, even when the transaction fails part-way."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gathering_tasks.action_import import ImportInvalid, Phase
from gathering_tasks.api import ActionService
from gathering_tasks.db.repo import Repository
from gathering_tasks.settings import Settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def svc(repo: Repository, settings: Settings) -> ActionService:
    return ActionService(
        repo, settings, task_allowed=lambda name: name.startswith("demo."), clock=lambda: NOW
    )


def definition(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [1, 2]},
        "schedule": {"kind": "interval", "every_s": 60},
    }


def live_names(repo: Repository) -> list[str]:
    return [a["name"] for a in repo.actions.list_actions()]


def test_a_failure_after_some_writes_rolls_every_write_back(repo: Repository, settings: Settings):
    # Given three valid entries, and a failure once two of them are written
    def fail_on_second(phase: Phase, done: int, _total: int) -> None:
        if phase == "storing" and done == 2:
            raise RuntimeError("the connection broke")

    # When they are imported
    with pytest.raises(RuntimeError, match="the connection broke"):
        svc(repo, settings).import_actions(
            [definition("a"), definition("b"), definition("c")], progress=fail_on_second
        )
    # Then none of them is stored
    assert live_names(repo) == []


def test_a_name_taken_between_the_checks_and_the_writes_stores_nothing(
    repo: Repository, settings: Settings
):
    service = svc(repo, settings)

    # Given another client that creates "b" once the import's checks are done
    def race(phase: Phase, done: int, total: int) -> None:
        if phase == "checking" and done == total:
            service.create(definition("b"))

    # When the import runs
    with pytest.raises(ImportInvalid) as caught:
        service.import_actions([definition("a"), definition("b")], progress=race)
    # Then the error names the entry, and "a" was not stored either
    [problem] = caught.value.problems
    assert (problem.entry, problem.name, problem.field) == (2, "b", "name")
    assert "changed meanwhile" in problem.message
    assert live_names(repo) == ["b"]


def test_an_upserted_action_deleted_meanwhile_stores_nothing(repo: Repository, settings: Settings):
    service = svc(repo, settings)
    service.create(definition("old"))

    def delete_it(phase: Phase, done: int, total: int) -> None:
        if phase == "checking" and done == total:
            service.delete("old")

    with pytest.raises(ImportInvalid) as caught:
        service.import_actions(
            [definition("new"), definition("old")], upsert=True, progress=delete_it
        )
    assert [(p.entry, p.name) for p in caught.value.problems] == [(2, "old")]
    assert live_names(repo) == []


def test_progress_is_told_each_phase_in_order(repo: Repository, settings: Settings):
    seen: list[tuple[Phase, int, int]] = []
    result = svc(repo, settings).import_actions(
        [definition("a"), definition("b")], progress=lambda *step: seen.append(step)
    )
    assert (result.created, result.updated) == (["a", "b"], [])
    assert seen == [("checking", 1, 2), ("checking", 2, 2), ("storing", 1, 2), ("storing", 2, 2)]
    assert live_names(repo) == ["a", "b"]
