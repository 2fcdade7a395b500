"""The guarded HTTP client against real local servers (127.0.0.1 only, allowlisted)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import urllib3.util.connection
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from gathering_tasks.errors import InvalidInput, PermanentFailure, RetryableFailure
from gathering_tasks.settings import Settings
from gathering_tasks.skills import executors
from gathering_tasks.skills._validation import SecretPolicy, SecretSource
from gathering_tasks.skills.errors import (
    HttpTransportFailure,
    PermanentHttpStatus,
    PermanentHttpTransport,
    ResponseTooLarge,
    RetryableHttpStatus,
    RetryableHttpTransport,
    SecretNotAvailable,
    SsrfRefused,
    TooManyRedirects,
)
from gathering_tasks.skills.http import (
    USER_AGENT,
    GuardedHttpClient,
    HttpPolicy,
    parse_call_api_config,
    parse_retry_after,
)
from tests.servers import self_signed_cert, serving_http

LOOPBACK = ("127.0.0.1/32",)
TEST_SECRETS = ("TEST_*",)
KEY = "run-42:node-a"
NOW_S = 1_800_000_000.0


# --- fixtures and helpers -----------------------------------------------------------------


class Resolver:
    """Maps test names to 127.0.0.1 (or whatever a test says) and counts questions."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        return self.table[host]


def client(
    *,
    networks: Sequence[str] = LOOPBACK,
    hosts: Sequence[str] = (),
    resolver: Callable[[str, int], Sequence[str]] | None = None,
    sleeps: list[float] | None = None,
    **changes: Any,
) -> GuardedHttpClient:
    # Three requests per call: these tests are about the client's own retries.
    defaults = {"connect_timeout_s": 2.0, "read_timeout_s": 2.0, "max_attempts": 3}
    policy = HttpPolicy.allowing(
        networks, hosts, secret_env_allow=TEST_SECRETS, **{**defaults, **changes}
    )
    record = sleeps if sleeps is not None else []
    return GuardedHttpClient(
        policy,
        resolver=resolver or Resolver(),
        sleep=record.append,
        clock=lambda: NOW_S,
    )


def call(http: GuardedHttpClient, config: dict[str, Any], **kwargs: Any) -> Any:
    return http.call(parse_call_api_config(config), idempotency_key=KEY, **kwargs)


def requests_seen(server: HTTPServer) -> list[Request]:
    return [request for request, _ in server.log]


def counting(responses: Sequence[Response]) -> tuple[Callable[[Request], Response], list[int]]:
    """A handler answering ``responses`` in turn (the last one forever), counting calls."""
    count = [0]

    def handler(_request: Request) -> Response:
        count[0] += 1
        return responses[min(count[0], len(responses)) - 1]

    return handler, count


# --- methods, bodies, headers ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
def test_every_method_reaches_the_server(server: HTTPServer, method: str) -> None:
    # Given a server answering JSON for this method
    server.expect_request("/items", method=method).respond_with_json({"ok": True})

    # When the client calls it
    result = call(client(), {"method": method, "url": server.url_for("/items")})

    # Then the call succeeded with the JSON decoded (no body for HEAD)
    assert result.status_code == 200
    assert result.attempts == 1
    assert result.json == (None if method == "HEAD" else {"ok": True})
    assert [r.method for r in requests_seen(server)] == [method]


def test_json_body_and_query_params_are_sent(server: HTTPServer) -> None:
    server.expect_request(
        "/items", method="POST", json={"name": "x", "n": 1}, query_string="tag=a&tag=b&flag=true"
    ).respond_with_json({"id": 7}, status=201)

    result = call(
        client(),
        {
            "method": "POST",
            "url": server.url_for("/items"),
            "json": {"name": "x", "n": 1},
            "params": {"tag": ["a", "b"], "flag": True},
        },
    )

    assert (result.status_code, result.json) == (201, {"id": 7})
    assert requests_seen(server)[0].headers["Content-Type"] == "application/json"
    assert result.to_record()["final_url"] == server.url_for("/items")


def test_form_body_is_sent(server: HTTPServer) -> None:
    server.expect_request(
        "/form", method="PUT", data="a=1&b=two+words", headers={"X-Trace": "t1"}
    ).respond_with_data("done")

    result = call(
        client(),
        {
            "method": "PUT",
            "url": server.url_for("/form"),
            "form": {"a": "1", "b": "two words"},
            "headers": {"X-Trace": "t1"},
        },
    )

    assert result.body_excerpt == "done"
    assert requests_seen(server)[0].headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_every_request_carries_idempotency_key_and_user_agent(server: HTTPServer) -> None:
    server.expect_request("/h").respond_with_data("ok")
    call(client(), {"url": server.url_for("/h")})
    seen = requests_seen(server)[0]
    assert seen.headers["Idempotency-Key"] == KEY
    assert seen.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("gathering-tasks/")


SECRET = "s3cr3t-Value-0f-The-Test"


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        ({"type": "bearer", "token_env": "TEST_API_TOKEN"}, "Authorization", f"Bearer {SECRET}"),
        (
            {"type": "basic", "username": "svc", "password_env": "TEST_API_TOKEN"},
            "Authorization",
            "Basic " + base64.b64encode(f"svc:{SECRET}".encode()).decode(),
        ),
        ({"type": "api_key", "value_env": "TEST_API_TOKEN"}, "X-Api-Key", SECRET),
        (
            {"type": "api_key", "header": "X-Custom-Key", "value_env": "TEST_API_TOKEN"},
            "X-Custom-Key",
            SECRET,
        ),
    ],
)
def test_auth_secret_comes_from_env_and_is_never_logged(
    server: HTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    auth: dict[str, str],
    header: str,
    expected: str,
) -> None:
    # Given the secret only in the environment, and a server that echoes nothing back
    monkeypatch.setenv("TEST_API_TOKEN", SECRET)
    server.expect_request("/private", headers={header: expected}).respond_with_data("ok")
    server.expect_request("/missing").respond_with_data("denied", status=403)
    spec = parse_call_api_config({"url": server.url_for("/private"), "auth": auth})
    caplog.set_level(logging.DEBUG)

    # When the call is made (and also a failing one)
    result = client().call(spec, idempotency_key=KEY)
    with pytest.raises(PermanentHttpStatus):
        call(client(), {"url": server.url_for("/missing"), "auth": auth})

    # Then the server got the credential, and no log, record or repr shows it
    assert result.status_code == 200
    assert SECRET not in caplog.text
    for record in caplog.records:
        assert SECRET not in repr(record.__dict__)
    assert SECRET not in repr(result.to_record())
    built = spec.build(SecretSource({"TEST_API_TOKEN": SECRET}, SecretPolicy(TEST_SECRETS)))
    assert SECRET not in repr(built)
    assert SECRET not in repr(spec)


def test_missing_secret_fails_permanently_before_any_request(server: HTTPServer) -> None:
    spec = parse_call_api_config(
        {"url": server.url_for("/x"), "auth": {"type": "bearer", "token_env": "TEST_NOT_SET"}}
    )
    with pytest.raises(SecretNotAvailable, match="TEST_NOT_SET"):
        client().call(spec, idempotency_key=KEY, env={})
    assert requests_seen(server) == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"url": "http://x.test/", "auth": {"type": "bearer", "token": "abc"}}, "auth.token"),
        ({"url": "http://x.test/", "headers": {"Authorization": "Bearer abc"}}, "headers"),
        ({"url": "http://x.test/", "headers": {"Cookie": "s=1"}}, "headers"),
        ({"url": "http://x.test/", "headers": {"Host": "other"}}, "headers"),
        ({"url": "http://x.test/", "headers": {"X-Note": "caf\u00e9 \u2603"}}, "headers"),
        ({"url": "http://x.test/", "headers": {"X-Note": "a\r\nInjected: 1"}}, "headers"),
        ({"url": "http://x.test/", "method": "POST", "json": {}, "form": {}}, "form"),
        ({"url": "http://x.test/", "json": {"a": 1}}, "json"),
        ({"url": "gopher://x.test/"}, "url"),
        ({"url": "http://a@x.test/"}, "url"),
        ({"url": "http://x.test/", "method": "TRACE"}, "method"),
        ({"url": "http://x.test/", "auth": {"type": "oauth"}}, "auth.type"),
        (
            {"url": "http://x.test/", "auth": {"type": "bearer", "token_env": "a-b"}},
            "auth.token_env",
        ),
        (
            {
                "url": "http://x.test/",
                "auth": {"type": "bearer", "token_env": "GATHERING_REDIS_URL"},
            },
            "auth.token_env",
        ),
        ({"url": "http://x.test/", "expected_statuses": [700]}, "expected_statuses.0"),
        ({"url": "http://x.test/", "surprise": 1}, "surprise"),
        ({}, "url"),
    ],
)
def test_call_api_config_errors_name_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_call_api_config(config)
    assert caught.value.field == field


# --- SSRF: vetting and connecting to the checked address --------------------------------


def test_name_is_connected_to_the_vetted_address_with_its_own_host_header(
    server: HTTPServer,
) -> None:
    # Given a name that only the injected resolver knows, mapped to allowlisted 127.0.0.1
    resolver = Resolver({"sink.test": ["127.0.0.1"]})
    server.expect_request("/named").respond_with_data("hello")

    # When it is called by name
    result = call(client(resolver=resolver), {"url": f"http://sink.test:{server.port}/named"})

    # Then the request reached 127.0.0.1 with the name in Host, and DNS was asked once
    assert result.body_excerpt == "hello"
    assert requests_seen(server)[0].headers["Host"] == f"sink.test:{server.port}"
    assert resolver.calls == ["sink.test"]
    assert result.final_url == f"http://sink.test:{server.port}/named"


def test_name_resolving_to_loopback_is_refused_when_not_allowlisted(server: HTTPServer) -> None:
    resolver = Resolver({"sink.test": ["127.0.0.1"]})
    server.expect_request("/named").respond_with_data("hello")
    with pytest.raises(SsrfRefused) as caught:
        call(client(networks=(), resolver=resolver), {"url": f"http://sink.test:{server.port}/"})
    assert caught.value.reason == "loopback"
    assert requests_seen(server) == []


def test_name_with_one_private_address_is_refused(server: HTTPServer) -> None:
    resolver = Resolver({"sink.test": ["127.0.0.1", "10.1.2.3"]})
    with pytest.raises(SsrfRefused) as caught:
        call(client(resolver=resolver), {"url": f"http://sink.test:{server.port}/"})
    assert caught.value.reason == "private"
    assert requests_seen(server) == []


def test_loopback_literal_is_refused_when_not_allowlisted(server: HTTPServer) -> None:
    server.expect_request("/").respond_with_data("should not be reached")
    for url in (server.url_for("/"), f"http://2130706433:{server.port}/"):
        with pytest.raises(SsrfRefused, match="loopback"):
            call(client(networks=()), {"url": url})
    assert requests_seen(server) == []


def test_resolver_failure_is_a_dns_transport_failure() -> None:
    def broken(_host: str, _port: int) -> Sequence[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(RetryableHttpTransport) as caught:
        call(client(resolver=broken, max_attempts=1), {"url": "http://nowhere.test/"})
    assert caught.value.kind == "dns"


# --- redirects -----------------------------------------------------------------------------


def test_redirect_is_followed_when_asked_and_refused_as_failure_otherwise(
    server: HTTPServer,
) -> None:
    server.expect_request("/start").respond_with_data("", status=302, headers={"Location": "/end"})
    server.expect_request("/end").respond_with_json({"arrived": True})

    followed = call(client(), {"url": server.url_for("/start"), "follow_redirects": True})
    assert (followed.status_code, followed.json) == (200, {"arrived": True})
    assert followed.final_url == server.url_for("/end")

    with pytest.raises(PermanentHttpStatus) as caught:
        call(client(), {"url": server.url_for("/start")})
    assert caught.value.status_code == 302

    kept = call(client(), {"url": server.url_for("/start"), "expected_statuses": [302]})
    assert kept.status_code == 302


def test_redirect_hop_to_loopback_is_refused_from_an_allowlisted_host(server: HTTPServer) -> None:
    # Given only the name sink.test allowlisted (not loopback), redirecting to 127.0.0.1
    resolver = Resolver({"sink.test": ["127.0.0.1"]})
    server.expect_request("/start").respond_with_data(
        "", status=302, headers={"Location": server.url_for("/internal")}
    )
    server.expect_request("/internal").respond_with_data("secret stuff")
    http = client(networks=(), hosts=("sink.test",), resolver=resolver)

    # When the redirect is followed
    with pytest.raises(SsrfRefused) as caught:
        call(http, {"url": f"http://sink.test:{server.port}/start", "follow_redirects": True})

    # Then the hop is refused and never reaches the server
    assert caught.value.reason == "loopback"
    assert [r.path for r in requests_seen(server)] == ["/start"]


def test_redirect_to_cloud_metadata_is_refused_before_any_connect(
    server: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a spy on every outgoing TCP connection urllib3 makes
    connected: list[str] = []
    original = urllib3.util.connection.create_connection

    def spy(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address[0])
        return original(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    server.expect_request("/start").respond_with_data(
        "", status=307, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
    )

    # When the redirect is followed
    with pytest.raises(SsrfRefused) as caught:
        call(client(), {"url": server.url_for("/start"), "follow_redirects": True})

    # Then it was refused as cloud metadata and only the local server was ever contacted
    assert caught.value.reason == "cloud-metadata"
    assert connected == ["127.0.0.1"]


def test_redirect_chain_is_bounded(server: HTTPServer) -> None:
    server.expect_request("/loop").respond_with_data("", status=302, headers={"Location": "/loop"})
    with pytest.raises(TooManyRedirects):
        call(
            client(),
            {"url": server.url_for("/loop"), "follow_redirects": True, "max_redirects": 3},
        )
    assert len(requests_seen(server)) == 4


def test_credentials_are_dropped_when_a_redirect_leaves_the_origin(
    server: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_API_TOKEN", SECRET)
    resolver = Resolver({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    server.expect_request("/start").respond_with_data(
        "", status=302, headers={"Location": f"http://b.test:{server.port}/end"}
    )
    server.expect_request("/end").respond_with_data("ok")

    call(
        client(resolver=resolver),
        {
            "url": f"http://a.test:{server.port}/start",
            "auth": {"type": "bearer", "token_env": "TEST_API_TOKEN"},
            "follow_redirects": True,
        },
    )

    first, second = requests_seen(server)
    assert first.headers["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in second.headers
    assert second.headers["Host"] == f"b.test:{server.port}"
    assert second.headers["Idempotency-Key"] == KEY


def test_see_other_after_post_becomes_get_without_body(server: HTTPServer) -> None:
    server.expect_request("/submit", method="POST").respond_with_data(
        "", status=303, headers={"Location": "/status"}
    )
    server.expect_request("/status", method="GET").respond_with_data("queued")

    result = call(
        client(),
        {
            "method": "POST",
            "url": server.url_for("/submit"),
            "json": {"a": 1},
            "follow_redirects": True,
        },
    )

    assert result.body_excerpt == "queued"
    assert requests_seen(server)[1].get_data() == b""


# --- timeouts and size caps -------------------------------------------------------------------


def test_slow_response_is_a_timeout_failure(server: HTTPServer) -> None:
    # Given a handler that blocks far longer than the read timeout
    release = threading.Event()

    def slow(_request: Request) -> Response:
        release.wait(2.0)
        return Response("late")

    server.expect_request("/slow").respond_with_handler(slow)
    try:
        # When called with a small read timeout
        with pytest.raises(HttpTransportFailure) as caught:
            call(client(read_timeout_s=0.3, max_attempts=1), {"url": server.url_for("/slow")})
    finally:
        release.set()  # let the server thread go at once

    # Then it failed as a timeout (retryable: GET is safe to repeat)
    assert caught.value.kind == "timeout"
    assert isinstance(caught.value, RetryableFailure)


def test_spec_timeout_can_only_shorten_the_policy(server: HTTPServer) -> None:
    release = threading.Event()

    def slow(_request: Request) -> Response:
        release.wait(2.0)
        return Response("late")

    server.expect_request("/slow").respond_with_handler(slow)
    try:
        with pytest.raises(PermanentHttpTransport) as caught:
            call(
                client(read_timeout_s=0.3),
                {"url": server.url_for("/slow"), "read_timeout_s": 3000, "method": "POST"},
            )
    finally:
        release.set()
    # Then the policy's 0.3 s won over the spec's 3000 s (else the handler's answer arrives)
    assert caught.value.kind == "timeout"


def test_huge_streamed_response_without_length_hits_the_cap(server: HTTPServer) -> None:
    # Given a body streamed in chunks (no Content-Length), far larger than the cap
    chunk = b"x" * 65536

    def stream(_request: Request) -> Response:
        return Response((chunk for _ in range(160)), mimetype="application/octet-stream")

    server.expect_request("/huge").respond_with_handler(stream)

    with pytest.raises(ResponseTooLarge, match="response too large"):
        call(client(max_response_bytes=100_000), {"url": server.url_for("/huge")})


def test_declared_length_over_the_cap_fails_early(server: HTTPServer) -> None:
    server.expect_request("/big").respond_with_data(b"y" * 5000)
    with pytest.raises(ResponseTooLarge):
        call(client(max_response_bytes=4096), {"url": server.url_for("/big")})


def test_body_at_the_cap_is_accepted_and_excerpt_is_bounded(server: HTTPServer) -> None:
    server.expect_request("/exact").respond_with_data(b"z" * 4096, content_type="text/plain")
    result = call(
        client(max_response_bytes=4096, excerpt_bytes=100), {"url": server.url_for("/exact")}
    )
    assert result.body_excerpt == "z" * 100


def test_large_json_is_not_kept_in_the_result(server: HTTPServer) -> None:
    server.expect_request("/j").respond_with_json({"items": ["v" * 100] * 200})
    result = call(client(max_json_bytes=1024), {"url": server.url_for("/j")})
    assert result.json is None
    assert len(result.body_excerpt) <= 2048


# --- retries --------------------------------------------------------------------------------


def test_503_with_retry_after_zero_twice_then_200_succeeds_on_third_attempt(
    server: HTTPServer,
) -> None:
    busy = Response("busy", status=503, headers={"Retry-After": "0"})
    handler, count = counting([busy, busy, Response("ok")])
    server.expect_request("/flaky").respond_with_handler(handler)
    sleeps: list[float] = []

    result = call(client(sleeps=sleeps), {"url": server.url_for("/flaky")})

    assert (result.status_code, result.attempts) == (200, 3)
    assert count[0] == 3
    assert sleeps == [0.0, 0.0]


def test_429_is_retried_and_bounded(server: HTTPServer) -> None:
    handler, count = counting([Response("slow down", status=429)])
    server.expect_request("/limited").respond_with_handler(handler)
    sleeps: list[float] = []

    with pytest.raises(RetryableHttpStatus) as caught:
        call(client(sleeps=sleeps, max_attempts=3), {"url": server.url_for("/limited")})

    assert caught.value.status_code == 429
    assert caught.value.attempts == 3
    assert count[0] == 3
    assert len(sleeps) == 2  # exponential backoff, injected sleep: no real waiting


def test_retry_after_http_date_and_cap(server: HTTPServer) -> None:
    later = formatdate(NOW_S + 5, usegmt=True)
    handler, _ = counting(
        [
            Response("", status=503, headers={"Retry-After": later}),
            Response("", status=503, headers={"Retry-After": "999"}),
            Response("ok"),
        ]
    )
    server.expect_request("/r").respond_with_handler(handler)
    sleeps: list[float] = []

    call(client(sleeps=sleeps, max_retry_wait_s=7.0), {"url": server.url_for("/r")})

    assert sleeps == [5.0, 7.0]


def test_404_is_a_permanent_failure_not_retried(server: HTTPServer) -> None:
    server.expect_request("/gone").respond_with_data("no such item " * 500, status=404)

    with pytest.raises(PermanentHttpStatus) as caught:
        call(client(), {"url": server.url_for("/gone")})

    assert caught.value.status_code == 404
    assert caught.value.body_excerpt.startswith("no such item")
    assert len(caught.value.body_excerpt) <= 2048
    assert "no such item" not in str(caught.value)
    assert caught.value.record()["status_code"] == 404
    assert len(requests_seen(server)) == 1


def test_expected_status_outside_2xx_is_success(server: HTTPServer) -> None:
    server.expect_request("/gone").respond_with_data("", status=404)
    result = call(client(), {"url": server.url_for("/gone"), "expected_statuses": [404]})
    assert result.status_code == 404


def test_post_503_is_not_retried_by_default(server: HTTPServer) -> None:
    server.expect_request("/create", method="POST").respond_with_data("down", status=503)

    with pytest.raises(PermanentHttpStatus) as caught:
        call(client(), {"method": "POST", "url": server.url_for("/create"), "json": {"a": 1}})

    assert caught.value.status_code == 503
    assert isinstance(caught.value, PermanentFailure)
    assert len(requests_seen(server)) == 1


def test_post_503_is_retried_when_the_spec_says_so(server: HTTPServer) -> None:
    server.expect_request("/create", method="POST").respond_with_data("down", status=503)
    with pytest.raises(RetryableHttpStatus):
        call(
            client(),
            {"method": "POST", "url": server.url_for("/create"), "json": {}, "retry": True},
        )
    seen = requests_seen(server)
    assert len(seen) == 3
    assert {r.headers["Idempotency-Key"] for r in seen} == {KEY}


def test_retry_false_disables_retries_of_get(server: HTTPServer) -> None:
    server.expect_request("/x").respond_with_data("", status=500)
    with pytest.raises(PermanentHttpStatus):
        call(client(), {"url": server.url_for("/x"), "retry": False})
    assert len(requests_seen(server)) == 1


def test_connection_refused_is_retried_then_fails() -> None:
    # A port that was free a moment ago: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []

    with pytest.raises(RetryableHttpTransport) as caught:
        call(client(sleeps=sleeps), {"url": f"http://127.0.0.1:{port}/"})

    assert caught.value.kind == "connect"
    assert caught.value.attempts == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (formatdate(NOW_S + 30, usegmt=True), 30.0),
        (formatdate(NOW_S - 30, usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW_S) == seconds


def test_idempotency_key_is_required() -> None:
    with pytest.raises(InvalidInput) as caught:
        client().call(parse_call_api_config({"url": "http://x.test/"}), idempotency_key="")
    assert caught.value.field == "idempotency_key"


# --- TLS: SNI and certificate checked against the name, connection to the vetted address --


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "sink.test", "DNS:sink.test")


@pytest.fixture(scope="module")
def _shared_tls_server(tls_files: tuple[Path, Path]) -> Iterator[HTTPServer]:
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv = HTTPServer(host="127.0.0.1", port=0, ssl_context=context, threaded=True)
    yield from serving_http(srv)


@pytest.fixture
def tls_server(_shared_tls_server: HTTPServer) -> Iterator[HTTPServer]:
    _shared_tls_server.clear()
    yield _shared_tls_server
    _shared_tls_server.clear()


def test_https_to_a_name_is_pinned_and_verified_against_the_name(
    tls_server: HTTPServer, tls_files: tuple[Path, Path]
) -> None:
    # Given an HTTPS server whose certificate names sink.test, trusted via the CA bundle
    tls_server.expect_request("/secure").respond_with_data("tls ok")
    resolver = Resolver({"sink.test": ["127.0.0.1"]})
    http = client(resolver=resolver, ca_bundle=str(tls_files[0]))

    # When called by name: the connection goes to 127.0.0.1, SNI and verification use the name
    result = call(http, {"url": f"https://sink.test:{tls_server.port}/secure"})

    assert result.body_excerpt == "tls ok"
    assert requests_seen(tls_server)[0].headers["Host"] == f"sink.test:{tls_server.port}"


def test_https_certificate_for_another_name_is_a_permanent_tls_failure(
    tls_server: HTTPServer, tls_files: tuple[Path, Path]
) -> None:
    resolver = Resolver({"other.test": ["127.0.0.1"]})
    http = client(resolver=resolver, ca_bundle=str(tls_files[0]))
    for url in (f"https://other.test:{tls_server.port}/", f"https://127.0.0.1:{tls_server.port}/"):
        with pytest.raises(PermanentHttpTransport) as caught:
            call(http, {"url": url})
        assert caught.value.kind == "tls"
    assert requests_seen(tls_server) == []


# --- the task layer's entry point ---------------------------------------------------------


def test_executor_builds_the_client_from_settings(server: HTTPServer) -> None:
    server.expect_request("/exec").respond_with_json({"done": 1})
    settings = Settings(http_allow_networks=["127.0.0.1/32"], http_max_attempts=1)

    record = executors.call_api({"url": server.url_for("/exec")}, KEY, settings=settings)

    assert record["status_code"] == 200
    assert record["json"] == {"done": 1}
    assert json.dumps(record)  # JSON-ready
    assert requests_seen(server)[0].headers["Idempotency-Key"] == KEY


def test_executor_turns_a_stale_invalid_config_into_a_permanent_failure() -> None:
    with pytest.raises(PermanentFailure, match="invalid call_api config"):
        executors.call_api({"url": "ftp://x.test/"}, KEY, settings=Settings())


# --- secrets by reference: only names the allowlist matches, checked again at run time ------


CLOUD_CREDENTIAL = "aws-secret-access-key-of-the-worker"


def test_secret_outside_the_allowlist_is_refused_at_run_time_before_any_request(
    server: HTTPServer,
) -> None:
    # Given a worker holding a cloud credential, secrets allowed for HOOK_* only, and a stored
    # action (created before the rule) that sends that credential to a server of its choosing
    server.expect_request("/collect").respond_with_data("thanks")
    settings = Settings(http_allow_networks=["127.0.0.1/32"], secret_env_allow=["HOOK_*"])
    config = {
        "url": server.url_for("/collect"),
        "auth": {"type": "bearer", "token_env": "AWS_SECRET_ACCESS_KEY"},
    }
    env = {"AWS_SECRET_ACCESS_KEY": CLOUD_CREDENTIAL, "HOOK_TOKEN": "t"}

    # When the run executes
    with pytest.raises(PermanentFailure) as caught:
        executors.call_api(config, KEY, settings=settings, env=env)

    # Then it fails permanently, naming the variable and the setting, before any request
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert "GATHERING_SECRET_ENV_ALLOW" in str(caught.value)
    assert CLOUD_CREDENTIAL not in str(caught.value)
    assert requests_seen(server) == []


def test_no_secret_is_read_by_default(server: HTTPServer) -> None:
    server.expect_request("/collect").respond_with_data("thanks")
    settings = Settings(http_allow_networks=["127.0.0.1/32"])
    config = {
        "url": server.url_for("/collect"),
        "auth": {"type": "api_key", "value_env": "HOOK_TOKEN"},
    }
    with pytest.raises(PermanentFailure, match="HOOK_TOKEN"):
        executors.call_api(config, KEY, settings=settings, env={"HOOK_TOKEN": "t"})
    assert requests_seen(server) == []


def test_secret_matching_the_allowlist_is_sent(server: HTTPServer) -> None:
    server.expect_request("/in", headers={"Authorization": "Bearer t0k"}).respond_with_data("ok")
    settings = Settings(http_allow_networks=["127.0.0.1/32"], secret_env_allow=["HOOK_*"])
    config = {
        "url": server.url_for("/in"),
        "auth": {"type": "bearer", "token_env": "HOOK_TOKEN"},
    }
    record = executors.call_api(config, KEY, settings=settings, env={"HOOK_TOKEN": "t0k"})
    assert record["status_code"] == 200
