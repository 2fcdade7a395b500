"""The SSRF table of ``tests/unit/test_ssrf.py``, run through the HTTP client's production path.

The unit tests check the pure decision (:func:`vet_url`). Here every URL of that table goes
through :meth:`GuardedHttpClient.call` under the default (empty) allowlist, with the table's
resolver injected the way the worker injects the system one. Each must be refused with the
table's reason before the process touches the network at all.

"Touches the network" is observed, not inferred: a Python audit hook sees every socket being
created, connected, sent on or used for name resolution, in any thread and through any
library. While armed it records the event and raises, so the operation never happens and no
packet can leave (not even to loopback). A control test shows the same hook does see the
client's connection when a request is allowed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from pytest_httpserver import HTTPServer

from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.skills.errors import SsrfRefused
from gathering_tasks.skills.http import GuardedHttpClient, HttpPolicy
from gathering_tasks.skills.http_spec import HttpRequestSpec, parse_call_api_config
from gathering_tasks.skills.ssrf import RefusalReason
from tests.unit.test_ssrf import BYPASSES, DNS, FakeResolver

KEY = "run-7:ssrf"

# Audit events (see the "Audit events table" of the Python docs) that precede any traffic.
NETWORK_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.bind",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
    }
)


class NetworkTouched(RuntimeError):
    """Raised inside the audited operation, so it does not happen."""


@dataclass
class NetworkWatch:
    """Records (and, when ``block``, stops) every socket operation while ``armed``."""

    armed: bool = False
    block: bool = True
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event not in NETWORK_EVENTS:
            return
        # Socket objects are left out: the interesting part is the address or the name.
        detail = ", ".join(repr(arg) for arg in args if not hasattr(arg, "fileno"))
        self.seen.append((event, detail))
        if self.block:
            raise NetworkTouched(f"{event}({detail})")


_WATCH = NetworkWatch()
_installed: list[bool] = []


@pytest.fixture
def network() -> Iterator[NetworkWatch]:
    """The process-wide watch, cleared and disarmed around each test."""
    if not _installed:
        # Audit hooks cannot be removed; this one costs one attribute check when disarmed.
        sys.addaudithook(_WATCH)
        _installed.append(True)
    _WATCH.seen.clear()
    _WATCH.block = True
    try:
        yield _WATCH
    finally:
        _WATCH.armed = False
        _WATCH.seen.clear()


def spec_for(url: str) -> tuple[HttpRequestSpec, InvalidInput | None]:
    """The ``call_api`` spec for ``url``, and the refusal of the door if it refused it.

    A URL the config schema refuses is given to the client unvalidated, as a spec stored
    before a rule existed would be: the client must vet every request itself.
    """
    try:
        return parse_call_api_config({"url": url}), None
    except InvalidInput as refused:
        return HttpRequestSpec.model_construct(url=url), refused


@pytest.mark.parametrize(("url", "reason"), BYPASSES, ids=[url for url, _ in BYPASSES])
def test_client_refuses_every_bypass_before_touching_the_network(
    network: NetworkWatch, url: str, reason: RefusalReason
) -> None:
    # Given the default policy (nothing allowlisted) and the table's resolver
    resolver = FakeResolver(DNS)
    sleeps: list[float] = []
    client = GuardedHttpClient(HttpPolicy(), resolver=resolver, sleep=sleeps.append)
    spec, door = spec_for(url)

    # When the client is asked to call the URL, with every socket operation watched
    network.armed = True
    with pytest.raises(SsrfRefused) as caught:
        client.call(spec, idempotency_key=KEY, env={})
    network.armed = False

    # Then it is refused, permanently and at once, with the table's reason
    assert caught.value.reason == reason
    assert isinstance(caught.value, PermanentFailure)
    assert sleeps == []
    # And no socket was created, bound, connected or used to resolve a name
    assert network.seen == []
    # And only a name from the table was resolved, through the injected resolver, once
    host = (urlsplit(url).hostname or "") if door is None else ""
    assert len(resolver.calls) == (1 if host in DNS else 0)
    # And where the config schema refused the URL first, it said the same thing
    if door is not None:
        assert door.field == "url"
        assert f"({reason})" in door.reason


def test_the_watch_sees_the_connection_of_an_allowed_request(
    network: NetworkWatch, server: HTTPServer
) -> None:
    # Given a local server, loopback allowlisted, and the watch recording without blocking
    server.expect_request("/ok").respond_with_data("fine")
    client = GuardedHttpClient(HttpPolicy.allowing(["127.0.0.1/32"]), resolver=FakeResolver())
    network.block = False

    # When the client calls it
    network.armed = True
    result = client.call(parse_call_api_config({"url": server.url_for("/ok")}), idempotency_key=KEY)
    network.armed = False

    # Then the request went through, and the watch saw its connection to the server
    assert result.status_code == 200
    assert ("socket.connect", repr(("127.0.0.1", server.port))) in network.seen
