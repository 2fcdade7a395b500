"""Shared pieces of the skill config schemas: secret references and error translation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, ValidationError
from pydantic_core import ErrorDetails

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills.errors import SecretNotAvailable

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# The worker's own configuration (database URL, SMTP password, ...) lives under this prefix;
# an action must not be able to send it to a server of its choosing.
_RESERVED_ENV_PREFIX = "GATHERING_"

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


def read_secret(env: Mapping[str, str], name: str) -> str:
    """The value of secret ``name`` from ``env``; :class:`SecretNotAvailable` when unset."""
    value = env.get(name)
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
