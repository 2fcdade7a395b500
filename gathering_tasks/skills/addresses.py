"""What kind of address is this? The classification half of the SSRF rules. No I/O.

:func:`classify` -- is an address public? Loopback, RFC 1918, link-local, CGNAT, multicast,
unspecified, broadcast, reserved, benchmarking, documentation, IPv6 unique-local and
site-local, Teredo are refused; IPv4 embedded in IPv6 (mapped ``::ffff:0:0/96``, translated
``::ffff:0:0:0/96``, compatible ``::/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is
classified by the IPv4 address it carries. ``ipaddress.is_global`` is the final net for
anything the explicit table does not name.

:func:`never_opened` -- the addresses no allowlist opens: the cloud metadata services
(:data:`METADATA_ADDRESSES`, in every embedded form too) and the unspecified / "this network"
addresses (``0.0.0.0/8``, ``::``: connecting to them reaches the worker's own host). Only
``GATHERING_HTTP_ALLOW_METADATA_ADDRESS_I_KNOW_THIS_IS_DANGEROUS`` opens one metadata address,
exactly (see :mod:`.allowlist`).
"""

from __future__ import annotations

import ipaddress

from gathering_tasks.skills.urls import IPAddress
from gathering_tasks.skills.verdicts import ALLOWED, RefusalReason, Verdict


def _v4(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def _v6(cidr: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(cidr)


R = RefusalReason

# Cloud providers' instance metadata and credential endpoints, by address.
_METADATA_V4 = (
    _v4("169.254.169.254/32"),  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, Hetzner
    _v4("169.254.170.2/32"),  # AWS ECS task metadata and credentials
    _v4("169.254.170.23/32"),  # AWS EKS Pod Identity agent
    _v4("169.254.0.23/32"),  # Tencent Cloud
    _v4("100.100.100.200/32"),  # Alibaba Cloud
    _v4("192.0.0.192/32"),  # Oracle Cloud (legacy)
    _v4("168.63.129.16/32"),  # Azure wireserver (in a public range!)
)
_METADATA_V6 = (
    _v6("fd00:ec2::254/128"),  # AWS IMDS over IPv6
    _v6("fd00:ec2::23/128"),  # AWS EKS Pod Identity agent over IPv6
    _v6("fd20:ce::254/128"),  # GCP metadata over IPv6
)
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    net.network_address for net in (*_METADATA_V4, *_METADATA_V6)
)
"""Every cloud metadata address refused whatever the allowlist says."""

_NEVER_V4: tuple[tuple[ipaddress.IPv4Network, RefusalReason], ...] = (
    *((net, R.CLOUD_METADATA) for net in _METADATA_V4),
    (_v4("0.0.0.0/32"), R.UNSPECIFIED),
    (_v4("0.0.0.0/8"), R.THIS_NETWORK),
)
_NEVER_V6: tuple[tuple[ipaddress.IPv6Network, RefusalReason], ...] = (
    *((net, R.CLOUD_METADATA) for net in _METADATA_V6),
    (_v6("::/128"), R.UNSPECIFIED),
)

# Checked in order after the table above; the first match names the reason.
_IPV4_TABLE: tuple[tuple[ipaddress.IPv4Network, RefusalReason], ...] = (
    *_NEVER_V4,
    (_v4("127.0.0.0/8"), R.LOOPBACK),
    (_v4("10.0.0.0/8"), R.PRIVATE),
    (_v4("172.16.0.0/12"), R.PRIVATE),
    (_v4("192.168.0.0/16"), R.PRIVATE),
    (_v4("169.254.0.0/16"), R.LINK_LOCAL),
    (_v4("100.64.0.0/10"), R.CGNAT),
    (_v4("192.0.0.0/24"), R.PROTOCOL_ASSIGNMENT),
    (_v4("192.0.2.0/24"), R.DOCUMENTATION),
    (_v4("198.51.100.0/24"), R.DOCUMENTATION),
    (_v4("203.0.113.0/24"), R.DOCUMENTATION),
    (_v4("198.18.0.0/15"), R.BENCHMARKING),
    (_v4("192.88.99.0/24"), R.RESERVED),  # deprecated 6to4 relay anycast
    (_v4("224.0.0.0/4"), R.MULTICAST),
    (_v4("255.255.255.255/32"), R.BROADCAST),
    (_v4("240.0.0.0/4"), R.RESERVED),
)

_IPV6_TABLE: tuple[tuple[ipaddress.IPv6Network, RefusalReason], ...] = (
    *_NEVER_V6,
    (_v6("::1/128"), R.LOOPBACK),
    (_v6("fc00::/7"), R.UNIQUE_LOCAL),
    (_v6("fe80::/10"), R.LINK_LOCAL),
    (_v6("fec0::/10"), R.SITE_LOCAL),
    (_v6("ff00::/8"), R.MULTICAST),
    (_v6("2001::/32"), R.TEREDO),
    (_v6("2001:db8::/32"), R.DOCUMENTATION),
    (_v6("3fff::/20"), R.DOCUMENTATION),
    (_v6("2001:2::/48"), R.BENCHMARKING),
    (_v6("64:ff9b:1::/48"), R.RESERVED),  # local-use NAT64 (RFC 8215)
    (_v6("100::/64"), R.RESERVED),  # discard-only
    (_v6("2001:10::/28"), R.RESERVED),  # ORCHID
    (_v6("2001:20::/28"), R.RESERVED),  # ORCHIDv2
    (_v6("5f00::/16"), R.RESERVED),  # SRv6 SIDs
)

_NAT64 = _v6("64:ff9b::/96")
_IPV4_TRANSLATED = _v6("::ffff:0:0:0/96")  # SIIT (RFC 2765): ::ffff:0:a.b.c.d
_IPV4_COMPATIBLE = _v6("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries, and the form that carries it."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "ipv4-mapped"
    if ip in _IPV4_TRANSLATED:
        return low32, "ipv4-translated"
    if ip in _NAT64:
        return low32, "nat64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    # ``::`` and ``::1`` live in ::/96 too; the table names them first.
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return low32, "ipv4-compatible"
    return None


def _first_match(
    ip: IPAddress,
    table: tuple[tuple[ipaddress.IPv4Network, RefusalReason], ...]
    | tuple[tuple[ipaddress.IPv6Network, RefusalReason], ...],
) -> RefusalReason | None:
    for network, reason in table:
        if ip in network:
            return reason
    return None


def _judge(ip: IPAddress, *, never_only: bool) -> Verdict:
    """The first reason of the (never-opened, or whole) table for ``ip`` and what it embeds."""
    if isinstance(ip, ipaddress.IPv4Address):
        reason = _first_match(ip, _NEVER_V4 if never_only else _IPV4_TABLE)
        if reason is None and not never_only and not ip.is_global:
            reason = R.NON_GLOBAL
        return ALLOWED if reason is None else Verdict(reason, str(ip))
    own = _first_match(ip, _NEVER_V6 if never_only else _IPV6_TABLE)
    if own is not None:
        return Verdict(own, str(ip))
    embedded = embedded_ipv4(ip)
    if embedded is None:
        public = never_only or ip.is_global
        return ALLOWED if public else Verdict(R.NON_GLOBAL, str(ip))
    inner, via = embedded
    verdict = _judge(inner, never_only=never_only)
    if verdict.allowed:
        return ALLOWED
    return Verdict(verdict.reason, f"{inner} (in {ip})", via)


def classify(ip: IPAddress) -> Verdict:
    """Is ``ip`` a public address? IPv6 forms that embed IPv4 are judged by what they embed."""
    return _judge(ip, never_only=False)


def never_opened(ip: IPAddress) -> Verdict:
    """Refused whatever the allowlist opens (metadata, unspecified), in every embedded form."""
    return _judge(ip, never_only=True)
