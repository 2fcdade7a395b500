"""Notification channels against real local receivers: an HTTP server and an SMTP server."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.settings import Settings
from gathering_tasks.skills import executors
from gathering_tasks.skills.errors import (
    NotificationFailed,
    PermanentNotificationFailure,
    PermanentSmtpFailure,
    RetryableHttpStatus,
    RetryableNotificationFailure,
    SecretNotAvailable,
    SmtpNotConfigured,
    SsrfRefused,
)
from gathering_tasks.skills.http import GuardedHttpClient, HttpPolicy
from gathering_tasks.skills.notifications import (
    SmtpSettings,
    parse_notification_config,
    send_notification,
)
from tests.servers import free_port, self_signed_cert

KEY = "run-7"
NOW_S = 1_800_000_000
HOOK_SECRET = "hook-signing-secret-123"
SMTP_PASSWORD = "smtp-Pa55word-xyz"
ENV = {"HOOK_SECRET": HOOK_SECRET, "SLACK_URL_SECRET": ""}
NO_SMTP = SmtpSettings(host=None)
SECRET_NAMES = ("HOOK_*", "SLACK_*", "ABSENT_*")


# --- receivers -------------------------------------------------------------------------------


def http_client(networks: Sequence[str] = ("127.0.0.1/32",)) -> GuardedHttpClient:
    sleeps: list[float] = []
    policy = HttpPolicy.allowing(networks, secret_env_allow=SECRET_NAMES, max_attempts=3)
    return GuardedHttpClient(policy, sleep=sleeps.append)


def notify(config: dict[str, Any], **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "http": http_client(),
        "smtp": NO_SMTP,
        "idempotency_key": KEY,
        "env": ENV,
        "clock": lambda: float(NOW_S),
    }
    return send_notification(config, **{**options, **kwargs})


def received_json(server: HTTPServer) -> list[Any]:
    return [json.loads(request.get_data()) for request, _ in server.log]


def verify_standard_webhook(
    secret: str, headers: dict[str, str], body: bytes, now_s: int, tolerance_s: int = 300
) -> bool:
    """A receiver written from the documented algorithm, independent of the sender's code."""
    webhook_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    if abs(now_s - int(timestamp)) > tolerance_s:
        return False
    key = (
        base64.b64decode(secret.removeprefix("whsec_"))
        if secret.startswith("whsec_")
        else secret.encode("utf-8")
    )
    signed = webhook_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in headers["webhook-signature"].split(" ")
    )


# --- webhook ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret", [HOOK_SECRET, "whsec_" + base64.b64encode(b"\x01\x02binary-key\xff").decode()]
)
def test_webhook_is_signed_as_documented(server: HTTPServer, secret: str) -> None:
    # Given a receiver that verifies signatures the documented way
    verdicts: list[bool] = []

    def receiver(request: Request) -> Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        ok = verify_standard_webhook(secret, headers, request.get_data(), NOW_S)
        verdicts.append(ok)
        return Response("", status=204 if ok else 401)

    server.expect_request("/hook", method="POST").respond_with_handler(receiver)

    # When a webhook notification is sent
    outcome = notify(
        {
            "channel": "webhook",
            "url": server.url_for("/hook"),
            "secret_env": "HOOK_SECRET",
            "title": "Export done",
            "text": "Run ${run_id} finished",
            "data": {"rows": 12},
        },
        env={"HOOK_SECRET": secret},
        context={"run_id": 7},
    )

    # Then the receiver accepted the signature, and the payload and headers are as documented
    assert verdicts == [True]
    assert outcome.ok
    assert outcome.outcomes[0].status_code == 204
    request = server.log[0][0]
    assert request.headers["webhook-id"] == KEY
    assert request.headers["Idempotency-Key"] == KEY
    assert request.headers["webhook-timestamp"] == str(NOW_S)
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.get_data()) == {
        "type": "notification",
        "id": KEY,
        "timestamp": NOW_S,
        "title": "Export done",
        "text": "Run 7 finished",
        "data": {"rows": 12},
    }
    # and the independent verifier really checks something
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert not verify_standard_webhook(secret, headers, request.get_data() + b" ", NOW_S)
    assert not verify_standard_webhook("wrong", headers, request.get_data(), NOW_S)
    assert not verify_standard_webhook(secret, headers, request.get_data(), NOW_S + 3600)


def test_webhook_secret_never_reaches_the_logs(
    server: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.expect_request("/hook").respond_with_data("", status=500)
    with pytest.raises(RetryableHttpStatus, match="HTTP 500"):
        notify(
            {
                "channel": "webhook",
                "url": server.url_for("/hook"),
                "secret_env": "HOOK_SECRET",
                "title": "t",
                "text": "x",
            }
        )
    assert len(server.log) == 3  # POSTs of notifications are retried: they carry the key
    assert HOOK_SECRET not in caplog.text


def test_webhook_without_its_secret_in_the_environment_fails_before_sending(
    server: HTTPServer,
) -> None:
    config = {
        "channel": "webhook",
        "url": server.url_for("/hook"),
        "secret_env": "ABSENT_SECRET",
        "title": "t",
        "text": "x",
    }
    with pytest.raises(SecretNotAvailable):
        notify(config)
    assert server.log == []


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]/"]
)
def test_ssrf_rules_apply_to_webhook_urls(url: str) -> None:
    config = {"channel": "slack", "url": url, "title": "t", "text": "x"}
    parse_notification_config(config)  # a literal address is judged when sending
    with pytest.raises(SsrfRefused):
        notify(config)


def test_loopback_receiver_is_refused_when_not_allowlisted(server: HTTPServer) -> None:
    config = {"channel": "discord", "url": server.url_for("/d"), "title": "t", "text": "x"}
    with pytest.raises(SsrfRefused, match="loopback"):
        notify(config, http=http_client(networks=()))
    assert server.log == []


# --- chat channels ---------------------------------------------------------------------------


def test_slack_payload(server: HTTPServer) -> None:
    server.expect_request("/slack", method="POST").respond_with_data("ok")
    notify({"channel": "slack", "url": server.url_for("/slack"), "title": "T", "text": "body"})
    assert received_json(server) == [{"text": "*T*\nbody"}]
    assert server.log[0][0].headers["Idempotency-Key"] == KEY


def test_slack_url_can_come_from_the_environment(server: HTTPServer) -> None:
    server.expect_request("/services/T0/B0/secret-token").respond_with_data("ok")
    env = {"SLACK_WEBHOOK_URL": server.url_for("/services/T0/B0/secret-token")}
    outcome = notify(
        {"channel": "slack", "url": "env:SLACK_WEBHOOK_URL", "title": "T", "text": "b"}, env=env
    )
    assert outcome.ok
    assert "secret-token" not in json.dumps(outcome.to_record())


def test_discord_payload(server: HTTPServer) -> None:
    server.expect_request("/discord").respond_with_data("", status=204)
    notify({"channel": "discord", "url": server.url_for("/discord"), "title": "T", "text": "b"})
    assert received_json(server) == [{"content": "**T**\nb", "allowed_mentions": {"parse": []}}]


def test_teams_adaptive_card_payload(server: HTTPServer) -> None:
    server.expect_request("/teams").respond_with_data("", status=202)
    notify({"channel": "teams", "url": server.url_for("/teams"), "title": "T", "text": "b"})
    (payload,) = received_json(server)
    assert payload["type"] == "message"
    (attachment,) = payload["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard"
    assert [block["text"] for block in card["body"]] == ["T", "b"]


def test_teams_message_card_payload(server: HTTPServer) -> None:
    server.expect_request("/teams").respond_with_data("1")
    notify(
        {
            "channel": "teams",
            "url": server.url_for("/teams"),
            "format": "messagecard",
            "title": "T",
            "text": "b",
        }
    )
    (payload,) = received_json(server)
    assert payload["@type"] == "MessageCard"
    assert (payload["title"], payload["text"], payload["summary"]) == ("T", "b", "T")


# --- email -----------------------------------------------------------------------------------


@dataclass
class Inbox:
    """An aiosmtpd handler keeping what it receives."""

    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


def _authenticator(
    _server: Any, _session: Any, _envelope: Any, _mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        b"mailer",
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Controller, Inbox]]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("smtp-tls")
    return self_signed_cert(directory, "127.0.0.1", "IP:127.0.0.1")


@pytest.fixture
def starttls_server(tls_files: tuple[Path, Path]) -> Iterator[tuple[Controller, Inbox]]:
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    inbox = Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=_authenticator,
    )
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


EMAIL_CONFIG: dict[str, Any] = {
    "channel": "email",
    "to": ["ops@example.com", "dev@example.org"],
    "title": "Nightly export",
    "text": "Plain body for ${run_id}",
    "html": "<p>HTML body for <b>${run_id}</b></p>",
}


def test_email_with_plain_text_and_html_parts(smtp_server: tuple[Controller, Inbox]) -> None:
    # Given a local SMTP server without TLS
    controller, inbox = smtp_server
    smtp = SmtpSettings(
        host="127.0.0.1", port=controller.port, security="none", from_address="bot@example.net"
    )

    # When the email channel sends
    outcome = notify(EMAIL_CONFIG, smtp=smtp, context={"run_id": "<7>"})

    # Then one message arrived with both parts, for both recipients
    assert outcome.ok
    (message,) = inbox.messages
    assert inbox.recipients == [["ops@example.com", "dev@example.org"]]
    assert message["Subject"] == "Nightly export"
    assert message["From"] == "bot@example.net"
    assert message["Message-ID"].endswith("@example.net>")
    plain = message.get_body(("plain",))
    rich = message.get_body(("html",))
    assert plain is not None
    assert rich is not None
    assert plain.get_content().strip() == "Plain body for <7>"
    assert rich.get_content().strip() == "<p>HTML body for <b>&lt;7&gt;</b></p>"


def test_email_message_id_is_stable_across_attempts(smtp_server: tuple[Controller, Inbox]) -> None:
    controller, inbox = smtp_server
    smtp = SmtpSettings(host="127.0.0.1", port=controller.port, security="none")
    notify(EMAIL_CONFIG, smtp=smtp)
    notify(EMAIL_CONFIG, smtp=smtp)
    notify(EMAIL_CONFIG, smtp=smtp, idempotency_key="run-8")
    ids = [m["Message-ID"] for m in inbox.messages]
    assert ids[0] == ids[1] != ids[2]


def test_email_over_starttls_with_login(
    starttls_server: tuple[Controller, Inbox],
    tls_files: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a server that requires STARTTLS and AUTH, trusting its certificate
    caplog.set_level(logging.DEBUG)
    controller, inbox = starttls_server
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=controller.port,
        security="starttls",
        username="mailer",
        password=SecretStr(SMTP_PASSWORD),
        ca_bundle=str(tls_files[0]),
    )

    # When sending
    outcome = notify({**EMAIL_CONFIG, "html": None}, smtp=smtp)

    # Then it was accepted, text only, and the password appears nowhere
    assert outcome.ok
    (message,) = inbox.messages
    assert message.get_body(("html",)) is None
    assert SMTP_PASSWORD not in caplog.text
    assert SMTP_PASSWORD not in repr(smtp)


def test_email_with_wrong_password_fails_permanently(
    starttls_server: tuple[Controller, Inbox], tls_files: tuple[Path, Path]
) -> None:
    controller, inbox = starttls_server
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=controller.port,
        username="mailer",
        password=SecretStr("wrong"),
        ca_bundle=str(tls_files[0]),
    )
    with pytest.raises(PermanentSmtpFailure, match="authentication failed"):
        notify(EMAIL_CONFIG, smtp=smtp)
    assert inbox.messages == []


def test_email_without_smtp_host_is_not_configured() -> None:
    with pytest.raises(SmtpNotConfigured):
        notify(EMAIL_CONFIG)


# --- batch -----------------------------------------------------------------------------------


def test_batch_with_a_failing_required_channel_fails_with_every_outcome(
    server: HTTPServer,
) -> None:
    # Given a batch whose required Slack receiver answers 404 and Discord works
    server.expect_request("/slack").respond_with_data("no such hook", status=404)
    server.expect_request("/discord").respond_with_data("", status=204)
    config = {
        "channel": "batch",
        "title": "T",
        "text": "b",
        "channels": [
            {"channel": "slack", "url": server.url_for("/slack")},
            {"channel": "discord", "url": server.url_for("/discord"), "text": "own text"},
        ],
    }

    # When sent
    with pytest.raises(PermanentNotificationFailure) as caught:
        notify(config)

    # Then the failure reports both channels, and Discord was still sent
    failed, sent = caught.value.outcomes
    assert (failed.label, failed.ok, failed.required, failed.status_code) == (
        "slack[0]",
        False,
        True,
        404,
    )
    assert (sent.label, sent.ok) == ("discord[1]", True)
    assert "slack[0]" in str(caught.value)
    assert failed.detail == "HTTP 404 from 127.0.0.1"
    assert json.loads(json.dumps(caught.value.record()))["outcomes"][0]["channel"] == "slack"
    assert received_json(server)[1]["content"] == "**T**\nown text"
    keys = [request.headers["Idempotency-Key"] for request, _ in server.log]
    assert keys == [f"{KEY}:0", f"{KEY}:1"]


def test_batch_failing_only_retryably_is_retryable(server: HTTPServer) -> None:
    server.expect_request("/slack").respond_with_data("down", status=503)
    config = {
        "channel": "batch",
        "title": "T",
        "text": "b",
        "channels": [{"channel": "slack", "url": server.url_for("/slack")}],
    }
    with pytest.raises(RetryableNotificationFailure) as caught:
        notify(config)
    assert isinstance(caught.value, NotificationFailed)
    assert caught.value.outcomes[0].retryable


def test_batch_with_a_failing_optional_channel_succeeds(
    server: HTTPServer, smtp_server: tuple[Controller, Inbox]
) -> None:
    controller, inbox = smtp_server
    server.expect_request("/teams").respond_with_data("", status=400)
    smtp = SmtpSettings(host="127.0.0.1", port=controller.port, security="none")
    config = {
        "channel": "batch",
        "title": "T",
        "text": "b",
        "channels": [
            {"channel": "teams", "url": server.url_for("/teams"), "required": False},
            {"channel": "email", "to": ["ops@example.com"]},
        ],
    }

    outcome = notify(config, smtp=smtp)

    assert outcome.ok
    assert [(o.label, o.ok, o.required) for o in outcome.outcomes] == [
        ("teams[0]", False, False),
        ("email[1]", True, True),
    ]
    assert len(inbox.messages) == 1
    assert json.dumps(outcome.to_record())


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"channel": "slack", "title": "t", "text": "x"}, "url"),
        ({"channel": "webhook", "title": "t", "text": "x", "secret_env": "S"}, "url"),
        ({"channel": "email", "to": ["not-an-address"], "title": "t", "text": "x"}, "to.0"),
        ({"channel": "email", "to": ["a@b.com", "x@@y.com"], "title": "t", "text": "x"}, "to.1"),
        ({"channel": "email", "to": [], "title": "t", "text": "x"}, "to"),
        ({"channel": "pigeon", "url": "http://x.test/", "title": "t", "text": "x"}, "channel"),
        ({"url": "http://x.test/", "title": "t", "text": "x"}, "channel"),
        ({"channel": "slack", "url": "http://x.test/", "text": "x"}, "title"),
        ({"channel": "slack", "url": "http://x.test/", "title": "t"}, "text"),
        ({"channel": "slack", "url": "ftp://x.test/", "title": "t", "text": "x"}, "url"),
        ({"channel": "slack", "url": "http://u@x.test/", "title": "t", "text": "x"}, "url"),
        ({"channel": "slack", "url": "env:lower-case!", "title": "t", "text": "x"}, "url"),
        (
            {"channel": "slack", "url": "env:GATHERING_DATABASE_URL", "title": "t", "text": "x"},
            "url",
        ),
        (
            {
                "channel": "webhook",
                "url": "http://x.test/",
                "secret": "s",
                "title": "t",
                "text": "x",
            },
            "secret",
        ),
        ({"channel": "slack", "url": "http://x.test/", "title": "a\nb", "text": "x"}, "title"),
        ({"channel": "slack", "url": "http://x.test/", "title": "t", "text": "x", "y": 1}, "y"),
        ({"channel": "batch", "title": "t", "text": "x", "channels": []}, "channels"),
        (
            {
                "channel": "batch",
                "title": "t",
                "text": "x",
                "channels": [{"channel": "email", "to": ["bad"]}],
            },
            "channels.0.to.0",
        ),
        (
            {"channel": "batch", "title": "t", "text": "x", "channels": [{"channel": "batch"}]},
            "channels.0.channel",
        ),
        (
            {
                "channel": "batch",
                "text": "x",
                "channels": [{"channel": "slack", "url": "http://x.test/"}],
            },
            "channels.0.title",
        ),
    ],
)
def test_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_notification_config(config)
    assert caught.value.field == field


def test_batch_children_may_carry_their_own_message() -> None:
    parsed = parse_notification_config(
        {
            "channel": "batch",
            "title": "t",
            "text": "x",
            "channels": [{"channel": "email", "to": ["a@example.com"], "title": "own"}],
        }
    )
    assert parsed.channel == "batch"


def test_executor_sends_with_settings(server: HTTPServer) -> None:
    server.expect_request("/slack").respond_with_data("ok")
    settings = Settings(http_allow_networks=["127.0.0.1/32"])
    record = executors.send_notification(
        {"channel": "slack", "url": server.url_for("/slack"), "title": "T", "text": "b"},
        KEY,
        settings=settings,
    )
    assert record["ok"] is True
    assert record["outcomes"][0]["status_code"] == 200


# --- secrets by reference: checked again when sending ------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"channel": "webhook", "url": "URL", "secret_env": "AWS_SECRET_ACCESS_KEY"},
        {"channel": "slack", "url": "env:AWS_SECRET_ACCESS_KEY"},
        {
            "channel": "batch",
            "channels": [{"channel": "webhook", "url": "URL", "secret_env": "DATABASE_PASSWORD"}],
        },
    ],
    ids=["webhook-secret", "url-from-env", "batch-child"],
)
def test_secret_outside_the_allowlist_is_refused_when_sending(
    server: HTTPServer, config: dict[str, Any]
) -> None:
    # Given secrets allowed for HOOK_* only, and a worker holding other secrets
    server.expect_request("/hook").respond_with_data("ok")
    url = server.url_for("/hook")
    settings = Settings(http_allow_networks=["127.0.0.1/32"], secret_env_allow=["HOOK_*"])
    env = {"AWS_SECRET_ACCESS_KEY": url, "DATABASE_PASSWORD": "pw", "HOOK_SECRET": "s"}
    message = {"title": "t", "text": "x"}
    filled = json.loads(json.dumps({**config, **message}).replace('"URL"', json.dumps(url)))

    # When the notification is sent
    with pytest.raises(PermanentFailure) as caught:
        executors.send_notification(filled, KEY, settings=settings, env=env)

    # Then it fails permanently, naming the setting (a batch, in the child's outcome), and
    # nothing was sent
    record = caught.value.record() if isinstance(caught.value, NotificationFailed) else {}
    assert "GATHERING_SECRET_ENV_ALLOW" in str(caught.value) + json.dumps(record)
    assert server.log == []
