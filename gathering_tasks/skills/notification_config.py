"""The ``send_notification`` action config: one channel, or a batch of channels.

A config names its ``channel`` and carries the message (``title``, ``text``, optional
``html`` and ``data``)::

    {"channel": "slack", "url": "env:SLACK_WEBHOOK_URL", "title": "Export done",
     "text": "Run ${run_id} finished"}

    {"channel": "batch", "title": "Export done", "text": "...",
     "channels": [
        {"channel": "webhook", "url": "https://hooks.example.com/in", "secret_env": "HOOK_KEY"},
        {"channel": "email", "to": ["ops@example.com"], "required": false}]}

* ``url`` is an http(s) URL, or ``env:NAME`` to read it from the worker's environment (chat
  webhook URLs embed their token: keep them out of configs). SSRF rules apply at send time,
  and a literal forbidden address is refused at creation already (see :mod:`.admission`).
* ``webhook`` needs ``secret_env``, the environment variable holding the signing secret.
* ``env:NAME`` and ``secret_env`` may only name variables ``GATHERING_SECRET_ENV_ALLOW``
  matches (see :mod:`._validation`), checked at creation and again when sending.
* ``email`` sends to ``to`` through the SMTP server of the settings.
* ``batch`` children inherit the batch's message fields unless they set their own; each has
  ``required`` (default true). Batches do not nest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills._validation import (
    EnvName,
    SecretSource,
    check_env_name,
    has_line_break,
    invalid_input,
)
from gathering_tasks.skills.errors import SsrfRefused, bounded
from gathering_tasks.skills.urls import parse_url

ENV_PREFIX = "env:"
MAX_TITLE_CHARS = 256
MAX_TEXT_CHARS = 20_000
MAX_HTML_CHARS = 200_000

# Deliberately conservative: a dotted domain, no quoting, no display names.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
    r"@(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


@dataclass(frozen=True)
class Message:
    """What is sent, whatever the channel."""

    title: str
    text: str
    html: str | None = None
    data: Mapping[str, Any] | None = None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Channel(_Strict):
    """Message fields (optional in batch children, which inherit them) and ``required``."""

    title: str | None = Field(default=None, min_length=1, max_length=MAX_TITLE_CHARS)
    text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    html: str | None = Field(default=None, min_length=1, max_length=MAX_HTML_CHARS)
    data: dict[str, JsonValue] | None = None
    required: bool = True

    @field_validator("title")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and has_line_break(value):
            raise ValueError("must be a single line")
        return value

    def missing_field(self, parent: _Channel | None = None) -> str | None:
        """``"title"`` or ``"text"`` when neither this config nor ``parent`` sets it."""
        for name in ("title", "text"):
            if getattr(self, name) is None and (parent is None or getattr(parent, name) is None):
                return name
        return None

    def secret_refs(self) -> list[tuple[str, str]]:
        """(field, environment variable name) of every secret this channel references."""
        return []

    def target_urls(self) -> list[tuple[str, str]]:
        """(field, URL) of every URL written (not read from the environment) in this config."""
        return []

    def message(self, parent: _Channel | None = None) -> Message:
        """This config's message, completed from ``parent`` (the batch) where unset."""
        missing = self.missing_field(parent)
        if missing is not None:
            raise InvalidInput("field required", field=missing)
        base = parent or self
        return Message(
            title=self.title or base.title or "",
            text=self.text or base.text or "",
            html=self.html if self.html is not None else base.html,
            data=self.data if self.data is not None else base.data,
        )


def _check_url(value: str) -> str:
    if value.startswith(ENV_PREFIX):
        check_env_name(value[len(ENV_PREFIX) :])
        return value
    try:
        parse_url(value)
    except SsrfRefused as exc:
        raise ValueError(f"{exc} (or use env:NAME)") from None
    return value


class _UrlChannel(_Channel):
    url: str = Field(min_length=1, max_length=4096)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)

    def resolve_url(self, secrets: SecretSource) -> str:
        """The URL, read from the environment when given as ``env:NAME``."""
        if self.url.startswith(ENV_PREFIX):
            return secrets.read(self.url[len(ENV_PREFIX) :])
        return self.url

    def secret_refs(self) -> list[tuple[str, str]]:
        """``url`` when it is ``env:NAME`` (a chat webhook URL embeds its token)."""
        if self.url.startswith(ENV_PREFIX):
            return [("url", self.url[len(ENV_PREFIX) :])]
        return []

    def target_urls(self) -> list[tuple[str, str]]:
        """``url`` unless it is read from the environment."""
        return [] if self.url.startswith(ENV_PREFIX) else [("url", self.url)]


class WebhookChannel(_UrlChannel):
    """Generic signed JSON webhook (see :mod:`gathering_tasks.skills.notifications`)."""

    channel: Literal["webhook"]
    secret_env: EnvName

    def secret_refs(self) -> list[tuple[str, str]]:
        """The URL's reference (if any) and ``secret_env``."""
        return [*super().secret_refs(), ("secret_env", self.secret_env)]


class SlackChannel(_UrlChannel):
    """Slack incoming webhook: ``{"text": ...}``."""

    channel: Literal["slack"]


class DiscordChannel(_UrlChannel):
    """Discord webhook: ``{"content": ...}`` with mentions disabled."""

    channel: Literal["discord"]


class TeamsChannel(_UrlChannel):
    """Microsoft Teams: an Adaptive Card (Workflows) or a legacy MessageCard."""

    channel: Literal["teams"]
    format: Literal["adaptive", "messagecard"] = "adaptive"


def _check_address(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError(f"not an email address: {bounded(value)!r}")
    return value


EmailAddress = Annotated[str, Field(max_length=320), AfterValidator(_check_address)]


class EmailChannel(_Channel):
    """Email through the configured SMTP server; ``title`` is the subject."""

    channel: Literal["email"]
    to: list[EmailAddress] = Field(min_length=1, max_length=50)


ChildConfig = Annotated[
    WebhookChannel | SlackChannel | DiscordChannel | TeamsChannel | EmailChannel,
    Field(discriminator="channel"),
]


class BatchChannel(_Channel):
    """Several channels, one message; fails when a ``required`` child fails."""

    channel: Literal["batch"]
    channels: list[ChildConfig] = Field(min_length=1, max_length=10)

    def secret_refs(self) -> list[tuple[str, str]]:
        """Every child's references, as ``channels.<index>.<field>``."""
        return [
            (f"channels.{index}.{field}", name)
            for index, child in enumerate(self.channels)
            for field, name in child.secret_refs()
        ]

    def target_urls(self) -> list[tuple[str, str]]:
        """Every child's written URLs, as ``channels.<index>.url``."""
        return [
            (f"channels.{index}.{field}", url)
            for index, child in enumerate(self.channels)
            for field, url in child.target_urls()
        ]


NotificationConfig = Annotated[
    WebhookChannel | SlackChannel | DiscordChannel | TeamsChannel | EmailChannel | BatchChannel,
    Field(discriminator="channel"),
]
ChannelConfig = WebhookChannel | SlackChannel | DiscordChannel | TeamsChannel | EmailChannel
AnyConfig = ChannelConfig | BatchChannel
CHANNEL_TAGS = frozenset({"webhook", "slack", "discord", "teams", "email", "batch"})

_ADAPTER: TypeAdapter[AnyConfig] = TypeAdapter(NotificationConfig)


def check_messages(config: AnyConfig) -> None:
    """Every channel that will send must end up with a title and a text."""
    if not isinstance(config, BatchChannel):
        missing = config.missing_field()
        if missing is not None:
            raise InvalidInput("field required", field=missing)
        return
    for index, child in enumerate(config.channels):
        missing = child.missing_field(config)
        if missing is not None:
            raise InvalidInput("field required", field=f"channels.{index}.{missing}")


def parse_notification_config(config: Mapping[str, Any] | AnyConfig) -> AnyConfig:
    """Validate a ``send_notification`` config; :class:`InvalidInput` names the bad field."""
    if isinstance(config, BaseModel):
        check_messages(config)
        return config
    if not isinstance(config, Mapping):
        raise InvalidInput("must be an object", field="config")
    try:
        parsed = _ADAPTER.validate_python(dict(config))
    except ValidationError as exc:
        raise invalid_input(exc, tags=CHANNEL_TAGS, tag_field="channel") from exc
    check_messages(parsed)
    return parsed
