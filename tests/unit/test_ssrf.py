"""SSRF decisions, without any network traffic: every address here is only classified."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

import pytest

from gathering_tasks.errors import InvalidInput, PermanentFailure
from gathering_tasks.skills.errors import SsrfRefused
from gathering_tasks.skills.ssrf import (
    AllowList,
    RefusalReason,
    classify,
    parse_ipv4_loose,
    parse_url,
    vet_url,
)

R = RefusalReason


class FakeResolver:
    """Answers from a table and records every question; unknown names are a test bug."""

    def __init__(self, table: Mapping[str, Sequence[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        return self.table[host]


DNS = {
    "rebind.test": ["127.0.0.1"],
    "mixed.test": ["93.184.216.34", "10.0.0.5"],
    "metadata.google.internal": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "v6local.test": ["fe80::1%eth0"],
    "empty.test": [],
    "public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
}

# (url, reason): each is refused under the default (empty) allowlist.
BYPASSES: list[tuple[str, RefusalReason]] = [
    ("http://127.0.0.1/", R.LOOPBACK),
    ("http://2130706433/", R.LOOPBACK),
    ("http://0177.0.0.1/", R.LOOPBACK),
    ("http://017700000001/", R.LOOPBACK),
    ("http://0x7f.1/", R.LOOPBACK),
    ("http://0x7f000001/", R.LOOPBACK),
    ("http://0x7f.0x0.0x0.0x1/", R.LOOPBACK),
    ("http://127.1/", R.LOOPBACK),
    ("http://127.0.1/", R.LOOPBACK),
    ("http://127.000.000.001/", R.LOOPBACK),
    ("http://127.0.0.1./", R.LOOPBACK),
    ("http://\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11/", R.LOOPBACK),
    ("http://127.0.0.1#@evil.com/", R.LOOPBACK),
    ("http://0.0.0.0/", R.UNSPECIFIED),
    ("http://0/", R.UNSPECIFIED),
    ("http://0.1.2.3/", R.THIS_NETWORK),
    ("http://10.0.0.1/", R.PRIVATE),
    ("http://012.0.0.1/", R.PRIVATE),
    ("http://172.16.0.1/", R.PRIVATE),
    ("http://192.168.1.1/", R.PRIVATE),
    ("http://3232235777/", R.PRIVATE),
    ("http://169.254.169.254/", R.CLOUD_METADATA),
    ("http://0xa9fea9fe/", R.CLOUD_METADATA),
    ("http://2852039166/", R.CLOUD_METADATA),
    ("http://0251.0376.0251.0376/", R.CLOUD_METADATA),
    ("http://169.254.43518/", R.CLOUD_METADATA),
    ("http://168.63.129.16/", R.CLOUD_METADATA),
    ("http://100.100.100.200/", R.CLOUD_METADATA),
    ("http://169.254.1.1/", R.LINK_LOCAL),
    ("http://100.64.0.1/", R.CGNAT),
    ("http://224.0.0.1/", R.MULTICAST),
    ("http://255.255.255.255/", R.BROADCAST),
    ("http://240.0.0.1/", R.RESERVED),
    ("http://198.18.0.1/", R.BENCHMARKING),
    ("http://192.0.2.1/", R.DOCUMENTATION),
    ("http://192.0.0.8/", R.PROTOCOL_ASSIGNMENT),
    ("http://[::1]/", R.LOOPBACK),
    ("http://[0:0:0:0:0:0:0:1]:8080/", R.LOOPBACK),
    ("http://[::]/", R.UNSPECIFIED),
    ("http://[::ffff:127.0.0.1]/", R.LOOPBACK),
    ("http://[::ffff:7f00:1]/", R.LOOPBACK),
    ("http://[::ffff:169.254.169.254]/", R.CLOUD_METADATA),
    ("http://[::7f00:1]/", R.LOOPBACK),
    ("http://[64:ff9b::7f00:1]/", R.LOOPBACK),
    ("http://[64:ff9b::a9fe:a9fe]/", R.CLOUD_METADATA),
    ("http://[64:ff9b:1::1]/", R.RESERVED),
    ("http://[2002:7f00:1::]/", R.LOOPBACK),
    ("http://[2002:c0a8:101::1]/", R.PRIVATE),
    ("http://[fe80::1%25eth0]/", R.LINK_LOCAL),
    ("http://[fe80::1]/", R.LINK_LOCAL),
    ("http://[fc00::1]/", R.UNIQUE_LOCAL),
    ("http://[fd12::1]/", R.UNIQUE_LOCAL),
    ("http://[fd00:ec2::254]/", R.CLOUD_METADATA),
    ("http://[fec0::1]/", R.SITE_LOCAL),
    ("http://[ff02::1]/", R.MULTICAST),
    ("http://[2001:db8::1]/", R.DOCUMENTATION),
    ("http://[2001::1]/", R.TEREDO),
    # IPv4-translated (SIIT, ::ffff:0:0:0/96) carries an IPv4 address like the other forms
    ("http://[::ffff:0:7f00:1]/", R.LOOPBACK),
    ("http://[::ffff:0:a9fe:a9fe]/", R.CLOUD_METADATA),
    ("http://[::ffff:0:a00:1]/", R.PRIVATE),
    ("http://[::ffff:0:127.0.0.1]/", R.LOOPBACK),
    ("http://evil.com@127.0.0.1/", R.USERINFO),
    ("http://user@example.com/", R.USERINFO),
    ("http://user:pass@example.com/", R.USERINFO),
    ("http://@example.com/", R.USERINFO),
    ("file:///etc/passwd", R.SCHEME),
    ("gopher://127.0.0.1:25/_HELO", R.SCHEME),
    ("ftp://example.com/", R.SCHEME),
    ("dict://127.0.0.1:11211/stats", R.SCHEME),
    ("//example.com/", R.SCHEME),
    ("http://127.0.0.1:80\\@good.com/", R.BACKSLASH),
    ("http:\\\\127.0.0.1\\", R.BACKSLASH),
    ("http://example.com\t/", R.CONTROL_CHARACTER),
    ("http://exa mple.com/", R.CONTROL_CHARACTER),
    ("http:///path", R.EMPTY_HOST),
    ("http://:80/", R.EMPTY_HOST),
    ("http:", R.EMPTY_HOST),
    ("http://%31%32%37.0.0.1/", R.INVALID_HOST),
    ("http://127.0.0.1.5/", R.INVALID_HOST),
    ("http://1.2.3.256/", R.INVALID_HOST),
    ("http://0x100000000/", R.INVALID_HOST),
    ("http://exa_mple..com/", R.INVALID_HOST),
    # Empty labels: one trailing dot is the root, a second one is not a host
    ("http://127.0.0.1../", R.INVALID_HOST),
    ("http://1.1.1.1../", R.INVALID_HOST),
    ("http://example.com../", R.INVALID_HOST),
    ("http://.example.com/", R.INVALID_HOST),
    ("http://[::1/", R.MALFORMED),
    ("http://::1/", R.MALFORMED),
    ("http://127.0.0.1:99999/", R.INVALID_PORT),
    ("http://127.0.0.1:0/", R.INVALID_PORT),
    ("http://127.0.0.1:+80/", R.INVALID_PORT),
    ("http://localhost/", R.LOCALHOST_NAME),
    ("HTTP://LOCALHOST:8080/", R.LOCALHOST_NAME),
    ("http://app.localhost/", R.LOCALHOST_NAME),
    ("http://rebind.test/", R.LOOPBACK),
    ("http://mixed.test/", R.PRIVATE),
    ("http://metadata.google.internal/computeMetadata/v1/", R.CLOUD_METADATA),
    ("http://mapped.test/", R.PRIVATE),
    ("http://v6local.test/", R.LINK_LOCAL),
    ("http://empty.test/", R.NO_ADDRESS),
]


@pytest.mark.parametrize(("url", "reason"), BYPASSES, ids=[url for url, _ in BYPASSES])
def test_bypass_attempt_is_refused_with_its_reason(url: str, reason: RefusalReason) -> None:
    # Given the default policy (nothing allowlisted)
    resolver = FakeResolver(DNS)

    # When the URL is vetted
    with pytest.raises(SsrfRefused) as caught:
        vet_url(url, AllowList(), resolver)

    # Then it is refused, permanently, and the message names the reason
    assert caught.value.reason == reason
    assert f"({reason})" in str(caught.value)
    assert isinstance(caught.value, PermanentFailure)


def test_there_are_at_least_thirty_bypass_attempts() -> None:
    assert len(BYPASSES) >= 30


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://[::1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://localhost/",
        "http://evil.com@127.0.0.1/",
    ],
)
def test_literals_and_bad_urls_are_refused_without_asking_the_resolver(url: str) -> None:
    resolver = FakeResolver(DNS)
    with pytest.raises(SsrfRefused):
        vet_url(url, AllowList(), resolver)
    assert resolver.calls == []


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2002:5db8:d822::1",  # 6to4 of a public address
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "::ffff:8.8.8.8",
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    verdict = classify(ipaddress.ip_address(address))
    assert verdict.allowed
    assert verdict.reason is None


def test_public_name_is_pinned_to_its_first_checked_address() -> None:
    # Given a name with only public addresses (classified, never contacted)
    resolver = FakeResolver(DNS)

    # When vetted
    pinned = vet_url("https://Public.Test./v1/items?x=1#frag", AllowList(), resolver)

    # Then the connection address is one that was checked, and the URL is canonical
    assert pinned.address == ipaddress.ip_address("93.184.216.34")
    assert pinned.target.host == "public.test"
    assert pinned.target.url == "https://public.test/v1/items?x=1"
    assert pinned.target.redacted_url == "https://public.test/v1/items"
    assert resolver.calls == [("public.test", 443)]


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("http://2130706433:8080/a?b", "http://127.0.0.1:8080/a?b"),
        ("http://0x7f.1/", "http://127.0.0.1/"),
        ("http://[::ffff:7f00:1]/", "http://[::ffff:7f00:1]/"),
        ("http://127.0.0.1", "http://127.0.0.1/"),
    ],
)
def test_allowlisted_loopback_network_opens_every_spelling(url: str, canonical: str) -> None:
    # Given 127.0.0.0/8 allowlisted (how tests open loopback)
    allow = AllowList.parse(networks=["127.0.0.0/8"])

    # When a loopback URL in any spelling is vetted
    pinned = vet_url(url, allow, FakeResolver())

    # Then it is allowed and requested in its canonical form
    assert pinned.target.url == canonical


def test_allowlisted_network_opens_only_itself() -> None:
    allow = AllowList.parse(networks=["127.0.0.0/8"])
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://10.0.0.1/", allow, FakeResolver())
    assert caught.value.reason == R.PRIVATE
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://169.254.169.254/", allow, FakeResolver())
    assert caught.value.reason == R.CLOUD_METADATA


def test_allowlisted_network_opens_names_resolving_into_it() -> None:
    allow = AllowList.parse(networks=["127.0.0.1/32"])
    pinned = vet_url("http://rebind.test:8080/", allow, FakeResolver(DNS))
    assert str(pinned.address) == "127.0.0.1"
    assert pinned.target.authority == "rebind.test:8080"


def test_allowlisted_host_may_resolve_to_any_class_but_must_resolve() -> None:
    # Given a host name allowlisted (case and trailing dot do not matter)
    allow = AllowList.parse(hosts=["Rebind.Test."])
    resolver = FakeResolver(DNS | {"other.test": ["127.0.0.1"], "gone.test": []})

    # Then the listed name may resolve to loopback (metadata: see below), another name may not,
    pinned = vet_url("http://rebind.test/", allow, resolver)
    assert str(pinned.address) == "127.0.0.1"
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://other.test/", allow, resolver)
    assert caught.value.reason == R.LOOPBACK

    # and a listed name that resolves to nothing is still refused
    gone = AllowList.parse(hosts=["gone.test"])
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://gone.test/", gone, resolver)
    assert caught.value.reason == R.NO_ADDRESS


def test_allowlisted_localhost_name_is_allowed() -> None:
    allow = AllowList.parse(hosts=["localhost"])
    pinned = vet_url("http://localhost:9000/", allow, FakeResolver({"localhost": ["127.0.0.1"]}))
    assert str(pinned.address) == "127.0.0.1"


def test_ip_literal_in_allowed_hosts_acts_as_a_single_address_network() -> None:
    allow = AllowList.parse(hosts=["127.0.0.1"])
    assert vet_url("http://127.1/", allow, FakeResolver()).target.host == "127.0.0.1"
    with pytest.raises(SsrfRefused):
        vet_url("http://127.0.0.2/", allow, FakeResolver())


def test_zone_id_is_refused_even_when_its_network_is_allowlisted() -> None:
    allow = AllowList.parse(networks=["fe80::/10"])
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://[fe80::1%25eth0]/", allow, FakeResolver())
    assert caught.value.reason == R.ZONE_ID


@pytest.mark.parametrize(
    ("networks", "hosts", "field"),
    [
        (["not-a-cidr"], [], "http_allow_networks"),
        (["10.0.0.0/33"], [], "http_allow_networks"),
        ([], ["bad host"], "http_allow_hosts"),
    ],
)
def test_bad_allowlist_entries_are_invalid_input(
    networks: list[str], hosts: list[str], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        AllowList.parse(networks, hosts)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("1.2.3.4.", "1.2.3.4"),
        ("example.com", None),
        ("1.2.3.example", None),
    ],
)
def test_ipv4_is_read_the_way_inet_aton_reads_it(host: str, expected: str | None) -> None:
    parsed = parse_ipv4_loose(host)
    assert (str(parsed) if parsed else None) == expected


def test_parse_url_normalises_names_and_keeps_the_port() -> None:
    target = parse_url("HTTPS://Example.COM.:8443/a/b?c=d#e")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "example.com",
        8443,
        "/a/b?c=d",
    )
    assert target.authority == "example.com:8443"
    assert target.ip is None


# --- what no allowlist opens: cloud metadata, the unspecified address ---------------------

METADATA_LITERALS = [
    "http://169.254.169.254/",
    "http://0xa9fea9fe/",
    "http://169.254.170.2/",
    "http://169.254.170.23/",
    "http://169.254.0.23/",
    "http://100.100.100.200/",
    "http://192.0.0.192/",
    "http://168.63.129.16/",
    "http://[fd00:ec2::254]/",
    "http://[fd00:ec2::23]/",
    "http://[fd20:ce::254]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:0:a9fe:a9fe]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::]/",
    "http://[::a9fe:a9fe]/",
]


@pytest.mark.parametrize("url", METADATA_LITERALS)
def test_metadata_is_refused_under_an_allowlist_of_everything(url: str) -> None:
    # Given every IPv4 and IPv6 address allowlisted
    allow = AllowList.parse(networks=["0.0.0.0/0", "::/0"])

    # When a cloud metadata address is vetted, in any form
    with pytest.raises(SsrfRefused) as caught:
        vet_url(url, allow, FakeResolver())

    # Then it is still refused as cloud metadata
    assert caught.value.reason == R.CLOUD_METADATA


@pytest.mark.parametrize("url", ["http://0.0.0.0/", "http://0/", "http://[::]/"])
def test_unspecified_address_is_refused_under_an_allowlist_of_everything(url: str) -> None:
    allow = AllowList.parse(networks=["0.0.0.0/0", "::/0"])
    with pytest.raises(SsrfRefused) as caught:
        vet_url(url, allow, FakeResolver())
    assert caught.value.reason == R.UNSPECIFIED


def test_an_allowlist_of_everything_still_opens_private_addresses() -> None:
    allow = AllowList.parse(networks=["0.0.0.0/0", "::/0"])
    assert str(vet_url("http://10.0.0.1/", allow, FakeResolver()).address) == "10.0.0.1"
    assert str(vet_url("http://[fd12::1]/", allow, FakeResolver()).address) == "fd12::1"


def test_the_dangerous_metadata_setting_opens_exactly_one_address() -> None:
    # Given the metadata override naming the AWS/GCP/Azure address
    allow = AllowList.parse(metadata_address="169.254.169.254")

    # Then that address is open, by literal and by a name resolving to it
    assert str(vet_url("http://169.254.169.254/latest/", allow, FakeResolver()).address) == (
        "169.254.169.254"
    )
    pinned = vet_url("http://metadata.google.internal/", allow, FakeResolver(DNS))
    assert str(pinned.address) == "169.254.169.254"
    # And no other metadata address, nor its other spellings, nor its link-local neighbours
    for url in ("http://169.254.170.2/", "http://[fd00:ec2::254]/", "http://[64:ff9b::a9fe:a9fe]/"):
        with pytest.raises(SsrfRefused) as caught:
            vet_url(url, allow, FakeResolver())
        assert caught.value.reason == R.CLOUD_METADATA
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://169.254.169.253/", allow, FakeResolver())
    assert caught.value.reason == R.LINK_LOCAL


@pytest.mark.parametrize("address", ["10.0.0.1", "8.8.8.8", "0.0.0.0", "not-an-address"])
def test_the_dangerous_metadata_setting_only_takes_a_metadata_address(address: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        AllowList.parse(metadata_address=address)
    assert caught.value.field == "http_allow_metadata_address_i_know_this_is_dangerous"


# --- allowlisted names are still vetted against what nothing opens -----------------------


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["169.254.169.254"], R.CLOUD_METADATA),
        (["fd00:ec2::254"], R.CLOUD_METADATA),
        (["::ffff:169.254.169.254"], R.CLOUD_METADATA),
        (["93.184.216.34", "169.254.169.254"], R.CLOUD_METADATA),
        (["0.0.0.0"], R.UNSPECIFIED),
        (["::"], R.UNSPECIFIED),
    ],
)
def test_allowlisted_host_resolving_to_metadata_is_refused(
    answers: list[str], reason: RefusalReason
) -> None:
    # Given a partner's host name allowlisted, and DNS answering a metadata address
    allow = AllowList.parse(hosts=["hooks.partner.example"])
    resolver = FakeResolver({"hooks.partner.example": answers})

    # When it is vetted
    with pytest.raises(SsrfRefused) as caught:
        vet_url("https://hooks.partner.example/in", allow, resolver)

    # Then the answer is refused: the operator vouched for the name, not for metadata
    assert caught.value.reason == reason
    assert "hooks.partner.example" in str(caught.value)


# --- ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "hosts", "url", "allowed"),
    [
        (["10.1.2.3:8443"], [], "https://10.1.2.3:8443/", True),
        (["10.1.2.3:8443"], [], "https://10.1.2.3/", False),
        (["10.1.2.3:8443"], [], "http://10.1.2.3:6379/", False),
        (["10.0.0.0/8:80-443"], [], "http://10.9.9.9/", True),
        (["10.0.0.0/8:80-443"], [], "https://10.9.9.9/", True),
        (["10.0.0.0/8:80-443"], [], "http://10.9.9.9:444/", False),
        (["10.0.0.0/8:80-443"], [], "http://10.9.9.9:79/", False),
        (["[::1]:8080"], [], "http://[::1]:8080/", True),
        (["[::1]:8080"], [], "http://[::1]:8081/", False),
        (["[fd00::/8]:443"], [], "https://[fd12::1]/", True),
        (["[fd00::/8]:443"], [], "http://[fd12::1]/", False),
        (["::1/128"], [], "http://[::1]:5432/", True),  # no port: every port (as before)
        (["127.0.0.1/32"], [], "http://127.0.0.1:6379/", True),
        (["127.0.0.1:8443"], [], "http://[::ffff:127.0.0.1]:8443/", True),
        (["127.0.0.1:8443"], [], "http://[::ffff:127.0.0.1]:6379/", False),
        ([], ["127.0.0.1:9000"], "http://127.0.0.1:9000/", True),
        ([], ["127.0.0.1:9000"], "http://127.0.0.1:9001/", False),
        ([], ["localhost:9000"], "http://localhost:9000/", True),
        ([], ["localhost:9000"], "http://localhost:9001/", False),
        ([], ["api.internal:443"], "https://api.internal/", True),
        ([], ["api.internal:443"], "https://api.internal:8443/", False),
        ([], ["api.internal:443"], "http://api.internal/", False),
    ],
)
def test_allowlist_entries_open_only_their_ports(
    networks: list[str], hosts: list[str], url: str, allowed: bool
) -> None:
    allow = AllowList.parse(networks, hosts)
    resolver = FakeResolver({"api.internal": ["10.0.0.5"], "localhost": ["127.0.0.1"]})
    if allowed:
        vet_url(url, allow, resolver)
        return
    with pytest.raises(SsrfRefused) as caught:
        vet_url(url, allow, resolver)
    assert caught.value.reason in (R.PORT_NOT_ALLOWED, R.PRIVATE, R.LOCALHOST_NAME)


def test_an_address_open_on_another_port_says_so() -> None:
    allow = AllowList.parse(networks=["127.0.0.1:8443"])
    with pytest.raises(SsrfRefused) as caught:
        vet_url("http://127.0.0.1:6379/", allow, FakeResolver())
    assert caught.value.reason == R.PORT_NOT_ALLOWED
    assert "127.0.0.1:6379" in str(caught.value)


@pytest.mark.parametrize(
    ("networks", "hosts", "field"),
    [
        (["10.0.0.0/8:0"], [], "http_allow_networks"),
        (["10.0.0.0/8:65536"], [], "http_allow_networks"),
        (["10.0.0.0/8:443-80"], [], "http_allow_networks"),
        (["10.0.0.0/8:http"], [], "http_allow_networks"),
        (["10.0.0.0/8:"], [], "http_allow_networks"),
        (["[::1]:x"], [], "http_allow_networks"),
        (["[::1"], [], "http_allow_networks"),
        (["api.internal:443"], [], "http_allow_networks"),
        ([], ["api.internal:99999"], "http_allow_hosts"),
        ([], ["api..internal"], "http_allow_hosts"),
    ],
)
def test_bad_port_entries_are_invalid_input(
    networks: list[str], hosts: list[str], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        AllowList.parse(networks, hosts)
    assert caught.value.field == field


# --- messages that quote input are bounded ------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 100_000 + "/",
        "http://" + "a" * 100_000 + ".com:80/",
        "http://[" + "1" * 100_000 + "]/",
        "http://" + "1." * 50_000 + "1/",
        "http://x:" + "1" * 100_000 + "/",
        "http://" + "a:" * 50_000 + "/",
        "x" * 100_000 + "://example.com/",
        "http://" + "\u00e9" * 100_000 + "/",
    ],
)
def test_refusal_messages_quoting_input_are_bounded(url: str) -> None:
    with pytest.raises(SsrfRefused) as caught:
        vet_url(url, AllowList(), FakeResolver())
    assert len(str(caught.value)) <= 300


def test_allowlist_entry_errors_are_bounded() -> None:
    with pytest.raises(InvalidInput) as caught:
        AllowList.parse(networks=["x" * 100_000])
    assert len(str(caught.value)) <= 300
