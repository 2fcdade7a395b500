"""Shared pieces of the skill config schemas: secret references and error translation.

Secrets are referenced by the *name* of an environment variable of the worker (``token_env``,
``password_env``, ``value_env``, ``secret_env``, ``url: "env:NAME"``), never written inline.
Which names may be referenced is the operator's choice, default deny: only names matching a
pattern of ``GATHERING_SECRET_ENV_ALLOW`` (``fnmatch`` patterns of letters, digits, ``_``,
``*`` and ``?``, matched case-sensitively, e.g. ``HOOK_*,SLACK_*``), and never ``GATHERING_*``
(the worker's own configuration). :class:`SecretPolicy` says so at creation
(:class:`InvalidInput` naming the field) and :class:`SecretSource` again when the run reads
the value (:class:`SecretNotAllowed`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated

from pydantic import AfterValidator, ValidationError
from pydantic_core import ErrorDetails

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills.errors import SecretNotAllowed, SecretNotAvailable, bounded

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# The worker's own configuration (database URL, SMTP password, ...) lives under this prefix;
# an action must not be able to send it to a server of its choosing.
_RESERVED_ENV_PREFIX = "GATHERING_"
_SECRET_PATTERN = re.compile(r"^[A-Za-z0-9_*?]{1,128}$")
_LITERAL = re.compile(r"[A-Za-z0-9_]")
ENV_ALLOW_SETTING = "GATHERING_SECRET_ENV_ALLOW"

# Keys that would carry a secret inline; the schema wants the ``*_env`` reference instead.
INLINE_SECRET_KEYS = frozenset({"token", "password", "value", "secret", "api_key", "key"})


def check_env_name(name: str) -> str:
    """Accept an environment variable name that an action may reference; else ValueError."""
    if not _ENV_NAME.match(name):
        raise ValueError("must be an environment variable name (letters, digits, underscore)")
    if name.upper().startswith(_RESERVED_ENV_PREFIX):
        raise ValueError(f"variables named {_RESERVED_ENV_PREFIX}* are reserved for the worker")
    return name


EnvName = Annotated[str, AfterValidator(check_env_name)]
"""The *name* of an environment variable that holds a secret (never the secret itself)."""


def check_secret_pattern(pattern: str) -> str:
    """Accept one ``GATHERING_SECRET_ENV_ALLOW`` pattern; else ValueError saying why."""
    if not _SECRET_PATTERN.match(pattern):
        raise ValueError(
            f"secret_env_allow: {bounded(pattern)!r} is not a pattern of letters, digits, "
            "'_', '*' and '?'"
        )
    if not _LITERAL.search(pattern):
        raise ValueError(
            f"secret_env_allow: {pattern!r} would open every variable of the worker; "
            "name a prefix (HOOK_*) or a variable"
        )
    if pattern.upper().startswith(_RESERVED_ENV_PREFIX):
        raise ValueError(
            f"secret_env_allow: {pattern!r}: variables named {_RESERVED_ENV_PREFIX}* are "
            "reserved for the worker and never referenced"
        )
    return pattern


@dataclass(frozen=True)
class SecretPolicy:
    """Which environment variable names a config may reference as a secret (patterns)."""

    patterns: tuple[str, ...] = ()

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not be referenced, or None when it may."""
        if name.upper().startswith(_RESERVED_ENV_PREFIX):
            return f"variables named {_RESERVED_ENV_PREFIX}* are reserved for the worker"
        if any(fnmatchcase(name, pattern) for pattern in self.patterns):
            return None
        if not self.patterns:
            return f"{ENV_ALLOW_SETTING} is empty, so no secret may be referenced"
        listed = bounded(",".join(self.patterns))
        return f"it matches none of {ENV_ALLOW_SETTING} ({listed})"

    def check(self, name: str, field: str) -> None:
        """At creation: :class:`InvalidInput` on ``field`` when ``name`` may not be referenced."""
        why = self.refusal(name)
        if why is not None:
            raise InvalidInput(
                f"environment variable {bounded(name)} may not be referenced: {why}", field=field
            )


@dataclass(frozen=True)
class SecretSource:
    """Where a run reads its secrets: the worker's environment, through the policy."""

    env: Mapping[str, str] = field(repr=False)
    policy: SecretPolicy = field(default_factory=SecretPolicy)

    def read(self, name: str) -> str:
        """The value of secret ``name``: refused when the policy does not allow the name
        (:class:`SecretNotAllowed`), :class:`SecretNotAvailable` when unset or empty."""
        why = self.policy.refusal(name)
        if why is not None:
            raise SecretNotAllowed(name, why)
        value = self.env.get(name)
        if not value:
            raise SecretNotAvailable(name)
        return value


def has_line_break(text: str) -> bool:
    """Header injection guard: CR, LF or NUL anywhere."""
    return any(ch in text for ch in "\r\n\x00")


def _field_path(loc: tuple[int | str, ...], tags: frozenset[str]) -> str:
    # Tagged unions put the tag value in the location; it is not a field the user wrote.
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and part in tags))


def _is_inline_secret(error: ErrorDetails, tags: frozenset[str]) -> bool:
    path = _field_path(tuple(error["loc"]), tags)
    return error["type"] == "extra_forbidden" and path.rsplit(".", 1)[-1] in INLINE_SECRET_KEYS


def invalid_input(exc: ValidationError, *, tags: frozenset[str], tag_field: str) -> InvalidInput:
    """The first pydantic error as :class:`InvalidInput` naming the field (``auth.token_env``).

    ``tags`` are the discriminator values of the schema's tagged unions and ``tag_field`` the
    discriminator name, so an unknown or missing tag is reported on that field. An inline
    secret is reported before anything else (it explains the missing ``*_env`` field).
    """
    errors = exc.errors(include_url=False)
    inline = [e for e in errors if _is_inline_secret(e, tags)]
    error = (inline or errors)[0]
    path = _field_path(tuple(error["loc"]), tags)
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        path = f"{path}.{tag_field}" if path else tag_field
        expected = error.get("ctx", {}).get("expected_tags", ", ".join(sorted(tags)))
        message = f"must be one of: {expected}"
        if kind == "union_tag_invalid":
            message = f"unknown value; {message}"
    elif inline:
        message = "inline secrets are not accepted; name an environment variable (*_env) instead"
    elif kind == "missing":
        message = "field required"
    return InvalidInput(message, field=path or None)
