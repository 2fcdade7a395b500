"""What ``call_api`` and ``send_notification`` actions are refused at creation, by settings.

Two rules need the deployment's settings, so :func:`validate_action` applies them after the
schema: a URL whose host is a literal forbidden address (or a ``localhost`` name) is refused
with the reason the worker would give, unless the allowlist opens it; and a secret may only be
referenced by an environment variable name that ``GATHERING_SECRET_ENV_ALLOW`` matches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from gathering_tasks.actions import validate_action
from gathering_tasks.errors import InvalidInput
from gathering_tasks.settings import Settings, get_settings

NOW = datetime(2030, 1, 1, tzinfo=UTC)
Configure = Callable[..., None]


@pytest.fixture
def process_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Set this process's ``GATHERING_*`` environment (and nothing else of it)."""

    def configure(**env: str) -> None:
        for name in list(os.environ):
            if name.startswith("GATHERING_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    configure()
    yield configure
    get_settings.cache_clear()


def action(action_type: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "x",
        "action_type": action_type,
        "config": config,
        "schedule": {"kind": "interval", "every_s": 60},
    }


def validate(data: dict[str, Any], settings: Settings | None = None) -> None:
    """Validate as the API does; without ``settings``, the process's settings apply."""
    explicit: dict[str, Any] = {} if settings is None else {"settings": settings}
    validate_action(
        data, now=NOW, max_config_bytes=64 * 1024, task_allowed=lambda _n: True, **explicit
    )


def slack(url: str) -> dict[str, Any]:
    return {"channel": "slack", "url": url, "title": "t", "text": "x"}


# --- literal forbidden targets -------------------------------------------------------------

LITERAL_TARGETS = [
    ("call_api", {"url": "http://169.254.169.254/latest/meta-data/"}, "url", "cloud-metadata"),
    ("call_api", {"url": "http://0xa9fea9fe/"}, "url", "cloud-metadata"),
    ("call_api", {"url": "http://[fd00:ec2::254]/"}, "url", "cloud-metadata"),
    ("call_api", {"url": "http://localhost:8080/"}, "url", "localhost-name"),
    ("call_api", {"url": "http://app.localhost/"}, "url", "localhost-name"),
    ("call_api", {"url": "http://[::1]/"}, "url", "loopback"),
    ("call_api", {"url": "http://2130706433/"}, "url", "loopback"),
    ("call_api", {"url": "http://10.0.0.1/"}, "url", "private"),
    ("call_api", {"url": "http://[::ffff:0:7f00:1]/"}, "url", "loopback"),
    ("call_api", {"url": "http://127.0.0.1../"}, "url", "invalid-host"),
    ("send_notification", slack("http://169.254.169.254/"), "url", "cloud-metadata"),
    (
        "send_notification",
        {
            "channel": "batch",
            "title": "t",
            "text": "x",
            "channels": [
                {"channel": "email", "to": ["ops@example.com"]},
                {"channel": "webhook", "url": "http://[::1]:9/", "secret_env": "HOOK_KEY"},
            ],
        },
        "channels.1.url",
        "loopback",
    ),
]


@pytest.mark.parametrize(("action_type", "config", "field", "reason"), LITERAL_TARGETS)
def test_literal_forbidden_target_is_refused_at_creation(
    process_settings: Configure, action_type: str, config: dict[str, Any], field: str, reason: str
) -> None:
    # Given the default settings (nothing allowlisted; HOOK_* secrets allowed for the batch)
    process_settings(GATHERING_SECRET_ENV_ALLOW="HOOK_*")

    # When an action calling a literal forbidden address is validated
    with pytest.raises(InvalidInput) as caught:
        validate(action(action_type, config))

    # Then it is refused at the door, naming the field and the worker's reason
    assert caught.value.field == f"config.{field}"
    assert f"({reason})" in caught.value.reason


def test_names_and_public_addresses_are_judged_when_the_run_resolves_them(
    process_settings: Configure,
) -> None:
    for url in ("https://api.example.com/v1", "http://93.184.216.34/", "http://sink.test/"):
        validate(action("call_api", {"url": url}))
        validate(action("send_notification", slack(url)))


def test_allowlisted_literal_is_accepted_at_creation(process_settings: Configure) -> None:
    # Given loopback opened on one port
    process_settings(GATHERING_HTTP_ALLOW_NETWORKS="127.0.0.1:8080")

    # Then that port is accepted, and another port on it is refused for its port
    validate(action("call_api", {"url": "http://127.0.0.1:8080/hook"}))
    with pytest.raises(InvalidInput) as caught:
        validate(action("call_api", {"url": "http://127.0.0.1:6379/"}))
    assert "(port-not-allowlisted)" in caught.value.reason


def test_metadata_is_refused_at_creation_under_an_allowlist_of_everything(
    process_settings: Configure,
) -> None:
    process_settings(GATHERING_HTTP_ALLOW_NETWORKS="0.0.0.0/0,::/0")
    validate(action("call_api", {"url": "http://10.0.0.1/"}))
    with pytest.raises(InvalidInput) as caught:
        validate(action("call_api", {"url": "http://169.254.169.254/"}))
    assert caught.value.field == "config.url"
    assert "(cloud-metadata)" in caught.value.reason


def test_explicit_settings_are_used_over_the_process_settings(
    process_settings: Configure,
) -> None:
    settings = Settings(http_allow_networks=["127.0.0.1/32"])
    validate(action("call_api", {"url": "http://127.0.0.1:9/"}), settings)
    with pytest.raises(InvalidInput):
        validate(action("call_api", {"url": "http://127.0.0.1:9/"}))


def test_refusal_quoting_a_long_url_is_bounded(process_settings: Configure) -> None:
    url = "http://" + "a" * 4000 + "/"
    with pytest.raises(InvalidInput) as caught:
        validate(action("call_api", {"url": url}))
    assert len(str(caught.value)) <= 400


# --- secrets by reference ------------------------------------------------------------------

SECRET_REFERENCES = [
    (
        "call_api",
        {"auth": {"type": "bearer", "token_env": "AWS_SECRET_ACCESS_KEY"}},
        "auth.token_env",
    ),
    (
        "call_api",
        {"auth": {"type": "basic", "username": "u", "password_env": "DATABASE_PASSWORD"}},
        "auth.password_env",
    ),
    ("call_api", {"auth": {"type": "api_key", "value_env": "HOME"}}, "auth.value_env"),
    ("webhook", {"secret_env": "AWS_SECRET_ACCESS_KEY"}, "secret_env"),
    ("slack", {"url": "env:AWS_SECRET_ACCESS_KEY"}, "url"),
    ("batch-webhook", {"secret_env": "AWS_SESSION_TOKEN"}, "channels.1.secret_env"),
    ("batch-slack", {"url": "env:PATH"}, "channels.1.url"),
]


def referencing(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    """An action whose only questionable part is ``extra``."""
    hook = {"channel": "webhook", "url": "https://hooks.example.com/in", "secret_env": "HOOK_KEY"}
    if kind == "call_api":
        return action("call_api", {"url": "https://api.example.com/", **extra})
    if kind == "webhook":
        return action("send_notification", {**hook, "title": "t", "text": "x", **extra})
    if kind == "slack":
        return action("send_notification", {**slack("https://hooks.slack.com/x"), **extra})
    child = {**hook, **extra} if kind == "batch-webhook" else {"channel": "slack", **extra}
    batch = {"channel": "batch", "title": "t", "text": "x", "channels": [hook, child]}
    return action("send_notification", batch)


@pytest.mark.parametrize(("kind", "extra", "field"), SECRET_REFERENCES)
def test_secret_outside_the_allowlist_is_refused_at_creation(
    process_settings: Configure, kind: str, extra: dict[str, Any], field: str
) -> None:
    # Given secrets allowed for names HOOK_* and SLACK_* only
    process_settings(GATHERING_SECRET_ENV_ALLOW="HOOK_*,SLACK_*")

    # When an action references another variable of the worker's environment
    with pytest.raises(InvalidInput) as caught:
        validate(referencing(kind, extra))

    # Then it is refused, naming the field and the setting that would allow it
    assert caught.value.field == f"config.{field}"
    assert "GATHERING_SECRET_ENV_ALLOW" in caught.value.reason


@pytest.mark.parametrize(("kind", "extra", "field"), SECRET_REFERENCES)
def test_no_secret_may_be_referenced_by_default(
    process_settings: Configure, kind: str, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate(referencing(kind, extra))
    assert caught.value.field is not None and caught.value.field.startswith("config.")


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("call_api", {"auth": {"type": "bearer", "token_env": "HOOK_API_TOKEN"}}),
        ("webhook", {"secret_env": "HOOK_SIGNING"}),
        ("slack", {"url": "env:SLACK_WEBHOOK_URL"}),
        ("batch-slack", {"url": "env:SLACK_OPS"}),
    ],
)
def test_secret_matching_the_allowlist_is_accepted(
    process_settings: Configure, kind: str, extra: dict[str, Any]
) -> None:
    process_settings(GATHERING_SECRET_ENV_ALLOW="HOOK_*,SLACK_*")
    validate(referencing(kind, extra))


@pytest.mark.parametrize("patterns", [["*"], ["?*"], ["GATHERING_*"], ["HOOK-*"], [""]])
def test_secret_allowlist_patterns_must_name_something(patterns: list[str]) -> None:
    with pytest.raises(ValueError, match="secret_env_allow"):
        Settings(secret_env_allow=patterns)


def test_reserved_names_stay_refused_whatever_the_pattern() -> None:
    settings = Settings(secret_env_allow=["G*"])
    with pytest.raises(InvalidInput) as caught:
        validate(referencing("webhook", {"secret_env": "GATHERING_DATABASE_URL"}), settings)
    assert caught.value.field == "config.secret_env"


# --- the settings refuse a bad allowlist at start ------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"http_allow_networks": ["10.0.0.0/8:0"]}, "http_allow_networks"),
        ({"http_allow_hosts": ["api..internal"]}, "http_allow_hosts"),
        (
            {"http_allow_metadata_address_i_know_this_is_dangerous": "10.0.0.1"},
            "http_allow_metadata_address_i_know_this_is_dangerous",
        ),
    ],
)
def test_bad_allowlist_settings_stop_the_process(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**changes)


def test_allowlist_entries_with_ports_are_read_from_the_environment(
    process_settings: Configure,
) -> None:
    process_settings(
        GATHERING_HTTP_ALLOW_NETWORKS="[::1]:8080,10.0.0.0/8:80-443",
        GATHERING_HTTP_ALLOW_HOSTS="api.internal:443",
        GATHERING_SECRET_ENV_ALLOW="HOOK_*, SLACK_*",
    )
    settings = get_settings()
    assert settings.http_allow_networks == ["[::1]:8080", "10.0.0.0/8:80-443"]
    assert settings.http_allow_hosts == ["api.internal:443"]
    assert settings.secret_env_allow == ["HOOK_*", "SLACK_*"]
