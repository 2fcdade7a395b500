"""The settings described for operators: the generated reference and the effective values.

:func:`reference_markdown` renders ``docs/configuration.md`` from the settings model alone
(names, types, constraints, defaults and each field's ``description``), never from this
machine's environment, so the page is the same wherever it is generated;
``tests/unit/test_configuration_reference.py`` fails when the page and the model differ.
:func:`effective_settings` lists what a process would run with, secrets masked
(``gathering-tasks config show``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import annotated_types
from pydantic import SecretStr
from pydantic.fields import ComputedFieldInfo, FieldInfo

from gathering_tasks.settings import Settings, env_var

REGENERATE = "gathering-tasks config reference --output docs/configuration.md"
HIDDEN_VALUE = "(secret)"
MASK = "***"

# (title, fields): every field of the model in exactly one group (checked on rendering).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Connections", ("database_url", "redis_url", "broker_url_override", "key_prefix")),
    (
        "Beat, leader and sweeper",
        (
            "beat_tick_s",
            "beat_batch_size",
            "beat_slot_budget",
            "leader_lease_ttl_s",
            "sweep_interval_s",
            "pending_grace_s",
            "retention_days",
            "retention_batch",
        ),
    ),
    (
        "Workers and tasks",
        (
            "task_time_limit_s",
            "run_lease_ttl_s",
            "lock_margin_s",
            "outcome_retry_s",
            "default_queue",
            "consume_celery_queue",
            "worker_prefetch_multiplier",
            "imports",
        ),
    ),
    (
        "Database call bounds",
        ("db_connect_timeout_s", "db_statement_timeout_s", "db_lock_timeout_s"),
    ),
    ("Actions and results", ("run_task_allowlist", "max_config_bytes", "max_result_bytes")),
    ("Pipelines", ("pipeline_max_nodes", "pipeline_max_map_items", "pipeline_inline_budget_s")),
    (
        "HTTP skill (docs/security.md)",
        (
            "http_allow_networks",
            "http_allow_hosts",
            "http_allow_metadata_address_i_know_this_is_dangerous",
            "http_connect_timeout_s",
            "http_read_timeout_s",
            "http_max_response_bytes",
            "http_max_attempts",
        ),
    ),
    (
        "Secrets and notifications",
        (
            "secret_env_allow",
            "smtp_host",
            "smtp_port",
            "smtp_security",
            "smtp_username",
            "smtp_password",
            "smtp_from",
        ),
    ),
    ("Metrics (docs/metrics.md)", ("metrics_port", "metrics_address", "metrics_dir")),
)

# Defaults computed on the machine (a path in the user's home) are documented as a rule.
FIXED_DEFAULTS = {"database_url": "`sqlite:///$GATHERING_HOME/gathering.db`"}

# Read by the code or by Flower outside the settings model: (variable, default, meaning).
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        "GATHERING_HOME",
        "`$XDG_DATA_HOME/gathering-tasks`, else `~/.local/share/gathering-tasks`",
        "Directory of the embedded default database (`gathering.db`), made absolute so every "
        "process finds the same file from any directory. `make demo` sets it to `var/`.",
    ),
    (
        "GATHERING_DEMO_SINK_PORT",
        "`8765`",
        "Port of the demo's local HTTP sink (`gathering-tasks demo sink`, `demo seed`).",
    ),
    (
        "FLOWER_ADDRESS",
        "`127.0.0.1`",
        "Address Flower listens on (config/flowerconfig.py); any non-loopback address is "
        "refused without FLOWER_BASIC_AUTH or FLOWER_AUTH.",
    ),
    ("FLOWER_PORT", "`5555`", "Port Flower listens on."),
    (
        "FLOWER_BASIC_AUTH",
        "unset",
        "`user:password` protecting Flower's pages and its API (docs/monitoring.md).",
    ),
    (
        "FLOWER_UNAUTHENTICATED_API",
        "unset",
        "Flower's own switch: `true` opens its API without authentication (loopback only).",
    ),
)

INTRO = f"""\
# Configuration reference

<!-- Generated from gathering_tasks/settings.py; do not edit by hand.
     Regenerate with: {REGENERATE} -->

Every setting is an environment variable read once at process start. A value that does not
parse or breaks a bound stops the process at start, naming the setting; unknown `GATHERING_*`
variables are ignored. `gathering-tasks config show` prints what a process would run with
(secrets masked); `config/example.env` is a starting point.

How values are written: numbers as text (`30`, `0.5`); booleans as `true` / `false` (or `1` /
`0`); lists as comma-separated text (`a.b, c.d`) or a JSON array (`["a.b", "c.d"]`); an unset
optional setting is simply absent. Units are in the names: `_s` seconds, `_bytes` bytes,
`_days` days.
"""


# -- the reference ---------------------------------------------------------------------------


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``None``, and whether ``None`` was allowed."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


_TYPE_NAMES: dict[Any, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "boolean",
    SecretStr: f"secret (shown as `{HIDDEN_VALUE}`)",
    list[str]: "list of text",
}

_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _bounds(metadata: Iterable[object]) -> list[str]:
    out = []
    for item in metadata:
        for cls, attr, sign in _BOUNDS:
            if isinstance(item, cls):
                out.append(f"{sign} {_number(getattr(item, attr))}")
    return out


def type_text(field: FieldInfo) -> str:
    """``number, > 0, <= 60``; ``one of `a`, `b```; ``list of text``."""
    base, _optional = _base_type(field.annotation)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(f"`{choice}`" for choice in typing.get_args(base))
    elif base in _TYPE_NAMES:
        text = _TYPE_NAMES[base]
    else:
        raise TypeError(f"no documented name for the type {base!r}: add it to _TYPE_NAMES")
    return ", ".join([text, *_bounds(field.metadata)])


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value_text(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, list):
        return ", ".join(f"`{item}`" for item in value) if value else "empty"
    return f"`{value}`"


def default_text(name: str, field: FieldInfo) -> str:
    """The documented default: a fixed rule for machine-dependent ones, never a secret."""
    if name in FIXED_DEFAULTS:
        return FIXED_DEFAULTS[name]
    if field.default_factory is not None:
        if field.default_factory is not list:
            raise ValueError(f"{name}: a computed default needs a fixed text in FIXED_DEFAULTS")
        return "empty"
    base, _optional = _base_type(field.annotation)
    if base is SecretStr and field.default is not None:
        return f"`{HIDDEN_VALUE}`"
    return _value_text(field.default)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _description(name: str, info: FieldInfo | ComputedFieldInfo) -> str:
    if not info.description:
        raise ValueError(f"the setting {name} has no description: give its Field one")
    return info.description


def checked_groups() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """:data:`GROUPS`, once every field is known to be in exactly one of them."""
    grouped = [name for _title, names in GROUPS for name in names]
    fields = set(Settings.model_fields)
    missing = sorted(fields - set(grouped))
    unknown = sorted(set(grouped) - fields)
    twice = sorted({name for name in grouped if grouped.count(name) > 1})
    if missing or unknown or twice:
        raise ValueError(
            f"settings_doc.GROUPS is out of date: not grouped {missing}, not settings "
            f"{unknown}, grouped twice {twice}"
        )
    return GROUPS


def _group_section(title: str, names: Sequence[str]) -> list[str]:
    lines = [f"## {title}", "", "| variable | type | default | description |", "|---|---|---|---|"]
    for name in names:
        field = Settings.model_fields[name]
        lines.append(
            _row(
                f"`{env_var(name)}`",
                type_text(field),
                default_text(name, field),
                _description(name, field),
            )
        )
    return [*lines, ""]


def _derived_section() -> list[str]:
    defaults = Settings.model_construct(database_url=FIXED_DEFAULTS["database_url"])
    lines = [
        "## Derived (computed from the settings above; not settable)",
        "",
        "| name | with the defaults | description |",
        "|---|---|---|",
    ]
    for name, info in Settings.model_computed_fields.items():
        lines.append(
            _row(f"`{name}`", _value_text(getattr(defaults, name)), _description(name, info))
        )
    return [*lines, ""]


def _other_section() -> list[str]:
    lines = [
        "## Read outside the settings model",
        "",
        "| variable | default | description |",
        "|---|---|---|",
    ]
    lines += [_row(f"`{name}`", default, text) for name, default, text in OTHER_VARIABLES]
    return [*lines, ""]


def reference_markdown() -> str:
    """docs/configuration.md, from the settings model only (the same on every machine)."""
    lines = [INTRO]
    for title, names in checked_groups():
        lines += _group_section(title, names)
    lines += _derived_section() + _other_section()
    return "\n".join(lines).rstrip("\n") + "\n"


# -- the effective values --------------------------------------------------------------------

Source = Literal["environment", "default", "derived"]


@dataclass(frozen=True)
class SettingValue:
    """One setting as ``config show`` prints it: never a secret, never a URL's password."""

    variable: str
    field: str
    value: Any
    source: Source

    def as_dict(self) -> dict[str, Any]:
        return {
            "variable": self.variable,
            "field": self.field,
            "value": self.value,
            "source": self.source,
        }


def mask_url(text: str) -> str:
    """A URL with its password replaced by ``***`` (``redis://:***@host:6379/0``)."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not password:
        return text
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def shown(value: object) -> object:
    """A value safe to print: secrets as ``(secret)``, URLs without their password."""
    if isinstance(value, SecretStr):
        return HIDDEN_VALUE
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def effective_settings(settings: Settings) -> list[SettingValue]:
    """Every setting of ``settings`` in reference order, then the derived ones."""
    out = []
    for _title, names in checked_groups():
        for name in names:
            source: Source = "environment" if name in settings.model_fields_set else "default"
            out.append(SettingValue(env_var(name), name, shown(getattr(settings, name)), source))
    for name in Settings.model_computed_fields:
        out.append(SettingValue(name, name, shown(getattr(settings, name)), "derived"))
    return out
