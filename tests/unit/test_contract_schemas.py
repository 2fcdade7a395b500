"""The published contract: one valid JSON Schema per task, and the tasks check payloads by it."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from gathering_tasks.contract import TASK_NAMES, check_payload, schema
from gathering_tasks.errors import InvalidPayload
from gathering_tasks.tasks import TASKS, call_api, run_pipeline, trigger_action


def test_every_gathering_task_has_a_valid_schema_whose_examples_pass():
    registered = {task.name for task in [*TASKS.values(), trigger_action, run_pipeline]}
    assert call_api.name in registered
    assert registered == set(TASK_NAMES)
    for name in TASK_NAMES:
        Draft202012Validator.check_schema(schema(name))
        for example in schema(name)["examples"]:
            check_payload(name, example["args"], example["kwargs"])


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "message"),
    [
        ("gathering.run_task", ["7"], {}, "gathering.run_task args[0]: must be of type integer"),
        ("gathering.run_task", [True], {}, "args[0]: must be of type integer"),
        ("gathering.run_task", [], {}, "args: needs at least 1 item"),
        ("gathering.call_api", [1, 2], {}, "args: has too many items"),
        ("gathering.trigger_action", ["x"], {"bogus": 1}, "kwargs: has an unknown field"),
        ("gathering.trigger_action", ["bad name!"], {}, "args[0]: must be a name"),
        ("gathering.trigger_action", ["x"], {"key": ""}, "kwargs.key: must be at least 1"),
        ("gathering.run_pipeline", ["p", [1]], {}, "args[1]: must be of type object or null"),
    ],
)
def test_a_payload_outside_the_contract_is_refused_naming_where(
    task: str, args: list[object], kwargs: dict[str, object], message: str
):
    with pytest.raises(InvalidPayload) as caught:
        check_payload(task, args, kwargs)
    assert message in str(caught.value)


def test_the_refusal_never_echoes_the_value():
    with pytest.raises(InvalidPayload) as caught:
        check_payload("gathering.run_pipeline", ["p", "s3cret-token-value"], {})
    assert "s3cret" not in str(caught.value)
