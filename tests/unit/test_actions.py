"""Unit tests of :func:`gathering_tasks.actions.validate_action`: what is refused at the door.

The rule under test: whatever one backend would refuse to store (PostgreSQL: NUL characters,
NaN and Infinity in JSON, lone surrogates in JSON text) is refused here for every backend, with
the path of the offending field, so SQLite and PostgreSQL give the same answer.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gathering_tasks.actions import MAX_CONFIG_DEPTH, ActionSpec, validate_action
from gathering_tasks.errors import InvalidInput

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NAN = float("nan")
INF = float("inf")


def definition(**changes: Any) -> dict[str, Any]:
    """A valid ``run_task`` action, with ``changes`` applied."""
    return {
        "name": "nightly",
        "action_type": "run_task",
        "config": {"task": "demo.add", "args": [1, 2]},
        "schedule": {"kind": "interval", "every_s": 60},
        **changes,
    }


def call_api(**config: Any) -> dict[str, Any]:
    """A valid ``call_api`` action whose config is a GET of a public URL plus ``config``."""
    return definition(
        action_type="call_api", config={"url": "https://api.example.com/v1", **config}
    )


def validate(data: dict[str, Any]) -> ActionSpec:
    spec, _schedule = validate_action(
        data, now=NOW, max_config_bytes=64 * 1024, task_allowed=lambda _name: True
    )
    return spec


def refusal(data: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        validate(data)
    return caught.value


# --------------------------------------------------------------------------------------------
# NUL characters, NaN / Infinity and lone surrogates: refused wherever they are


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (definition(description="line one\x00"), "description"),
        (definition(queue="fast\x00lane"), "queue"),
        (definition(config={"task": "demo.add", "args": ["ok", "a\x00b"]}), "config.args.1"),
        (definition(config={"task": "demo.add", "kwargs": {"who": "\x00"}}), "config.kwargs.who"),
        (
            definition(config={"task": "demo.add", "kwargs": {"deep": [{"x": ["", "\x00"]}]}}),
            "config.kwargs.deep.0.x.1",
        ),
        (call_api(headers={"X-Token": "abc\x00"}), "config.headers.X-Token"),
        (call_api(method="POST", json={"note": "\x00"}), "config.json.note"),
    ],
    ids=["description", "queue", "list-item", "kwarg", "nested", "header", "json-body"],
)
def test_nul_character_in_a_value_is_refused_naming_its_path(
    data: dict[str, Any], field: str
) -> None:
    # Given an otherwise valid action with a NUL character in one string value
    # When it is validated
    error = refusal(data)

    # Then it is refused, naming the exact field and saying why
    assert error.field == field
    assert "NUL" in error.reason


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"task": "demo.add", "kwargs": {"a\x00b": 1}}, "config.kwargs.a\\x00b"),
        ({"task": "demo.add", "kwargs": {"outer": {"\x00": 1}}}, "config.kwargs.outer.\\x00"),
    ],
)
def test_nul_character_in_a_key_is_refused_naming_the_key_escaped(
    config: dict[str, Any], field: str
) -> None:
    # Given a config whose object key holds a NUL character
    # When it is validated
    error = refusal(definition(config=config))

    # Then the path names the key, with the NUL escaped so the message stays one clean line
    assert error.field == field
    assert "NUL" in error.reason
    assert "\x00" not in str(error)


@pytest.mark.parametrize("number", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda n: {"task": "demo.add", "args": [1, n]}, "config.args.1"),
        (
            lambda n: {"task": "demo.add", "kwargs": {"limits": {"max": n}}},
            "config.kwargs.limits.max",
        ),
        (lambda n: {"pipeline": "etl", "inputs": {"ratio": n}}, "config.inputs.ratio"),
    ],
    ids=["list-item", "nested-kwarg", "pipeline-input"],
)
def test_non_finite_number_in_config_is_refused_naming_its_path(
    make: Any, field: str, number: float
) -> None:
    # Given a config holding NaN or an infinity (JSON cannot carry them; PostgreSQL refuses)
    config = make(number)
    action_type = "execute_pipeline" if "pipeline" in config else "run_task"

    # When it is validated
    error = refusal(definition(action_type=action_type, config=config))

    # Then it is refused at that path
    assert error.field == field
    assert "finite" in error.reason


def test_nan_parsed_from_json_text_is_refused() -> None:
    # Given config text as the CLI reads it: Python's json accepts NaN and Infinity
    config = json.loads('{"task": "demo.add", "kwargs": {"x": NaN, "y": -Infinity}}')

    # When it is validated
    error = refusal(definition(config=config))

    # Then the first non-finite value is named
    assert error.field == "config.kwargs.x"


@pytest.mark.parametrize("field", ["catchup_grace_s", "retry_backoff_s"])
def test_infinite_seconds_are_refused(field: str) -> None:
    # Given an unbounded duration (accepted by ge=0, stored, then unusable by beat)
    # When it is validated
    error = refusal(definition(**{field: INF}))

    # Then the field is named
    assert error.field == field


def test_lone_surrogate_in_config_is_refused() -> None:
    # Given text that is not valid Unicode ("\ud800" parses from JSON, PostgreSQL refuses it)
    config = json.loads('{"task": "demo.add", "kwargs": {"who": "\\ud800"}}')

    # When it is validated
    error = refusal(definition(config=config))

    # Then it is refused at that path
    assert error.field == "config.kwargs.who"
    assert "surrogate" in error.reason


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"when": datetime(2026, 1, 1, tzinfo=UTC)}, "config.kwargs.when"),
        ({"ids": {1, 2}}, "config.kwargs.ids"),
        ({"raw": b"bytes"}, "config.kwargs.raw"),
        ({"by_number": {1: "one"}}, "config.kwargs.by_number"),
    ],
    ids=["datetime", "set", "bytes", "int-key"],
)
def test_values_json_cannot_hold_are_refused(value: dict[str, Any], field: str) -> None:
    # Given a config built in Python with a value JSON has no form for (or an int key,
    # which JSON would silently turn into a string)
    # When it is validated
    error = refusal(definition(config={"task": "demo.add", "kwargs": value}))

    # Then it is refused at that path instead of failing inside the database driver
    assert error.field == field


def test_config_nested_too_deep_or_containing_itself_is_refused() -> None:
    # Given a config nested past the depth bound, and one that contains itself
    deep: list[Any] = []
    for _ in range(MAX_CONFIG_DEPTH):
        deep = [deep]
    looped: dict[str, Any] = {}
    looped["again"] = looped

    # When each is validated
    too_deep = refusal(definition(config={"task": "demo.add", "args": deep}))
    loop = refusal(definition(config={"task": "demo.add", "kwargs": looped}))

    # Then both are refused with a clear reason (not a RecursionError or a hang)
    assert too_deep.field is not None and too_deep.field.startswith("config.args.0.0")
    assert f"more than {MAX_CONFIG_DEPTH} levels" in too_deep.reason
    assert loop.field is not None and loop.field.startswith("config.kwargs.again.again")


def test_ordinary_unicode_and_numbers_are_accepted() -> None:
    # Given text and numbers at the edges of what is allowed
    config = {
        "task": "demo.add",
        "args": [0.0, -1.5e308, 2**63, True, None],
        "kwargs": {"greeting": "héllo \U0001f600 \t\n", "tags": [], "nested": {"k": {}}},
    }

    # When it is validated
    spec = validate(definition(config=config, description="tab\tand newline\n"))

    # Then it passes unchanged
    assert spec.config == config


# --------------------------------------------------------------------------------------------
# Names and other strings


@pytest.mark.parametrize("name", ["nightly\n", "night\x00ly", "nightly\x00", ""])
def test_name_with_a_line_break_or_nul_is_refused(name: str) -> None:
    # Given a name that is not letters, digits and _.:- (a trailing newline included)
    # When it is validated
    error = refusal(definition(name=name))

    # Then the name is refused
    assert error.field == "name"
