"""The task layer's entry points into the skills: build policies from settings, run, record.

This is the only skills module that reads the global settings (when none are passed); the
skills themselves take their policy objects as arguments. Results are JSON-ready dicts for
the run record. A config that no longer validates fails the run permanently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.settings import Settings, get_settings
from gathering_tasks.skills.http import GuardedHttpClient, HttpPolicy
from gathering_tasks.skills.http_spec import parse_call_api_config
from gathering_tasks.skills.notification_config import AnyConfig, parse_notification_config
from gathering_tasks.skills.notifications import send_notification as _send_notification
from gathering_tasks.skills.smtp import SmtpSettings


def _client(settings: Settings, client: GuardedHttpClient | None) -> GuardedHttpClient:
    return client if client is not None else GuardedHttpClient(HttpPolicy.from_settings(settings))


def call_api(
    config: Mapping[str, Any],
    idempotency_key: str,
    *,
    settings: Settings | None = None,
    client: GuardedHttpClient | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run a ``call_api`` config; returns :meth:`HttpResult.to_record`."""
    try:
        spec = parse_call_api_config(config)
    except InvalidInput as exc:
        raise PermanentFailure(f"invalid call_api config: {exc}") from exc
    http = _client(settings or get_settings(), client)
    return http.call(spec, idempotency_key=idempotency_key, env=env).to_record()


def send_notification(
    config: Mapping[str, Any],
    idempotency_key: str,
    *,
    settings: Settings | None = None,
    client: GuardedHttpClient | None = None,
    env: Mapping[str, str] | None = None,
    context: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """Send a ``send_notification`` config; returns :meth:`NotificationOutcome.to_record`."""
    try:
        parsed: AnyConfig = parse_notification_config(config)
    except InvalidInput as exc:
        raise PermanentFailure(f"invalid send_notification config: {exc}") from exc
    resolved = settings or get_settings()
    outcome = _send_notification(
        parsed,
        http=_client(resolved, client),
        smtp=SmtpSettings.from_settings(resolved),
        idempotency_key=idempotency_key,
        context=context,
        env=os.environ if env is None else env,
    )
    return outcome.to_record()
