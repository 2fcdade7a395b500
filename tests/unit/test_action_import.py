"""Reading an import file and planning it: pure, without services."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from gathering_tasks.action_import import Checked, ImportInvalid, load_entries, plan_import
from gathering_tasks.actions import ActionSpec
from gathering_tasks.errors import InvalidInput
from gathering_tasks.schedules import parse_schedule

NOW = datetime(2030, 1, 1, tzinfo=UTC)
YAML = """\
- name: nightly
  action_type: run_task
  config: {task: demo.hello}
  schedule: {kind: once, at: 2030-01-01T00:00:00+00:00}
  start_at: 2029-12-31T00:00:00Z
"""


def test_yaml_times_stay_text_so_yaml_and_json_read_the_same():
    entries = load_entries(YAML)
    assert entries[0]["schedule"]["at"] == "2030-01-01T00:00:00+00:00"
    assert entries[0]["start_at"] == "2029-12-31T00:00:00Z"
    assert load_entries(json.dumps(entries)) == entries


def test_a_document_that_is_not_a_list_is_refused_naming_the_file():
    with pytest.raises(InvalidInput, match="must hold a list") as caught:
        load_entries("name: one\n")
    assert caught.value.field == "file"


def _check(data: Mapping[str, Any]) -> Checked:
    if data.get("bad"):
        raise InvalidInput("is wrong", field=str(data["bad"]))
    spec = ActionSpec.model_validate(
        {"name": data["name"], "action_type": "run_task", "config": {}, "schedule": {}}
    )
    schedule = parse_schedule({"kind": "interval", "every_s": 60}, now=NOW)
    return Checked(spec, schedule, first_slot=None if data.get("never") else NOW)


def test_every_problem_is_collected_with_entry_name_and_field():
    entries: list[object] = [
        {"name": "ok"},
        {"name": "typo", "bad": "schedule.expr"},
        "not an object",
        {"name": "ok"},
        {"name": "taken"},
        {"name": "late", "never": True},
    ]
    with pytest.raises(ImportInvalid) as caught:
        plan_import(entries, check=_check, existing={"taken"}, upsert=False)
    assert [str(p) for p in caught.value.problems] == [
        "entry 2 (typo): schedule.expr: is wrong",
        "entry 3: must be an object (an action definition)",
        "entry 4 (ok): name: is also the name of entry 1",
        "entry 5 (taken): name: an action with this name exists (--upsert replaces its definition)",
        "entry 6 (late): end_at: leaves no slot at or after now: the action would never run",
    ]
    assert caught.value.summary == "5 invalid of 6 entries; nothing was stored"


def test_upsert_plans_existing_names_as_replacements():
    planned = plan_import(
        [{"name": "new"}, {"name": "taken", "never": True}],
        check=_check,
        existing={"taken"},
        upsert=True,
    )
    assert [(p.entry, p.name, p.replace) for p in planned] == [
        (1, "new", False),
        (2, "taken", True),
    ]
