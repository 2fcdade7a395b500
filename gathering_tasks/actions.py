"""Action definitions: the validated shape of a scheduled action, checked at the door.

Nothing reaches the database until :func:`validate_action` has accepted it; every refusal is
an :class:`~gathering_tasks.errors.InvalidInput` naming the offending field.

Both backends must give the same answer for the same input, so what one of them cannot store
is refused here for all of them, with the path of the value (``config.headers.X-Token``,
``config.args.1``, ``description``):

* NUL characters (``\\x00``) in any text, keys included: PostgreSQL text and ``jsonb`` have no
  room for them (SQLite would store them).
* lone surrogates (``"\\ud800"`` parses from JSON): not UTF-8, refused by PostgreSQL.
* NaN and +-Infinity anywhere (Python's ``json`` reads ``NaN``; JSON has no such numbers and
  ``jsonb`` refuses them; a non-finite duration would only disable the action later).
* in ``config``, anything that is not JSON (a ``datetime``, a set, bytes, a non-text key), and
  nesting deeper than :data:`MAX_CONFIG_DEPTH` (which also stops self-referring objects).

``call_api`` and ``send_notification`` configs are also checked against the deployment's
settings (:func:`gathering_tasks.skills.admission.admit`): a literal forbidden target
(``http://169.254.169.254/``, ``localhost``) and a secret reference outside
``GATHERING_SECRET_ENV_ALLOW`` are refused here, not at every run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gathering_tasks.errors import InvalidInput
from gathering_tasks.kinds import ACTION_TYPES, kind, resolve
from gathering_tasks.schedules import MAX_CATCHUP_SLOTS, Schedule, parse_schedule
from gathering_tasks.settings import Settings, get_settings
from gathering_tasks.skills.admission import Admission, admit

# \Z, not $: "$" also matches before a trailing newline.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}\Z")
MAX_CONFIG_DEPTH = 64
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActionSpec(_Strict):
    """Everything a user states about an action. Runtime state lives elsewhere."""

    name: str
    action_type: str  # one of kinds.ACTION_TYPES (checked first, with the known list)
    config: dict[str, Any]
    schedule: dict[str, Any]
    description: str | None = Field(default=None, max_length=2000)
    start_at: datetime | None = None
    end_at: datetime | None = None
    max_runs: int | None = Field(default=None, ge=1)
    catchup_mode: Literal["skip", "latest", "all"] = "latest"
    catchup_grace_s: float = Field(default=3600.0, ge=0)
    # Bounded by what the planner plans per call, or the excess would vanish silently.
    catchup_max: int = Field(default=100, ge=1, le=MAX_CATCHUP_SLOTS)
    overlap_policy: Literal["skip", "allow"] = "skip"
    retry_max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff_s: float = Field(default=5.0, ge=0)
    retry_backoff_max_s: float = Field(default=300.0, ge=0, le=3600)
    timeout_s: int | None = Field(default=None, ge=1)
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    priority: int | None = Field(default=None, ge=0, le=9)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("must be 1-200 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @field_validator("start_at", "end_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a UTC offset")
        return value


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL characters (\\x00); PostgreSQL cannot store them"
    if _SURROGATE.search(text):
        return "must be valid Unicode; it holds a lone surrogate, which cannot be stored"
    return None


def _scalar_problem(value: object, *, json_only: bool) -> str | None:
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, float) and not math.isfinite(value):
        why = "; JSON has no NaN or Infinity" if json_only else ""
        return f"must be a finite number{why}"
    if json_only and not (value is None or isinstance(value, bool | int | float)):
        kind = type(value).__name__
        return f"must be JSON (text, number, boolean, null, list or object), not {kind}"
    return None


def _segment(key: str) -> str:
    """A key as it appears in a field path: non-printable characters escaped, one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in key)


def _members(value: dict[Any, Any], path: str) -> Iterator[tuple[str, object]]:
    """The members of an object, with their paths; a key that cannot be stored is refused."""
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidInput(f"has a key that is not text ({key!r})", field=path)
        problem = _text_problem(key)
        if problem:
            raise InvalidInput(f"key {problem}", field=f"{path}.{_segment(key)}")
        yield f"{path}.{_segment(key)}", item


def _children(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str
) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return list(_members(value, path))
    return [(f"{path}.{index}", item) for index, item in enumerate(value)]


def _check_storable(value: object, path: str, *, json_only: bool) -> None:
    """Refuse, naming the first offending path, what some backend cannot store.

    Walked in document order with an explicit stack; the depth bound also ends an object
    that contains itself. ``json_only`` also refuses values JSON has no form for.
    """
    stack: list[tuple[str, object, int]] = [(path, value, 0)]
    while stack:
        where, item, depth = stack.pop()
        if not isinstance(item, dict | list | tuple):
            problem = _scalar_problem(item, json_only=json_only)
            if problem:
                raise InvalidInput(problem, field=where)
            continue
        if depth >= MAX_CONFIG_DEPTH:
            raise InvalidInput(f"is nested more than {MAX_CONFIG_DEPTH} levels deep", field=where)
        members = [(child_path, child, depth + 1) for child_path, child in _children(item, where)]
        stack.extend(reversed(members))


def check_storable(spec: ActionSpec) -> None:
    """Refuse what one backend would store and another reject (see the module docstring)."""
    for name in type(spec).model_fields:
        _check_storable(getattr(spec, name), name, json_only=name == "config")


def _first_error(exc: ValidationError, prefix: str = "") -> InvalidInput:
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or None)
    return InvalidInput(err["msg"], field=field)


def validate_action(
    data: Mapping[str, Any],
    *,
    now: datetime,
    max_config_bytes: int,
    task_allowed: Callable[[str], bool],
    max_timeout_s: int | None = None,
    settings: Settings | None = None,
) -> tuple[ActionSpec, Schedule]:
    """Check a whole action definition. Returns the spec and its parsed schedule.

    ``settings`` give the allowlists skill configs are admitted with; without them, this
    process's settings (``GATHERING_*``) do.
    """
    if "action_type" in data and data["action_type"] not in ACTION_TYPES:
        known = ", ".join(ACTION_TYPES)
        raise InvalidInput(
            f"unknown action type {data['action_type']!r} (known: {known})", field="action_type"
        )
    try:
        spec = ActionSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _first_error(exc) from exc
    check_storable(spec)
    size = len(json.dumps(spec.config, separators=(",", ":")))
    if size > max_config_bytes:
        raise InvalidInput(f"is {size} bytes; the limit is {max_config_bytes}", field="config")
    if spec.end_at and spec.start_at and spec.end_at <= spec.start_at:
        raise InvalidInput("must be after start_at", field="end_at")
    if max_timeout_s and spec.timeout_s and spec.timeout_s > max_timeout_s:
        # The broker's visibility timeout is derived from the global limit: a longer task
        # would be redelivered while still running.
        raise InvalidInput(
            f"is above GATHERING_TASK_TIME_LIMIT_S ({max_timeout_s}s); raise that instead",
            field="timeout_s",
        )
    try:
        resolve(str(kind(spec.action_type).config_check))(spec.config, task_allowed)
        admit(spec.action_type, spec.config, Admission.from_settings(settings or get_settings()))
    except ValidationError as exc:
        raise _first_error(exc, "config") from exc
    except InvalidInput as exc:
        if exc.field and not exc.field.startswith("config"):
            raise InvalidInput(exc.reason, field=f"config.{exc.field}") from exc
        raise
    schedule = parse_schedule(spec.schedule, now=now)
    return spec, schedule
