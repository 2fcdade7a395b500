"""The ``call_api`` action config (:class:`HttpRequestSpec`) and the request it becomes.

Example config::

    {"method": "POST", "url": "https://api.example.com/v1/items",
     "json": {"name": "x"},
     "auth": {"type": "bearer", "token_env": "EXAMPLE_API_TOKEN"},
     "expected_statuses": [200, 201], "retry": true}

Secrets are referenced by environment variable name only (``token_env``, ``password_env``,
``value_env``); a literal ``token``/``password``/``value`` is rejected, and so are credential
headers (``Authorization``, ``Cookie``, ``X-Api-Key``, ...) written inline. Variables named
``GATHERING_*`` (the worker's own configuration) cannot be referenced, and the others only
when ``GATHERING_SECRET_ENV_ALLOW`` matches them (see :mod:`._validation`; checked at creation
by :mod:`.admission` and again by :meth:`HttpRequestSpec.build`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills._validation import (
    EnvName,
    SecretSource,
    has_line_break,
    invalid_input,
)
from gathering_tasks.skills.errors import SsrfRefused, bounded
from gathering_tasks.skills.urls import parse_url

HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "PUT", "DELETE"})

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
# Set by the client itself; a config may not override them.
MANAGED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "user-agent", "idempotency-key"}
)
# Carry credentials: only through ``auth`` with an env reference, never inline.
CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "apikey",
        "x-auth-token",
        "x-access-token",
    }
)
ParamScalar = str | int | float | bool
MAX_HEADER_VALUE_CHARS = 8192


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuth(_Strict):
    """``Authorization: Bearer <value of token_env>``."""

    type: Literal["bearer"]
    token_env: EnvName


class BasicAuth(_Strict):
    """``Authorization: Basic base64(username:<value of password_env>)``."""

    type: Literal["basic"]
    username: str = Field(min_length=1, max_length=256)
    password_env: EnvName

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value or has_line_break(value):
            raise ValueError("must not contain ':' or line breaks")
        return value


class ApiKeyAuth(_Strict):
    """``<header>: <value of value_env>``."""

    type: Literal["api_key"]
    header: str = "X-Api-Key"
    value_env: EnvName

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _TOKEN.match(value) or value.lower() in MANAGED_HEADERS:
            raise ValueError("must be a header name the client does not manage itself")
        return value


Auth = Annotated[BearerAuth | BasicAuth | ApiKeyAuth, Field(discriminator="type")]
AUTH_TAGS = frozenset({"bearer", "basic", "api_key"})


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    if len(headers) > 50:
        raise ValueError("at most 50 headers")
    for name, value in headers.items():
        lowered = name.lower()
        if not _TOKEN.match(name):
            raise ValueError(f"invalid header name {bounded(name)!r}")
        if lowered in MANAGED_HEADERS:
            raise ValueError(f"{name} is set by the client and cannot be configured")
        if lowered in CREDENTIAL_HEADERS:
            raise ValueError(f"{name} carries credentials: use 'auth' with an *_env reference")
        if has_line_break(value) or len(value) > MAX_HEADER_VALUE_CHARS or not _latin1(value):
            raise ValueError(f"invalid value for header {name!r}")
    return headers


def _latin1(text: str) -> bool:
    # HTTP/1.1 header values go on the wire as ISO-8859-1.
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


class HttpRequestSpec(_Strict):
    """The ``call_api`` action config: one HTTP request, validated at action creation.

    * ``expected_statuses`` -- statuses that count as success; default: any 2xx.
    * ``retry`` -- ``None`` (default) retries only idempotent methods (GET, HEAD, PUT,
      DELETE); ``True`` also retries POST/PATCH (the server should honour Idempotency-Key);
      ``False`` never retries.
    * ``follow_redirects`` -- off by default; when on, every hop is re-vetted.
    * ``connect_timeout_s``/``read_timeout_s`` -- may only lower the policy's timeouts.
    """

    method: HttpMethod = "GET"
    url: str = Field(min_length=1, max_length=4096)
    params: dict[str, ParamScalar | list[ParamScalar]] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: JsonValue = Field(default=None, alias="json")
    form: dict[str, str] | None = None
    auth: Auth | None = None
    expected_statuses: list[Annotated[int, Field(ge=100, le=599)]] | None = Field(
        default=None, min_length=1, max_length=50
    )
    retry: bool | None = None
    follow_redirects: bool = False
    max_redirects: int = Field(default=5, ge=0, le=10)
    connect_timeout_s: float | None = Field(default=None, gt=0, le=300)
    read_timeout_s: float | None = Field(default=None, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parse_url(value)
        except SsrfRefused as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_headers(value)

    # Fields validate in declaration order: ``method`` and ``json`` are known by ``form``.
    @field_validator("json_body")
    @classmethod
    def _json_body(cls, value: JsonValue, info: ValidationInfo) -> JsonValue:
        if value is not None and info.data.get("method") in ("GET", "HEAD"):
            raise ValueError(f"{info.data['method']} requests carry no body")
        return value

    @field_validator("form")
    @classmethod
    def _form(cls, value: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        if value is None:
            return None
        if info.data.get("json_body") is not None:
            raise ValueError("give either 'json' or 'form', not both")
        if info.data.get("method") in ("GET", "HEAD"):
            raise ValueError(f"{info.data['method']} requests carry no body")
        return value

    def secret_refs(self) -> list[tuple[str, str]]:
        """(field, environment variable name) of every secret this config references."""
        if self.auth is None:
            return []
        return [(f"auth.{_SECRET_FIELDS[self.auth.type]}", _secret_name(self.auth))]

    def target_urls(self) -> list[tuple[str, str]]:
        """(field, URL) of every URL written in this config."""
        return [("url", self.url)]

    def build(self, secrets: SecretSource) -> OutgoingRequest:
        """The request to send, with secrets read from ``secrets`` (the worker's environment,
        through the secret allowlist)."""
        headers = dict(self.headers)
        sensitive: frozenset[str] = frozenset()
        if self.auth is not None:
            name, value = auth_header(self.auth, secrets)
            headers[name] = value
            sensitive = frozenset({name.lower()})
        body: bytes | None = None
        if self.json_body is not None:
            body = encode_json(self.json_body)
            headers.setdefault("Content-Type", "application/json")
        elif self.form is not None:
            body = urlencode(self.form).encode("ascii")
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return OutgoingRequest(
            method=self.method,
            url=self.url,
            headers=tuple(headers.items()),
            params=_flatten_params(self.params),
            body=body,
            sensitive_headers=sensitive,
            expected_statuses=frozenset(self.expected_statuses or ()) or None,
            retry=self.retry,
            follow_redirects=self.follow_redirects,
            max_redirects=self.max_redirects,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
        )


def _param_text(value: ParamScalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flatten_params(
    params: Mapping[str, ParamScalar | list[ParamScalar]],
) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        pairs.extend((key, _param_text(item)) for item in values)
    return tuple(pairs)


def encode_json(value: Any) -> bytes:
    """The exact bytes sent for a JSON body (compact, UTF-8)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_SECRET_FIELDS = {"bearer": "token_env", "basic": "password_env", "api_key": "value_env"}


def _secret_name(auth: BearerAuth | BasicAuth | ApiKeyAuth) -> str:
    if isinstance(auth, BearerAuth):
        return auth.token_env
    if isinstance(auth, BasicAuth):
        return auth.password_env
    return auth.value_env


def auth_header(
    auth: BearerAuth | BasicAuth | ApiKeyAuth, secrets: SecretSource
) -> tuple[str, str]:
    """(header name, header value) for ``auth``; the value holds the secret."""
    secret = secrets.read(_secret_name(auth))
    if isinstance(auth, BearerAuth):
        return "Authorization", f"Bearer {secret}"
    if isinstance(auth, BasicAuth):
        pair = f"{auth.username}:{secret}".encode()
        return "Authorization", f"Basic {base64.b64encode(pair).decode('ascii')}"
    return auth.header, secret


@dataclass(frozen=True)
class OutgoingRequest:
    """A request ready to send: what :meth:`HttpRequestSpec.build` and channels produce.

    ``headers`` may hold secrets and ``body`` may be large: both are kept out of ``repr``.
    ``sensitive_headers`` (lower-case names) are dropped when a redirect leaves the origin.
    """

    method: HttpMethod
    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    params: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    body: bytes | None = field(default=None, repr=False)
    sensitive_headers: frozenset[str] = frozenset()
    expected_statuses: frozenset[int] | None = None
    retry: bool | None = None
    follow_redirects: bool = False
    max_redirects: int = 5
    connect_timeout_s: float | None = None
    read_timeout_s: float | None = None

    @property
    def retry_safe(self) -> bool:
        """May this request be sent again after a failure?"""
        if self.retry is not None:
            return self.retry
        return self.method in IDEMPOTENT_METHODS

    def is_expected(self, status_code: int) -> bool:
        """Does ``status_code`` count as success?"""
        if self.expected_statuses is None:
            return 200 <= status_code < 300
        return status_code in self.expected_statuses


_SPEC_ADAPTER: TypeAdapter[HttpRequestSpec] = TypeAdapter(HttpRequestSpec)


def parse_call_api_config(config: Mapping[str, Any] | HttpRequestSpec) -> HttpRequestSpec:
    """Validate a ``call_api`` action config; :class:`InvalidInput` names the bad field."""
    if isinstance(config, HttpRequestSpec):
        return config
    if not isinstance(config, Mapping):
        raise InvalidInput("must be an object", field="config")
    try:
        return _SPEC_ADAPTER.validate_python(dict(config))
    except ValidationError as exc:
        raise invalid_input(exc, tags=AUTH_TAGS, tag_field="type") from exc
