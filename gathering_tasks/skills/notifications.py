"""Send a notification through webhook, Slack, Discord, Teams, email, or a batch of them.

HTTP channels go through the :class:`~gathering_tasks.skills.http.GuardedHttpClient`, so the
SSRF rules, timeouts and caps apply to webhook URLs too, and every request carries
``Idempotency-Key``. They are POSTs that the client may repeat on 429/5xx/timeouts (delivery
is at-least-once; receivers dedupe on the key or ``webhook-id``).

Webhook signature (Standard Webhooks, https://www.standardwebhooks.com/)
-------------------------------------------------------------------------
The body is compact UTF-8 JSON::

    {"type": "notification", "id": <key>, "timestamp": <unix s>, "title": ..., "text": ...,
     "html": ... (if set), "data": {...} (if set)}

and the request carries three headers:

* ``webhook-id``: the idempotency key (identical across retries of the same notification);
* ``webhook-timestamp``: unix seconds when the request was signed;
* ``webhook-signature``: ``v1,`` + base64( HMAC-SHA256( key, f"{id}.{timestamp}.{body}" ) ).

``key`` is the secret held by the environment variable named by ``secret_env`` (a name
``GATHERING_SECRET_ENV_ALLOW`` must match; checked again before anything is sent): its UTF-8
bytes, or -- when it starts with ``whsec_`` -- the base64 decoding of the rest, as in the
Standard Webhooks libraries. A receiver recomputes the HMAC over the raw body, compares in
constant time, and rejects timestamps too far from its clock (e.g. more than 5 minutes).

Message templating: ``title``, ``text`` and ``html`` may use ``${name}`` placeholders filled
from ``context`` (``string.Template``, unknown names are left as they are; values are HTML-
escaped in ``html``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from string import Template
from typing import Any

from gathering_tasks.errors import InvalidInput, PermanentFailure, RetryableFailure
from gathering_tasks.skills._validation import SecretSource
from gathering_tasks.skills.errors import (
    HttpFailure,
    PermanentNotificationFailure,
    RetryableNotificationFailure,
)
from gathering_tasks.skills.http import GuardedHttpClient, HttpResult, RequestRecord
from gathering_tasks.skills.http_spec import OutgoingRequest, encode_json
from gathering_tasks.skills.notification_config import (
    AnyConfig,
    BatchChannel,
    ChannelConfig,
    DiscordChannel,
    EmailChannel,
    Message,
    NotificationConfig,
    SlackChannel,
    TeamsChannel,
    WebhookChannel,
    parse_notification_config,
)
from gathering_tasks.skills.smtp import SmtpSettings, send_email

__all__ = [
    "ChannelOutcome",
    "NotificationConfig",
    "NotificationOutcome",
    "SmtpSettings",
    "parse_notification_config",
    "send_notification",
    "sign_webhook",
]

log = logging.getLogger(__name__)

SLACK_MAX_CHARS = 3900
DISCORD_MAX_CHARS = 2000
_WHSEC_PREFIX = "whsec_"


@dataclass(frozen=True)
class ChannelOutcome:
    """How one channel fared. ``index`` is the position in a batch (None when alone);
    ``requests`` are the HTTP requests sent for it (none for email)."""

    channel: str
    ok: bool
    required: bool = True
    detail: str = ""
    status_code: int | None = None
    retryable: bool = False
    index: int | None = None
    requests: tuple[RequestRecord, ...] = ()

    @property
    def label(self) -> str:
        """``slack`` or, in a batch, ``slack[1]``."""
        return self.channel if self.index is None else f"{self.channel}[{self.index}]"

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the run record."""
        return {
            "channel": self.channel,
            "index": self.index,
            "ok": self.ok,
            "required": self.required,
            "detail": self.detail,
            "status_code": self.status_code,
            "retryable": self.retryable,
            "requests": [request.to_record() for request in self.requests],
        }


@dataclass(frozen=True)
class NotificationOutcome:
    """The result of :func:`send_notification`: one outcome per channel."""

    channel: str
    outcomes: tuple[ChannelOutcome, ...]

    @property
    def ok(self) -> bool:
        """True when every required channel succeeded."""
        return all(o.ok for o in self.outcomes if o.required)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the run record."""
        return {
            "channel": self.channel,
            "ok": self.ok,
            "outcomes": [o.to_record() for o in self.outcomes],
        }


# --- pure payload builders -------------------------------------------------------------------


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def render(message: Message, context: Mapping[str, object] | None) -> Message:
    """Fill ``${name}`` placeholders from ``context`` (HTML-escaped in ``html``)."""
    if not context:
        return message
    plain = {key: str(value) for key, value in context.items()}
    escaped = {key: html.escape(value) for key, value in plain.items()}
    return replace(
        message,
        title=" ".join(Template(message.title).safe_substitute(plain).splitlines()),
        text=Template(message.text).safe_substitute(plain),
        html=None if message.html is None else Template(message.html).safe_substitute(escaped),
    )


def webhook_payload(message: Message, webhook_id: str, timestamp: int) -> dict[str, Any]:
    """The JSON document a generic webhook receives."""
    payload: dict[str, Any] = {
        "type": "notification",
        "id": webhook_id,
        "timestamp": timestamp,
        "title": message.title,
        "text": message.text,
    }
    if message.html is not None:
        payload["html"] = message.html
    if message.data is not None:
        payload["data"] = dict(message.data)
    return payload


def slack_payload(message: Message) -> dict[str, Any]:
    """Slack incoming webhook body."""
    return {"text": _truncate(f"*{message.title}*\n{message.text}", SLACK_MAX_CHARS)}


def discord_payload(message: Message) -> dict[str, Any]:
    """Discord webhook body; mentions are disabled so a message cannot ping @everyone."""
    content = _truncate(f"**{message.title}**\n{message.text}", DISCORD_MAX_CHARS)
    return {"content": content, "allowed_mentions": {"parse": []}}


def teams_payload(message: Message, card_format: str) -> dict[str, Any]:
    """Teams body: an Adaptive Card message (Workflows) or a legacy MessageCard."""
    if card_format == "messagecard":
        return {
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": message.title,
            "title": message.title,
            "text": message.text,
        }
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": message.title, "weight": "Bolder", "wrap": True},
            {"type": "TextBlock", "text": message.text, "wrap": True},
        ],
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


def _signing_key(secret: str) -> bytes:
    if secret.startswith(_WHSEC_PREFIX):
        try:
            return base64.b64decode(secret[len(_WHSEC_PREFIX) :], validate=True)
        except binascii.Error:
            raise PermanentFailure("webhook secret starts with whsec_ but is not base64") from None
    return secret.encode("utf-8")


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (see the module docstring)."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _json_post(url: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> OutgoingRequest:
    return OutgoingRequest(
        method="POST",
        url=url,
        headers=(("Content-Type", "application/json"), *headers),
        body=body,
        retry=True,
    )


def build_channel_request(
    config: WebhookChannel | SlackChannel | DiscordChannel | TeamsChannel,
    message: Message,
    *,
    idempotency_key: str,
    secrets: SecretSource,
    now_s: float,
) -> OutgoingRequest:
    """The HTTP request for an HTTP channel (secrets read through ``secrets``)."""
    url = config.resolve_url(secrets)
    if isinstance(config, WebhookChannel):
        timestamp = int(now_s)
        body = encode_json(webhook_payload(message, idempotency_key, timestamp))
        signature = sign_webhook(secrets.read(config.secret_env), idempotency_key, timestamp, body)
        headers = (
            ("webhook-id", idempotency_key),
            ("webhook-timestamp", str(timestamp)),
            ("webhook-signature", signature),
        )
        return _json_post(url, body, headers)
    if isinstance(config, SlackChannel):
        return _json_post(url, encode_json(slack_payload(message)))
    if isinstance(config, DiscordChannel):
        return _json_post(url, encode_json(discord_payload(message)))
    return _json_post(url, encode_json(teams_payload(message, config.format)))


# --- the shell ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Senders:
    http: GuardedHttpClient
    smtp: SmtpSettings
    secrets: SecretSource
    clock: Callable[[], float]
    context: Mapping[str, object] | None


def _send_one(
    config: ChannelConfig,
    parent: BatchChannel | None,
    key: str,
    senders: _Senders,
    index: int | None = None,
) -> ChannelOutcome:
    message = render(config.message(parent), senders.context)
    if isinstance(config, EmailChannel):
        detail = send_email(message, config.to, senders.smtp, key, senders.clock())
        outcome = ChannelOutcome(config.channel, True, config.required, detail, index=index)
    else:
        request = build_channel_request(
            config, message, idempotency_key=key, secrets=senders.secrets, now_s=senders.clock()
        )
        result: HttpResult = senders.http.send(request, idempotency_key=key)
        detail = f"HTTP {result.status_code} after {result.attempts} request(s)"
        outcome = ChannelOutcome(
            config.channel,
            True,
            config.required,
            detail,
            result.status_code,
            index=index,
            requests=result.requests,
        )
    log.info(
        "notification sent",
        extra={"channel": config.channel, "batch_index": index, "idempotency_key": key},
    )
    return outcome


def _failed(
    config: ChannelConfig, index: int, exc: PermanentFailure | RetryableFailure
) -> ChannelOutcome:
    log.warning(
        "notification channel failed: %s",
        exc,
        extra={"channel": config.channel, "batch_index": index, "required": config.required},
    )
    return ChannelOutcome(
        channel=config.channel,
        ok=False,
        required=config.required,
        detail=str(exc),
        status_code=getattr(exc, "status_code", None),
        retryable=isinstance(exc, RetryableFailure),
        index=index,
        requests=exc.requests if isinstance(exc, HttpFailure) else (),
    )


def _send_batch(batch: BatchChannel, key: str, senders: _Senders) -> NotificationOutcome:
    outcomes: list[ChannelOutcome] = []
    for index, child in enumerate(batch.channels):
        # Distinct keys: two children may post to the same receiver, which dedupes on the key.
        child_key = f"{key}:{index}"
        try:
            outcomes.append(_send_one(child, batch, child_key, senders, index))
        except (PermanentFailure, RetryableFailure) as exc:
            outcomes.append(_failed(child, index, exc))
    result = NotificationOutcome("batch", tuple(outcomes))
    if result.ok:
        return result
    failed = [o for o in result.outcomes if o.required and not o.ok]
    if all(o.retryable for o in failed):
        raise RetryableNotificationFailure(result.outcomes)
    raise PermanentNotificationFailure(result.outcomes)


def send_notification(
    config: AnyConfig | Mapping[str, Any],
    *,
    http: GuardedHttpClient,
    smtp: SmtpSettings,
    idempotency_key: str,
    context: Mapping[str, object] | None = None,
    env: Mapping[str, str] = os.environ,
    clock: Callable[[], float] = time.time,
) -> NotificationOutcome:
    """Validate ``config`` and send it; one outcome per channel.

    A single channel's failure propagates as raised (permanent or retryable, see
    :mod:`gathering_tasks.skills.errors`); a batch raises
    :class:`~gathering_tasks.skills.errors.NotificationFailed` carrying every outcome when a
    required channel failed. ``clock`` gives epoch seconds (webhook timestamps, email Date).
    Secrets are read from ``env`` through the client policy's secret allowlist.
    """
    if not idempotency_key:
        raise InvalidInput("must not be empty", field="idempotency_key")
    parsed = parse_notification_config(config)
    secrets = SecretSource(env, http.policy.secrets)
    senders = _Senders(http, smtp, secrets, clock, context)
    if isinstance(parsed, BatchChannel):
        return _send_batch(parsed, idempotency_key, senders)
    outcome = _send_one(parsed, None, idempotency_key, senders)
    return NotificationOutcome(parsed.channel, (outcome,))
