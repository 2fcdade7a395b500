"""Unit tests of :mod:`gathering_tasks.pipelines.templates`: ``{{ path }}`` and nothing more."""

from __future__ import annotations

from typing import Any

import pytest

from gathering_tasks.errors import InvalidInput
from gathering_tasks.pipelines.templates import (
    TemplateError,
    TemplateRef,
    has_templates,
    references,
    resolve,
    single,
)

CONTEXT: dict[str, Any] = {
    "trigger": {"user": "ada", "count": 3},
    "nodes": {
        "fetch": {
            "status": "succeeded",
            "output": {
                "body": {"name": "report", "tags": ["a", "b"], "size": 12, "ok": True},
                "items": [{"id": 7, "name": "seven"}, {"id": 8, "name": "eight"}],
                "by_code": {"404": "missing"},
            },
        },
        "skipped": {"status": "skipped", "output": None},
    },
    "item": {"name": "seven", "id": 7},
    "index": 0,
}


# --------------------------------------------------------------------------------------------
# Finding references


def test_references_are_found_through_objects_and_lists_with_their_location() -> None:
    # Given a config with templates at several depths
    config = {
        "url": "https://api.example.com/{{ trigger.user }}/{{ nodes.fetch.output.items.0.id }}",
        "headers": {"X-Name": "{{ item.name }}"},
        "args": [1, "{{ index }}"],
        "plain": "no templates here",
    }
    # When their references are listed
    refs = references(config)
    # Then each is parsed into steps (integer indexes as ints) and located
    assert refs == [
        TemplateRef("{{ trigger.user }}", ("trigger", "user"), "url"),
        TemplateRef(
            "{{ nodes.fetch.output.items.0.id }}",
            ("nodes", "fetch", "output", "items", 0, "id"),
            "url",
        ),
        TemplateRef("{{ item.name }}", ("item", "name"), "headers.X-Name"),
        TemplateRef("{{ index }}", ("index",), "args.1"),
    ]


def test_whitespace_inside_the_braces_is_optional() -> None:
    assert references("{{trigger.user}}")[0].path == ("trigger", "user")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ trigger.user", "unbalanced braces"),
        ("trigger.user }}", "unbalanced braces"),
        ("{{ a {{ b }}", "unbalanced braces"),
        ("{{ }}", "empty template"),
        ("{{ nodes..fetch }}", "empty step"),
        ("{{ nodes.fetch. }}", "empty step"),
        ("{{ trigger['user'] }}", "is not a name"),
        ("{{ trigger.user | upper }}", "is not a name"),
        ("{{ trigger.user + 1 }}", "is not a name"),
        ("{{ len(trigger) }}", "is not a name"),
    ],
)
def test_bad_syntax_is_refused_with_its_location(text: str, message: str) -> None:
    # Given a malformed template inside a config
    # When its references are listed
    with pytest.raises(TemplateError) as caught:
        references({"body": {"text": text}})
    # Then the error says what is wrong and where
    assert message in caught.value.reason
    assert caught.value.path_in_config == "body.text"
    assert isinstance(caught.value, InvalidInput)


def test_templates_in_keys_are_refused() -> None:
    with pytest.raises(TemplateError, match="not allowed in keys"):
        references({"{{ trigger.user }}": 1})


def test_has_templates_sees_templates_anywhere_even_malformed_ones() -> None:
    assert has_templates({"a": ["x", {"b": "{{ trigger.user }}"}]})
    assert has_templates("oops }}")
    assert not has_templates({"a": ["x", {"b": "${run_id} {single} braces"}], "n": 1})


def test_single_recognises_a_string_that_is_exactly_one_template() -> None:
    assert single("{{ nodes.fetch.output.items }}") == TemplateRef(
        "{{ nodes.fetch.output.items }}", ("nodes", "fetch", "output", "items")
    )
    assert single(" {{ trigger }}") is None
    assert single("{{ a }}{{ b }}") is None
    assert single("plain") is None


# --------------------------------------------------------------------------------------------
# Resolving


@pytest.mark.parametrize(
    ("template", "value"),
    [
        ("{{ nodes.fetch.output.body }}", CONTEXT["nodes"]["fetch"]["output"]["body"]),
        ("{{ nodes.fetch.output.body.tags }}", ["a", "b"]),
        ("{{ nodes.fetch.output.body.size }}", 12),
        ("{{ nodes.fetch.output.body.ok }}", True),
        ("{{ nodes.fetch.output.items.1.name }}", "eight"),
        ("{{ nodes.fetch.output.by_code.404 }}", "missing"),
        ("{{ nodes.skipped.output }}", None),
        ("{{ item }}", {"name": "seven", "id": 7}),
        ("{{ index }}", 0),
    ],
)
def test_a_string_that_is_one_template_resolves_to_the_raw_value(template: str, value: Any) -> None:
    # Given a string that is exactly one template
    # When it is resolved
    # Then the value keeps its type (object, list, number, boolean, null)
    assert resolve(template, CONTEXT) == value


def test_templates_in_a_longer_string_are_interpolated() -> None:
    # Given templates inside text
    text = "{{ trigger.user }} has {{ trigger.count }} of {{ nodes.fetch.output.body.tags }}: "
    text += "{{ item }}"
    # Then scalars are str()-ed and objects and lists are JSON
    assert resolve(text, CONTEXT) == 'ada has 3 of ["a", "b"]: {"name": "seven", "id": 7}'


def test_resolution_goes_through_objects_and_lists_and_leaves_the_rest() -> None:
    config = {
        "url": "https://api.example.com/users/{{ trigger.user }}",
        "json": {"ids": ["{{ nodes.fetch.output.items.0.id }}", 9], "flag": False},
        "timeout_s": 5,
        "note": "${run_id} stays",
    }
    assert resolve(config, CONTEXT) == {
        "url": "https://api.example.com/users/ada",
        "json": {"ids": [7, 9], "flag": False},
        "timeout_s": 5,
        "note": "${run_id} stays",
    }


def test_a_resolved_value_is_a_copy() -> None:
    # Given a raw value resolved from the context
    tags = resolve("{{ nodes.fetch.output.body.tags }}", CONTEXT)
    # When the caller changes it
    tags.append("c")
    # Then the context (another node's output) is untouched
    assert CONTEXT["nodes"]["fetch"]["output"]["body"]["tags"] == ["a", "b"]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ nodes.fetch.output.body.id }}",
            "{{ nodes.fetch.output.body.id }}: 'body' has no key 'id'",
        ),
        ("{{ nodes.other.output }}", "{{ nodes.other.output }}: 'nodes' has no key 'other'"),
        (
            "{{ nodes.fetch.output.items.5 }}",
            "{{ nodes.fetch.output.items.5 }}: 'items' has no index 5 (it has 2 items)",
        ),
        (
            "{{ nodes.fetch.output.items.first }}",
            "{{ nodes.fetch.output.items.first }}: 'items' is a list; 'first' is not an index",
        ),
        (
            "{{ nodes.fetch.output.body.size.unit }}",
            "{{ nodes.fetch.output.body.size.unit }}: 'size' is a number, not an object or a list; "
            "it has no key 'unit'",
        ),
        (
            "{{ nodes.skipped.output.body }}",
            "{{ nodes.skipped.output.body }}: 'output' is null, not an object or a list; "
            "it has no key 'body'",
        ),
        (
            "{{ env.HOME }}",
            "{{ env.HOME }}: 'env' is not defined (known: index, item, nodes, trigger)",
        ),
    ],
)
def test_a_path_that_does_not_resolve_names_the_first_missing_step(
    template: str, message: str
) -> None:
    # Given a template naming something absent, inside a config
    # When it is resolved
    with pytest.raises(TemplateError) as caught:
        resolve({"url": f"https://x.example.com/{template}"}, CONTEXT, "config")
    # Then the error quotes the template and the step that failed, at its place in the config
    assert caught.value.reason == message
    assert caught.value.path_in_config == "config.url"
    assert str(caught.value) == f"config.url: {message}"


def test_python_attributes_are_not_reachable() -> None:
    # Given paths that would be attribute access in Python
    # Then they are dictionary keys, and missing
    with pytest.raises(TemplateError, match="'trigger' has no key '__class__'"):
        resolve("{{ trigger.__class__ }}", CONTEXT)
    with pytest.raises(TemplateError, match="'user' is text"):
        resolve("{{ trigger.user.upper }}", CONTEXT)


def test_resolving_a_malformed_template_is_a_syntax_error() -> None:
    with pytest.raises(TemplateError, match="unbalanced braces"):
        resolve("x {{ trigger.user }} {{ y", CONTEXT)
