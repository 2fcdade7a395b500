"""Templates in pipeline node configs: one small, safe syntax.

A template is ``{{ path }}`` where ``path`` is dotted steps, each a name (letters, digits,
``_``, ``:``, ``-``) or an integer index: ``nodes.fetch.output.body.id``,
``nodes.fetch.output.items.0``, ``trigger.user``, ``item``, ``item.name``, ``index``.

* A string that is exactly one template resolves to the raw value, keeping its type (an
  object, a list, a number).
* Templates inside a longer string are interpolated: ``str()`` of the value, JSON for
  objects and lists.

There are no expressions, filters or attribute access: a step is a key of an object (an
integer step on an object is the key ``"0"``) or an index of a list, nothing else, so a
template can only read the data it is given. A step cannot contain ``.``: keys (and node ids)
with dots in them cannot be addressed. There is no escape for a literal ``{{`` or ``}}``.

The context a node's templates resolve against (see
:func:`gathering_tasks.pipelines.planner.node_input`)::

    {"trigger": <run input data>,
     "nodes": {node_id: {"output": <output>, "status": <status>}},  # upstream nodes only
     "item": ..., "index": ...}                                     # map children only
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gathering_tasks.errors import InvalidInput

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_:-]+")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_MAX_TEXT = 80  # a template quoted in an error message is cut to this length

Step = str | int


class TemplateError(InvalidInput):
    """A template is malformed or does not resolve."""

    def __init__(self, path_in_config: str, message: str) -> None:
        self.path_in_config = path_in_config
        super().__init__(message, field=path_in_config or None)


@dataclass(frozen=True)
class TemplateRef:
    """One template as written (``text``), its parsed ``path`` and where it sits in the
    value (``location``, a dotted path such as ``headers.X-Token``; empty at the root)."""

    text: str
    path: tuple[Step, ...]
    location: str = ""


def _quoted(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def _step(part: str, text: str, location: str) -> Step:
    if not part:
        raise TemplateError(location, f"{_quoted(text)}: empty step in the path")
    if _INDEX.fullmatch(part):
        return int(part)
    if not _NAME.fullmatch(part):
        raise TemplateError(
            location,
            f"{_quoted(text)}: {part!r} is not a name (letters, digits, '_', ':', '-') or an index",
        )
    return part


def _parse(match: re.Match[str], location: str) -> TemplateRef:
    text = match.group(0)
    inner = match.group(1)
    if "{{" in inner:
        raise TemplateError(location, f"{_quoted(text)}: unbalanced braces")
    body = inner.strip()
    if not body:
        raise TemplateError(location, f"{_quoted(text)}: empty template")
    path = tuple(_step(part, text, location) for part in body.split("."))
    return TemplateRef(text, path, location)


def _in_text(text: str, location: str) -> list[TemplateRef]:
    refs = [_parse(match, location) for match in _TEMPLATE.finditer(text)]
    rest = _TEMPLATE.sub("", text)
    if "{{" in rest or "}}" in rest:
        raise TemplateError(location, f"{_quoted(text)!r}: unbalanced braces")
    return refs


def _join(location: str, step: object) -> str:
    return f"{location}.{step}" if location else str(step)


def _members(value: Mapping[Any, Any], location: str) -> Iterator[tuple[Any, str, Any]]:
    """(key, location of the member, member); a key that looks like a template is refused."""
    for key, item in value.items():
        where = _join(location, key)
        if isinstance(key, str) and ("{{" in key or "}}" in key):
            raise TemplateError(where, "templates are not allowed in keys")
        yield key, where, item


def references(value: Any, location: str = "") -> list[TemplateRef]:
    """Every template in ``value`` (strings, recursively through objects and lists), in
    document order. :class:`TemplateError` on bad syntax."""
    if isinstance(value, str):
        return _in_text(value, location)
    if isinstance(value, Mapping):
        return [
            ref for _, where, item in _members(value, location) for ref in references(item, where)
        ]
    if isinstance(value, list | tuple):
        return [ref for i, item in enumerate(value) for ref in references(item, _join(location, i))]
    return []


def has_templates(value: Any) -> bool:
    """Does ``value`` hold anything that looks like a template (even a malformed one)?"""
    if isinstance(value, str):
        return "{{" in value or "}}" in value
    if isinstance(value, Mapping):
        return any(has_templates(k) or has_templates(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_templates(item) for item in value)
    return False


def single(value: str, location: str = "") -> TemplateRef | None:
    """The template ``value`` consists of, when it is exactly one template; else None."""
    refs = _in_text(value, location)
    return refs[0] if len(refs) == 1 and refs[0].text == value else None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return f"a {type(value).__name__}"


def _index(items: list[Any] | tuple[Any, ...], step: Step, name: str, ref: TemplateRef) -> Any:
    if not isinstance(step, int):
        raise TemplateError(
            ref.location, f"{_quoted(ref.text)}: {name!r} is a list; {step!r} is not an index"
        )
    if step >= len(items):
        raise TemplateError(
            ref.location,
            f"{_quoted(ref.text)}: {name!r} has no index {step} (it has {len(items)} items)",
        )
    return items[step]


def _next(current: Any, step: Step, name: str | None, ref: TemplateRef) -> Any:
    if isinstance(current, Mapping):
        key = str(step)
        if key in current:
            return current[key]
        if name is None:
            known = ", ".join(sorted(str(k) for k in current))
            raise TemplateError(
                ref.location, f"{_quoted(ref.text)}: {key!r} is not defined (known: {known})"
            )
        raise TemplateError(ref.location, f"{_quoted(ref.text)}: {name!r} has no key {key!r}")
    if isinstance(current, list | tuple) and name is not None:
        return _index(current, step, name, ref)
    raise TemplateError(
        ref.location,
        f"{_quoted(ref.text)}: {name!r} is {_kind(current)}, not an object or a list; "
        f"it has no key {str(step)!r}",
    )


def lookup(ref: TemplateRef, context: Mapping[str, Any]) -> Any:
    """The value ``ref`` names in ``context``; :class:`TemplateError` naming the first step
    that is missing."""
    current: Any = context
    name: str | None = None
    for step in ref.path:
        current = _next(current, step, name, ref)
        name = str(step)
    return current


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _resolve_text(text: str, context: Mapping[str, Any], location: str) -> Any:
    whole = single(text, location)
    if whole is not None:
        # A copy: the caller may change what it gets without changing another node's output.
        return copy.deepcopy(lookup(whole, context))
    if "{{" not in text and "}}" not in text:
        return text
    _in_text(text, location)  # syntax first, so a bad template is reported as such
    return _TEMPLATE.sub(lambda m: _render(lookup(_parse(m, location), context)), text)


def resolve(value: Any, context: Mapping[str, Any], location: str = "") -> Any:
    """``value`` with every template resolved against ``context`` (recursively through
    objects and lists). :class:`TemplateError` when a template is malformed or names
    something that is not there; ``location`` prefixes the error's path in the value."""
    if isinstance(value, str):
        return _resolve_text(value, context, location)
    if isinstance(value, Mapping):
        return {
            key: resolve(item, context, where) for key, where, item in _members(value, location)
        }
    if isinstance(value, list | tuple):
        return [resolve(item, context, _join(location, i)) for i, item in enumerate(value)]
    return value
