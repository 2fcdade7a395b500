"""SSRF decisions: may this worker send a request to this URL? Pure functions, no I/O.

The guarded HTTP client asks three questions, in order, for the first request and for every
redirect hop:

1. :func:`parse_url` -- is the URL acceptable at all? Only ``http``/``https``; no userinfo
   (``http://user@host``, ``http://evil.com@127.0.0.1``); no backslashes, whitespace or control
   characters (parsers disagree about them); a non-empty host and a valid port. The host is
   normalised: IPv4 literals in any spelling the C resolver accepts (``2130706433``,
   ``0177.0.0.1``, ``0x7f.1``, ``127.1``) become the address they denote; IPv6 literals lose
   their brackets and zone id; names are lower-cased, IDNA-encoded and lose a trailing dot.
2. :func:`classify` -- is an address public? Loopback, RFC 1918, link-local (cloud metadata),
   CGNAT, multicast, unspecified, broadcast, reserved, benchmarking, documentation, IPv6
   unique-local and site-local, Teredo are refused; IPv4 embedded in IPv6 (mapped, compatible,
   NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is classified by the IPv4 address it carries.
   ``ipaddress.is_global`` is the final net for anything the explicit table does not name.
3. :func:`vet_addresses` -- given the addresses the host resolved to, is *every* one
   acceptable? The caller then connects to the returned address, never resolving again.

Allowlist (:class:`AllowList`, from settings):

* ``networks`` open addresses: an address inside an allowlisted network is accepted whatever
  its class (tests open ``127.0.0.1/32`` that way). For IPv4-mapped IPv6 the embedded IPv4
  address is matched too.
* ``hosts`` open names: a URL whose host is listed (exact match, case-insensitive, trailing dot
  ignored) skips the address check -- the operator vouches for the name and whatever it
  resolves to. It must still resolve, and the connection still goes to the resolved address.
  An IP literal in ``hosts`` is treated as a single-address network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills.errors import SsrfRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port)`` -> the addresses ``host`` resolves to, as text."""

Scheme = Literal["http", "https"]
DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}


class RefusalReason(StrEnum):
    """Why a URL or an address was refused."""

    SCHEME = "scheme-not-allowed"
    USERINFO = "userinfo-in-url"
    BACKSLASH = "backslash-in-url"
    CONTROL_CHARACTER = "control-character-in-url"
    MALFORMED = "malformed-url"
    EMPTY_HOST = "empty-host"
    INVALID_HOST = "invalid-host"
    INVALID_PORT = "invalid-port"
    LOCALHOST_NAME = "localhost-name"
    NO_ADDRESS = "no-address"
    ZONE_ID = "ipv6-zone-id"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    CLOUD_METADATA = "cloud-metadata"
    CGNAT = "cgnat"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    THIS_NETWORK = "this-network"
    BROADCAST = "broadcast"
    RESERVED = "reserved"
    BENCHMARKING = "benchmarking"
    DOCUMENTATION = "documentation"
    PROTOCOL_ASSIGNMENT = "ietf-protocol-assignment"
    UNIQUE_LOCAL = "unique-local"
    SITE_LOCAL = "site-local"
    TEREDO = "teredo"
    NON_GLOBAL = "non-global"


@dataclass(frozen=True)
class Verdict:
    """The answer of :func:`classify`: allowed, or refused with a reason.

    ``via`` names the IPv6 form that carried an embedded IPv4 address (``"nat64"``, ...).
    """

    reason: RefusalReason | None = None
    subject: str = ""
    via: str | None = None

    @property
    def allowed(self) -> bool:
        """True when nothing was refused."""
        return self.reason is None

    def describe(self) -> str:
        """What was judged, e.g. ``127.0.0.1 (in ::ffff:7f00:1) via ipv4-mapped``."""
        via = f" via {self.via}" if self.via else ""
        return f"{self.subject}{via}"


ALLOWED = Verdict()


def _refuse(reason: RefusalReason, subject: str = "", via: str | None = None) -> SsrfRefused:
    return SsrfRefused(Verdict(reason, subject, via))


def _v4(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def _v6(cidr: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(cidr)


# Checked in order; the first match names the reason. Cloud metadata comes before the broader
# ranges that contain it so the reason is specific.
_IPV4_TABLE: tuple[tuple[ipaddress.IPv4Network, RefusalReason], ...] = (
    (_v4("169.254.169.254/32"), RefusalReason.CLOUD_METADATA),  # AWS, GCP, Azure, OpenStack
    (_v4("169.254.170.2/32"), RefusalReason.CLOUD_METADATA),  # AWS ECS task metadata
    (_v4("100.100.100.200/32"), RefusalReason.CLOUD_METADATA),  # Alibaba Cloud
    (_v4("192.0.0.192/32"), RefusalReason.CLOUD_METADATA),  # Oracle Cloud
    (_v4("168.63.129.16/32"), RefusalReason.CLOUD_METADATA),  # Azure wireserver (public range!)
    (_v4("0.0.0.0/32"), RefusalReason.UNSPECIFIED),
    (_v4("0.0.0.0/8"), RefusalReason.THIS_NETWORK),
    (_v4("127.0.0.0/8"), RefusalReason.LOOPBACK),
    (_v4("10.0.0.0/8"), RefusalReason.PRIVATE),
    (_v4("172.16.0.0/12"), RefusalReason.PRIVATE),
    (_v4("192.168.0.0/16"), RefusalReason.PRIVATE),
    (_v4("169.254.0.0/16"), RefusalReason.LINK_LOCAL),
    (_v4("100.64.0.0/10"), RefusalReason.CGNAT),
    (_v4("192.0.0.0/24"), RefusalReason.PROTOCOL_ASSIGNMENT),
    (_v4("192.0.2.0/24"), RefusalReason.DOCUMENTATION),
    (_v4("198.51.100.0/24"), RefusalReason.DOCUMENTATION),
    (_v4("203.0.113.0/24"), RefusalReason.DOCUMENTATION),
    (_v4("198.18.0.0/15"), RefusalReason.BENCHMARKING),
    (_v4("192.88.99.0/24"), RefusalReason.RESERVED),  # deprecated 6to4 relay anycast
    (_v4("224.0.0.0/4"), RefusalReason.MULTICAST),
    (_v4("255.255.255.255/32"), RefusalReason.BROADCAST),
    (_v4("240.0.0.0/4"), RefusalReason.RESERVED),
)

_IPV6_TABLE: tuple[tuple[ipaddress.IPv6Network, RefusalReason], ...] = (
    (_v6("fd00:ec2::254/128"), RefusalReason.CLOUD_METADATA),  # AWS IMDS over IPv6
    (_v6("::/128"), RefusalReason.UNSPECIFIED),
    (_v6("::1/128"), RefusalReason.LOOPBACK),
    (_v6("fc00::/7"), RefusalReason.UNIQUE_LOCAL),
    (_v6("fe80::/10"), RefusalReason.LINK_LOCAL),
    (_v6("fec0::/10"), RefusalReason.SITE_LOCAL),
    (_v6("ff00::/8"), RefusalReason.MULTICAST),
    (_v6("2001::/32"), RefusalReason.TEREDO),
    (_v6("2001:db8::/32"), RefusalReason.DOCUMENTATION),
    (_v6("3fff::/20"), RefusalReason.DOCUMENTATION),
    (_v6("2001:2::/48"), RefusalReason.BENCHMARKING),
    (_v6("64:ff9b:1::/48"), RefusalReason.RESERVED),  # local-use NAT64 (RFC 8215)
    (_v6("100::/64"), RefusalReason.RESERVED),  # discard-only
    (_v6("2001:10::/28"), RefusalReason.RESERVED),  # ORCHID
    (_v6("2001:20::/28"), RefusalReason.RESERVED),  # ORCHIDv2
    (_v6("5f00::/16"), RefusalReason.RESERVED),  # SRv6 SIDs
)

_NAT64 = _v6("64:ff9b::/96")
_IPV4_COMPATIBLE = _v6("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries, and the form that carries it."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "ipv4-mapped"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "nat64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    # ``::`` and ``::1`` live in ::/96 too; the table names them first.
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "ipv4-compatible"
    return None


def _classify_v4(ip: ipaddress.IPv4Address) -> RefusalReason | None:
    for network, reason in _IPV4_TABLE:
        if ip in network:
            return reason
    return None if ip.is_global else RefusalReason.NON_GLOBAL


def _classify_v6_own(ip: ipaddress.IPv6Address) -> RefusalReason | None:
    for network, reason in _IPV6_TABLE:
        if ip in network:
            return reason
    return None


def _in_networks(ip: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def _classify_v6(ip: ipaddress.IPv6Address, networks: tuple[IPNetwork, ...]) -> Verdict:
    own = _classify_v6_own(ip)
    if own is not None:
        return Verdict(own, str(ip))
    embedded = _embedded_ipv4(ip)
    if embedded is None:
        return ALLOWED if ip.is_global else Verdict(RefusalReason.NON_GLOBAL, str(ip))
    inner, via = embedded
    if via == "ipv4-mapped" and _in_networks(inner, networks):
        return ALLOWED
    reason = _classify_v4(inner)
    return ALLOWED if reason is None else Verdict(reason, f"{inner} (in {ip})", via)


def classify(ip: IPAddress, allow_networks: Iterable[IPNetwork] = ()) -> Verdict:
    """Is ``ip`` a public address (or inside an allowlisted network)?

    IPv6 addresses that embed an IPv4 address are judged by the embedded address; an
    allowlisted network opens the address itself, and for IPv4-mapped addresses (which reach
    the very same IPv4 host) the embedded address too.
    """
    networks = tuple(allow_networks)
    if _in_networks(ip, networks):
        return ALLOWED
    if isinstance(ip, ipaddress.IPv4Address):
        reason = _classify_v4(ip)
        return ALLOWED if reason is None else Verdict(reason, str(ip))
    return _classify_v6(ip, networks)


# --- URL parsing -------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_DEC = frozenset("0123456789")
_OCT = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")


@dataclass(frozen=True)
class UrlTarget:
    """A URL that passed :func:`parse_url`, normalised.

    ``host`` is a lower-case ASCII name, or the canonical text of ``ip`` when the URL host is
    an address literal (IPv6 without brackets). ``path`` includes the query; the fragment is
    dropped (it is never sent).
    """

    scheme: Scheme
    host: str
    port: int
    path: str
    ip: IPAddress | None = None
    zone_id: str | None = field(default=None, compare=False)

    @property
    def authority(self) -> str:
        """``host[:port]`` as it appears in a URL and the Host header (default port omitted)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The canonical URL: what is actually requested."""
        return f"{self.scheme}://{self.authority}{self.path}"

    @property
    def redacted_url(self) -> str:
        """The URL without its query string, safe for records (queries often carry keys)."""
        return f"{self.scheme}://{self.authority}{self.path.split('?', 1)[0]}"

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port): credentials never cross an origin on redirect."""
        return (self.scheme, self.host, self.port)


def _ipv4_number(part: str) -> int | None:
    """One dotted part as inet_aton reads it (0x hex, leading-zero octal), or None."""
    if part[:2] in ("0x", "0X"):
        digits, base, charset = part[2:], 16, _HEX
    elif len(part) > 1 and part[0] == "0":
        digits, base, charset = part[1:], 8, _OCT
    else:
        digits, base, charset = part, 10, _DEC
    if digits == "":
        return 0 if base == 16 else None
    if not set(digits) <= charset:
        return None
    return int(digits, base)


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way the C resolver and browsers read IPv4 (WHATWG "IPv4 parser").

    Returns None when ``host`` is a name (its last label is not a number). Raises
    :class:`SsrfRefused` when it looks like a number but is not a valid address
    (``1.2.3.256``, ``1.2.3.4.5``): different parsers would read it differently.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    numbers = [_ipv4_number(part) for part in parts]
    if numbers[-1] is None:
        return None
    checked = [n for n in numbers if n is not None]
    if len(checked) != len(numbers) or len(numbers) > 4:
        raise _refuse(RefusalReason.INVALID_HOST, host)
    *head, last = checked
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(checked)):
        raise _refuse(RefusalReason.INVALID_HOST, host)
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_bracketed(literal: str) -> tuple[ipaddress.IPv6Address, str | None]:
    """``[...]`` contents: an IPv6 address, maybe with a zone id (``%25eth0`` or ``%eth0``)."""
    address, _, zone = literal.partition("%")
    if zone.startswith("25"):
        zone = zone[2:]
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise _refuse(RefusalReason.INVALID_HOST, f"[{literal}]") from None
    return ip, (zone or None) if "%" in literal else None


def _normalise_name(host: str) -> str:
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(RefusalReason.INVALID_HOST, host) from None
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def parse_host(host: str) -> tuple[str, IPAddress | None]:
    """A URL host (without brackets or port) -> (normalised host, address if a literal)."""
    if host == "":
        raise _refuse(RefusalReason.EMPTY_HOST)
    if "%" in host:
        raise _refuse(RefusalReason.INVALID_HOST, host)
    name = _normalise_name(host)
    if name == "":
        raise _refuse(RefusalReason.EMPTY_HOST)
    ip = parse_ipv4_loose(name)
    if ip is not None:
        return str(ip), ip
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise _refuse(RefusalReason.INVALID_HOST, host)
    return name, None


def _split_authority(netloc: str) -> tuple[str, str | None, bool]:
    """netloc -> (host text, port text or None, bracketed?)."""
    if netloc.startswith("["):
        literal, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _refuse(RefusalReason.MALFORMED, netloc)
        return literal, (rest[1:] if rest else None), True
    if netloc.count(":") > 1:
        raise _refuse(RefusalReason.MALFORMED, netloc)
    host, colon, port = netloc.partition(":")
    return host, (port if colon else None), False


def _parse_port(text: str | None, scheme: Scheme) -> int:
    if text is None or text == "":
        return DEFAULT_PORTS[scheme]
    if not set(text) <= _DEC or len(text) > 5 or not 0 < int(text) < 65536:
        raise _refuse(RefusalReason.INVALID_PORT, text)
    return int(text)


def _check_characters(url: str) -> None:
    if "\\" in url:
        raise _refuse(RefusalReason.BACKSLASH)
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise _refuse(RefusalReason.CONTROL_CHARACTER)


def _scheme(text: str) -> Scheme:
    lowered = text.lower()
    if lowered == "http":
        return "http"
    if lowered == "https":
        return "https"
    raise _refuse(RefusalReason.SCHEME, f"scheme {lowered!r}" if lowered else "scheme ''")


def parse_url(url: str) -> UrlTarget:
    """Accept or refuse a URL on its text alone; see the module docstring for the rules.

    Raises :class:`SsrfRefused`. An address literal is parsed but not yet classified.
    """
    _check_characters(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _refuse(RefusalReason.MALFORMED) from None
    scheme = _scheme(parts.scheme)
    if "@" in parts.netloc:
        raise _refuse(RefusalReason.USERINFO)
    host_text, port_text, bracketed = _split_authority(parts.netloc)
    port = _parse_port(port_text, scheme)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if bracketed:
        ip6, zone = _parse_bracketed(host_text)
        return UrlTarget(scheme, str(ip6), port, path, ip6, zone)
    host, ip = parse_host(host_text)
    return UrlTarget(scheme, host, port, path, ip)


# --- Allowlist and the final decision -------------------------------------------------------


@dataclass(frozen=True)
class AllowList:
    """Networks and host names opened by the operator (see the module docstring)."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, networks: Iterable[str] = (), hosts: Iterable[str] = ()) -> AllowList:
        """Build from settings text; raises :class:`InvalidInput` naming the bad entry."""
        nets: list[IPNetwork] = []
        for entry in networks:
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise InvalidInput(
                    f"not a network: {entry!r}", field="http_allow_networks"
                ) from None
        names: set[str] = set()
        for entry in hosts:
            try:
                name, ip = parse_host(entry.strip())
            except SsrfRefused:
                raise InvalidInput(
                    f"not a host name: {entry!r}", field="http_allow_hosts"
                ) from None
            if ip is None:
                names.add(name)
            else:
                nets.append(ipaddress.ip_network(ip))
        return cls(tuple(nets), frozenset(names))

    def host_allowed(self, host: str) -> bool:
        """Is this (normalised) host name listed?"""
        return host in self.hosts


@dataclass(frozen=True)
class PinnedTarget:
    """A vetted URL and the address to connect to -- the one that was checked."""

    target: UrlTarget
    address: IPAddress

    @property
    def address_text(self) -> str:
        """The address as a URL/pool host (IPv6 without brackets)."""
        return str(self.address)


def _is_localhost_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def check_target(target: UrlTarget, allow: AllowList) -> None:
    """Decisions that need no resolution: literal addresses, zone ids, ``localhost`` names."""
    if target.ip is not None:
        verdict = classify(target.ip, allow.networks)
        if not verdict.allowed:
            raise SsrfRefused(verdict)
        if target.zone_id is not None:
            raise _refuse(RefusalReason.ZONE_ID, f"[{target.host}%{target.zone_id}]")
        return
    if _is_localhost_name(target.host) and not allow.host_allowed(target.host):
        raise _refuse(RefusalReason.LOCALHOST_NAME, target.host)


def _parse_resolved(text: str) -> IPAddress:
    # getaddrinfo appends a zone to link-local IPv6 results; the zone does not change the class.
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise _refuse(RefusalReason.NO_ADDRESS, f"unparsable resolver answer {text!r}") from None


def vet_addresses(target: UrlTarget, addresses: Sequence[str], allow: AllowList) -> IPAddress:
    """Check *every* address ``target.host`` resolved to; return the one to connect to.

    Refuses when the list is empty or when any address is refused -- a name that resolves to
    one public and one private address is refused, since the connection could use either.
    """
    if not addresses:
        raise _refuse(RefusalReason.NO_ADDRESS, target.host)
    parsed = [_parse_resolved(text) for text in addresses]
    if not allow.host_allowed(target.host):
        for ip in parsed:
            verdict = classify(ip, allow.networks)
            if not verdict.allowed:
                subject = f"{target.host} -> {verdict.subject}"
                raise SsrfRefused(Verdict(verdict.reason, subject, verdict.via))
    return parsed[0]


def vet_url(url: str, allow: AllowList, resolver: Resolver) -> PinnedTarget:
    """Parse, check and resolve ``url``: the single decision the HTTP client asks for.

    ``resolver`` is only called for names; address literals are never resolved.
    Resolver errors (``OSError``) propagate to the caller, which decides how to report them.
    """
    target = parse_url(url)
    check_target(target, allow)
    if target.ip is not None:
        return PinnedTarget(target, target.ip)
    return PinnedTarget(target, vet_addresses(target, resolver(target.host, target.port), allow))
