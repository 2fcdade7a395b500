"""What the operator opens to the guarded HTTP client: the allowlist settings, parsed. No I/O.

Entries take an optional port or port range after the host (IPv6 in brackets when a port
follows)::

    GATHERING_HTTP_ALLOW_NETWORKS=10.1.2.3:8443,10.0.0.0/8:80-443,[::1]:8080,[fd00::/8]:443
    GATHERING_HTTP_ALLOW_HOSTS=api.internal:443,hooks.partner.example

* A **network** entry opens the addresses inside it, whatever their class (tests open
  ``127.0.0.1:<port>`` that way), on its ports -- for the literal URL host and for the
  addresses a name resolves to. For IPv4-mapped IPv6 (the very same IPv4 host) the embedded
  address is matched too.
* A **host** entry opens one name (exact match, case-insensitive, trailing dot ignored) on
  its ports: the name's resolved addresses may then be of any class *except* the ones no
  allowlist opens (cloud metadata, unspecified: see
  :func:`~gathering_tasks.skills.addresses.never_opened`). It must still resolve, and the
  connection still goes to the resolved, vetted address. An IP literal in the hosts list is
  a single-address network entry.
* An entry **without a port opens every port**, as entries did before ports existed: write
  the port (``127.0.0.1:8080``), or a redirect to Redis on the same host is followed too.
* No entry opens cloud metadata, however broad (``0.0.0.0/0``). Only
  ``GATHERING_HTTP_ALLOW_METADATA_ADDRESS_I_KNOW_THIS_IS_DANGEROUS`` opens one metadata
  address, exactly (not its other spellings, not its neighbours), on every port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills.addresses import METADATA_ADDRESSES
from gathering_tasks.skills.errors import SsrfRefused, bounded
from gathering_tasks.skills.urls import IPAddress, IPNetwork, parse_host

NETWORKS_FIELD = "http_allow_networks"
HOSTS_FIELD = "http_allow_hosts"
METADATA_FIELD = "http_allow_metadata_address_i_know_this_is_dangerous"
MAX_PORT = 65535


@dataclass(frozen=True)
class Ports:
    """An inclusive port range; the default is every port."""

    low: int = 1
    high: int = MAX_PORT

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


EVERY_PORT = Ports()


@dataclass(frozen=True)
class NetworkEntry:
    """Addresses of ``network``, on ``ports``."""

    network: IPNetwork
    ports: Ports = EVERY_PORT

    def covers(self, ip: IPAddress) -> bool:
        """Is ``ip`` in the network (on any port)?"""
        return ip.version == self.network.version and ip in self.network


@dataclass(frozen=True)
class HostEntry:
    """The host name ``name`` (normalised), on ``ports``."""

    name: str
    ports: Ports = EVERY_PORT


def _invalid(what: str, entry: str, field: str) -> InvalidInput:
    return InvalidInput(f"not {what}: {bounded(entry)!r}", field=field)


def _parse_ports(text: str, entry: str, field: str) -> Ports:
    low_text, dash, high_text = text.partition("-")
    texts = (low_text, high_text) if dash else (low_text, low_text)
    if not all(part.isascii() and part.isdigit() and len(part) <= 5 for part in texts):
        raise _invalid("a port or port range (443, 80-443)", entry, field)
    low, high = int(texts[0]), int(texts[1])
    if not 1 <= low <= high <= MAX_PORT:
        raise _invalid("a port range within 1-65535", entry, field)
    return Ports(low, high)


def _split_port(entry: str, field: str) -> tuple[str, Ports, bool]:
    """``entry`` -> (host text, ports, bracketed?). A bare IPv6 network has no port."""
    if entry.startswith("["):
        inner, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _invalid("an entry ([address]:port)", entry, field)
        return inner, (_parse_ports(rest[1:], entry, field) if rest else EVERY_PORT), True
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _parse_ports(port, entry, field), False
    return entry, EVERY_PORT, False


def _parse_network(entry: str) -> NetworkEntry:
    text, ports, _bracketed = _split_port(entry, NETWORKS_FIELD)
    try:
        return NetworkEntry(ipaddress.ip_network(text, strict=False), ports)
    except ValueError:
        raise _invalid("a network", entry, NETWORKS_FIELD) from None


def _parse_host(entry: str) -> NetworkEntry | HostEntry:
    text, ports, bracketed = _split_port(entry, HOSTS_FIELD)
    if bracketed:
        try:
            return NetworkEntry(ipaddress.ip_network(ipaddress.IPv6Address(text)), ports)
        except ValueError:
            raise _invalid("an IPv6 address", entry, HOSTS_FIELD) from None
    try:
        name, ip = parse_host(text)
    except SsrfRefused:
        raise _invalid("a host name", entry, HOSTS_FIELD) from None
    return HostEntry(name, ports) if ip is None else NetworkEntry(ipaddress.ip_network(ip), ports)


def _parse_metadata(text: str) -> IPAddress:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        raise _invalid("an address", text, METADATA_FIELD) from None
    if ip not in METADATA_ADDRESSES:
        known = ", ".join(sorted(str(address) for address in METADATA_ADDRESSES))
        raise InvalidInput(
            f"{bounded(text)!r} is not a cloud metadata address (one of: {known})",
            field=METADATA_FIELD,
        )
    return ip


@dataclass(frozen=True)
class AllowList:
    """Networks, host names and (dangerously) one metadata address opened by the operator."""

    networks: tuple[NetworkEntry, ...] = ()
    hosts: tuple[HostEntry, ...] = ()
    metadata_address: IPAddress | None = None

    @classmethod
    def parse(
        cls,
        networks: Iterable[str] = (),
        hosts: Iterable[str] = (),
        metadata_address: str | None = None,
    ) -> AllowList:
        """Build from settings text; raises :class:`InvalidInput` naming the bad entry."""
        nets = [_parse_network(entry.strip()) for entry in networks]
        names: list[HostEntry] = []
        for entry in hosts:
            parsed = _parse_host(entry.strip())
            if isinstance(parsed, HostEntry):
                names.append(parsed)
            else:
                nets.append(parsed)
        metadata = _parse_metadata(metadata_address) if metadata_address else None
        return cls(tuple(nets), tuple(names), metadata)

    def opens_address(self, ip: IPAddress, port: int) -> bool:
        """Does a network entry open ``ip`` on ``port``?"""
        return any(entry.covers(ip) and port in entry.ports for entry in self.networks)

    def covers_address(self, ip: IPAddress) -> bool:
        """Does a network entry name ``ip``, on whatever port?"""
        return any(entry.covers(ip) for entry in self.networks)

    def opens_host(self, host: str, port: int) -> bool:
        """Does a host entry open this (normalised) name on ``port``?"""
        return any(entry.name == host and port in entry.ports for entry in self.hosts)

    def covers_host(self, host: str) -> bool:
        """Does a host entry name this (normalised) name, on whatever port?"""
        return any(entry.name == host for entry in self.hosts)

    def opens_metadata(self, ip: IPAddress) -> bool:
        """Is ``ip`` exactly the metadata address the dangerous setting opens?"""
        return self.metadata_address is not None and ip == self.metadata_address
