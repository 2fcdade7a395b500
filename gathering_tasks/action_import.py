"""Bulk import of action definitions: read a JSON or YAML list, check every entry, plan.

The file holds a list of definitions in the format of ``actions show`` (and ``actions add
--file``): state fields are ignored, ``action_config`` is read as ``config``. Every entry is
checked before anything is written, and every problem is reported at once, each naming its
entry (counted from 1), the entry's name and the field; the service then stores all entries
in one transaction, or none (:meth:`gathering_tasks.api.ActionService.import_actions`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import yaml

from gathering_tasks.actions import ActionSpec
from gathering_tasks.errors import InvalidInput
from gathering_tasks.schedules import OnceSchedule, Schedule

Phase = Literal["checking", "storing"]
# Told (phase, done, total) after each entry is checked and after each is stored.
Progress = Callable[[Phase, int, int], None]
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _DefinitionLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases, and with times left as text (as JSON gives them),
    so that a YAML file and its JSON twin import the same actions."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            peek: Callable[[], Any] = self.peek_event  # untyped in the stubs
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted", peek().start_mark
            )
        return super().compose_node(parent, index)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return re.sub(r"\s*\n\s*", " ", str(exc)).strip()


def load_entries(text: str) -> list[Any]:
    """The list of definitions a file holds (JSON or YAML); one-line InvalidInput otherwise."""
    try:
        document = json.loads(text)
    except ValueError:
        loader = _DefinitionLoader(text)
        try:
            document = loader.get_single_data()
        except yaml.YAMLError as exc:
            raise InvalidInput(f"is not JSON or YAML: {_yaml_problem(exc)}", field="file") from exc
        finally:
            loader.dispose()
    if not isinstance(document, list):
        raise InvalidInput(
            "must hold a list of action definitions (one action: actions add --file)",
            field="file",
        )
    return document


@dataclass(frozen=True)
class EntryProblem:
    """Why one entry cannot be imported."""

    entry: int  # counted from 1
    name: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        name = f" ({self.name})" if self.name else ""
        where = f"{self.field}: " if self.field else ""
        return f"entry {self.entry}{name}: {where}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "name": self.name, "field": self.field, "error": self.message}


class ImportInvalid(InvalidInput):
    """The import file has invalid entries; nothing was stored."""

    def __init__(self, problems: Sequence[EntryProblem], total: int) -> None:
        self.problems = list(problems)
        self.total = total
        super().__init__("\n".join(str(problem) for problem in self.problems))

    @property
    def summary(self) -> str:
        entries = "entry" if self.total == 1 else "entries"
        return f"{len(self.problems)} invalid of {self.total} {entries}; nothing was stored"


@dataclass(frozen=True)
class Checked:
    """One definition accepted by the service's checks."""

    spec: ActionSpec
    schedule: Schedule
    first_slot: datetime | None


@dataclass(frozen=True)
class PlannedEntry:
    """An entry that will be stored: created, or (``--upsert``) replacing a live action."""

    entry: int
    checked: Checked
    replace: bool

    @property
    def name(self) -> str:
        return self.checked.spec.name


@dataclass(frozen=True)
class ImportResult:
    """What an import stored (or, with ``dry_run``, would store)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "count": len(self.created) + len(self.updated),
            "created": self.created,
            "updated": self.updated,
        }


def _entry_name(raw: object) -> str | None:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    return name if isinstance(name, str) and name else None


def _never_runs(checked: Checked) -> EntryProblem | None:
    if checked.first_slot is not None:
        return None
    field_name = "schedule.at" if isinstance(checked.schedule, OnceSchedule) else "end_at"
    message = "leaves no slot at or after now: the action would never run"
    return EntryProblem(0, checked.spec.name, field_name, message)


class _Planner:
    """Checks entries one by one, collecting every problem instead of stopping at the first."""

    def __init__(self, *, existing: set[str], upsert: bool) -> None:
        self.existing = existing
        self.upsert = upsert
        self.seen: dict[str, int] = {}
        self.problems: list[EntryProblem] = []
        self.planned: list[PlannedEntry] = []

    def add(self, entry: int, raw: object, check: Callable[[Mapping[str, Any]], Checked]) -> None:
        name = _entry_name(raw)
        if not isinstance(raw, Mapping):
            self._problem(entry, None, None, "must be an object (an action definition)")
            return
        try:
            checked = check(raw)
        except InvalidInput as exc:
            self._problem(entry, name, exc.field, exc.reason)
            return
        self._place(entry, checked)

    def _place(self, entry: int, checked: Checked) -> None:
        name = checked.spec.name
        if name in self.seen:
            self._problem(entry, name, "name", f"is also the name of entry {self.seen[name]}")
            return
        self.seen[name] = entry
        replace = name in self.existing
        if replace and not self.upsert:
            message = "an action with this name exists (--upsert replaces its definition)"
            self._problem(entry, name, "name", message)
            return
        never = None if replace else _never_runs(checked)
        if never is not None:
            self._problem(entry, name, never.field, never.message)
            return
        self.planned.append(PlannedEntry(entry, checked, replace))

    def _problem(self, entry: int, name: str | None, field: str | None, message: str) -> None:
        self.problems.append(EntryProblem(entry, name, field, message))


def plan_import(
    entries: Sequence[object],
    *,
    check: Callable[[Mapping[str, Any]], Checked],
    existing: set[str],
    upsert: bool,
    progress: Progress | None = None,
) -> list[PlannedEntry]:
    """Every entry checked with ``check`` (which raises InvalidInput), against the names of
    live actions in ``existing``. :class:`ImportInvalid` lists every problem found."""
    planner = _Planner(existing=existing, upsert=upsert)
    for number, raw in enumerate(entries, start=1):
        planner.add(number, raw, check)
        if progress is not None:
            progress("checking", number, len(entries))
    if planner.problems:
        raise ImportInvalid(planner.problems, len(entries))
    return planner.planned
