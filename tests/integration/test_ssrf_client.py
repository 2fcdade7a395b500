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
from collections.abc import Iterator, Mapping, Sequence
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
    """Records (and, when ``block``, stops) every socket operation while ``armed``.

    ``permitted`` names the (address, port) pairs a test does want reached (its local
    server): resolving and connecting to them, and creating sockets, then go through;
    anything else is still stopped.
    """

    armed: bool = False
    block: bool = True
    permitted: frozenset[tuple[str, int]] = frozenset()
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed or event not in NETWORK_EVENTS:
            return
        # Socket objects are left out: the interesting part is the address or the name.
        detail = ", ".join(repr(arg) for arg in args if not hasattr(arg, "fileno"))
        self.seen.append((event, detail))
        if self.block and not self._permitted(event, args):
            raise NetworkTouched(f"{event}({detail})")

    def _permitted(self, event: str, args: tuple[Any, ...]) -> bool:
        if not self.permitted:
            return False
        if event in ("socket.__new__", "socket.bind"):
            return True
        if event == "socket.connect":
            return tuple(args[1][:2]) in self.permitted
        if event == "socket.getaddrinfo":
            return (args[0], args[1]) in self.permitted
        return False

    def connects(self) -> list[str]:
        """The addresses connected to, as ``repr((host, port))``."""
        return [detail for event, detail in self.seen if event == "socket.connect"]


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
    _WATCH.permitted = frozenset()
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


# --- what an allowlist opens, through the production path ---------------------------------


@dataclass(frozen=True)
class AllowCase:
    """A URL refused under an allowlist that opens something near it."""

    url: str
    reason: RefusalReason
    networks: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    dns: Mapping[str, Sequence[str]] = field(default_factory=dict)


EVERYTHING = ("0.0.0.0/0", "::/0")
PARTNER = ("hooks.partner.example",)
R = RefusalReason

ALLOWLIST_CASES: dict[str, AllowCase] = {
    # 1. an allowlisted name still has its addresses vetted against what nothing opens
    "host-to-metadata": AllowCase(
        "https://hooks.partner.example/in",
        R.CLOUD_METADATA,
        hosts=PARTNER,
        dns={"hooks.partner.example": ["169.254.169.254"]},
    ),
    "host-to-metadata-v6": AllowCase(
        "https://hooks.partner.example/in",
        R.CLOUD_METADATA,
        hosts=PARTNER,
        dns={"hooks.partner.example": ["fd00:ec2::254"]},
    ),
    "host-to-mapped-metadata": AllowCase(
        "https://hooks.partner.example/in",
        R.CLOUD_METADATA,
        hosts=PARTNER,
        dns={"hooks.partner.example": ["::ffff:169.254.169.254"]},
    ),
    "host-to-public-and-metadata": AllowCase(
        "https://hooks.partner.example/in",
        R.CLOUD_METADATA,
        hosts=PARTNER,
        dns={"hooks.partner.example": ["93.184.216.34", "169.254.169.254"]},
    ),
    "host-to-unspecified": AllowCase(
        "https://hooks.partner.example/in",
        R.UNSPECIFIED,
        hosts=PARTNER,
        dns={"hooks.partner.example": ["0.0.0.0"]},
    ),
    # 2. metadata under an allowlist of every address
    "all-metadata-v4": AllowCase("http://169.254.169.254/latest/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-hex": AllowCase("http://0xa9fea9fe/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-ecs": AllowCase("http://169.254.170.2/v2/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-alibaba": AllowCase("http://100.100.100.200/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-oracle": AllowCase("http://192.0.0.192/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-azure-wire": AllowCase("http://168.63.129.16/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-v6": AllowCase("http://[fd00:ec2::254]/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-gcp-v6": AllowCase("http://[fd20:ce::254]/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-mapped": AllowCase(
        "http://[::ffff:169.254.169.254]/", R.CLOUD_METADATA, EVERYTHING
    ),
    "all-metadata-translated": AllowCase(
        "http://[::ffff:0:a9fe:a9fe]/", R.CLOUD_METADATA, EVERYTHING
    ),
    "all-metadata-nat64": AllowCase("http://[64:ff9b::a9fe:a9fe]/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-6to4": AllowCase("http://[2002:a9fe:a9fe::]/", R.CLOUD_METADATA, EVERYTHING),
    "all-metadata-by-name": AllowCase(
        "http://metadata.google.internal/computeMetadata/v1/",
        R.CLOUD_METADATA,
        EVERYTHING,
        dns=DNS,
    ),
    "all-unspecified": AllowCase("http://0.0.0.0:6379/", R.UNSPECIFIED, EVERYTHING),
    "all-unspecified-v6": AllowCase("http://[::]:6379/", R.UNSPECIFIED, EVERYTHING),
    # 3. an entry with a port opens that port only
    "port-redis": AllowCase("http://127.0.0.1:6379/", R.PORT_NOT_ALLOWED, ("127.0.0.1:8443",)),
    "port-default": AllowCase("http://127.0.0.1/", R.PORT_NOT_ALLOWED, ("127.0.0.1:8443",)),
    "port-mapped": AllowCase(
        "http://[::ffff:127.0.0.1]:5432/", R.PORT_NOT_ALLOWED, ("127.0.0.1:8443",)
    ),
    "port-number-spelling": AllowCase(
        "http://2130706433:6379/", R.PORT_NOT_ALLOWED, ("127.0.0.1:8443",)
    ),
    "port-range": AllowCase("http://10.1.2.3:8080/", R.PORT_NOT_ALLOWED, ("10.0.0.0/8:80-443",)),
    "port-v6": AllowCase("http://[::1]:6379/", R.PORT_NOT_ALLOWED, ("[::1]:8080",)),
    "port-host": AllowCase(
        "https://api.internal:8443/",
        R.PORT_NOT_ALLOWED,
        hosts=("api.internal:443",),
        dns={"api.internal": ["10.0.0.5"]},
    ),
    "port-host-localhost": AllowCase(
        "http://localhost:6379/", R.PORT_NOT_ALLOWED, hosts=("localhost:9000",)
    ),
    # 6. a huge host is refused with a short message
    "huge-host": AllowCase("http://" + "a" * 100_000 + "/", R.INVALID_HOST, EVERYTHING),
    # 8. empty labels
    "empty-label-loopback": AllowCase("http://127.0.0.1../", R.INVALID_HOST),
    "empty-label-public": AllowCase("http://1.1.1.1../", R.INVALID_HOST, EVERYTHING),
}


@pytest.mark.parametrize("case", ALLOWLIST_CASES.values(), ids=ALLOWLIST_CASES.keys())
def test_client_refuses_what_the_allowlist_does_not_open_before_touching_the_network(
    network: NetworkWatch, case: AllowCase
) -> None:
    # Given an allowlist that opens something near the URL, and the case's resolver
    resolver = FakeResolver(case.dns)
    sleeps: list[float] = []
    policy = HttpPolicy.allowing(case.networks, case.hosts)
    client = GuardedHttpClient(policy, resolver=resolver, sleep=sleeps.append)
    spec, _door = spec_for(case.url)

    # When the client is asked to call the URL, with every socket operation watched
    network.armed = True
    with pytest.raises(SsrfRefused) as caught:
        client.call(spec, idempotency_key=KEY, env={})
    network.armed = False

    # Then it is refused with the case's reason, in a short message, without a retry
    assert caught.value.reason == case.reason
    assert len(str(caught.value)) <= 300
    assert sleeps == []
    # And no socket was created, bound, connected or used to resolve a name
    assert network.seen == []


class SequenceResolver:
    """Answers each question with the next answer of the list: a rebinding name."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        return self.answers.pop(0)


def follow(url: str) -> HttpRequestSpec:
    return parse_call_api_config({"url": url, "follow_redirects": True})


def test_redirect_to_an_allowlisted_address_on_another_port_is_refused(
    network: NetworkWatch, server: HTTPServer
) -> None:
    # Given loopback open on the API's port only, and the API redirecting to Redis' port
    server.expect_request("/start").respond_with_data(
        "", status=302, headers={"Location": "http://127.0.0.1:6379/"}
    )
    client = GuardedHttpClient(
        HttpPolicy.allowing([f"127.0.0.1:{server.port}"]), resolver=FakeResolver()
    )
    network.permitted = frozenset({("127.0.0.1", server.port)})

    # When the redirect is followed
    network.armed = True
    with pytest.raises(SsrfRefused) as caught:
        client.call(follow(server.url_for("/start")), idempotency_key=KEY)
    network.armed = False

    # Then the hop is refused for its port, and only the API's port was ever connected to
    assert caught.value.reason == R.PORT_NOT_ALLOWED
    assert "127.0.0.1:6379" in str(caught.value)
    assert network.connects() == [repr(("127.0.0.1", server.port))]


def test_redirect_to_an_allowlisted_name_on_another_port_is_refused(
    network: NetworkWatch, server: HTTPServer
) -> None:
    # Given a name open on the API's port only (loopback not open), redirecting to port 6379
    server.expect_request("/start").respond_with_data(
        "", status=302, headers={"Location": "http://sink.test:6379/"}
    )
    policy = HttpPolicy.allowing(hosts=[f"sink.test:{server.port}"])
    resolver = FakeResolver({"sink.test": ["127.0.0.1"]})
    client = GuardedHttpClient(policy, resolver=resolver)
    network.permitted = frozenset({("127.0.0.1", server.port)})

    # When the redirect is followed
    network.armed = True
    with pytest.raises(SsrfRefused) as caught:
        client.call(follow(f"http://sink.test:{server.port}/start"), idempotency_key=KEY)
    network.armed = False

    # Then the hop is refused, and only the API's port was ever connected to
    assert caught.value.reason == R.PORT_NOT_ALLOWED
    assert network.connects() == [repr(("127.0.0.1", server.port))]
    assert [path for path in (r.path for r, _ in server.log)] == ["/start"]


def test_allowlisted_name_rebinding_to_metadata_is_refused_on_the_next_hop(
    network: NetworkWatch, server: HTTPServer
) -> None:
    # Given an allowlisted partner name that resolves to the local API, then to metadata
    server.expect_request("/start").respond_with_data(
        "", status=302, headers={"Location": f"http://hooks.partner.example:{server.port}/next"}
    )
    resolver = SequenceResolver(["127.0.0.1"], ["169.254.169.254"])
    client = GuardedHttpClient(HttpPolicy.allowing(hosts=PARTNER), resolver=resolver)
    network.permitted = frozenset({("127.0.0.1", server.port)})

    # When the redirect back to the same name is followed
    network.armed = True
    with pytest.raises(SsrfRefused) as caught:
        client.call(
            follow(f"http://hooks.partner.example:{server.port}/start"), idempotency_key=KEY
        )
    network.armed = False

    # Then the rebound answer is refused, and the metadata address was never connected to
    assert caught.value.reason == RefusalReason.CLOUD_METADATA
    assert network.connects() == [repr(("127.0.0.1", server.port))]
    assert len(resolver.calls) == 2
