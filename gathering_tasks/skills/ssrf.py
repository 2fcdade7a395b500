"""SSRF decisions: may this worker send a request to this URL? Pure functions, no I/O.

The guarded HTTP client asks three questions, in order, for the first request and for every
redirect hop (each hop from scratch, with its own host and port):

1. :func:`~gathering_tasks.skills.urls.parse_url` -- is the URL acceptable at all (scheme,
   userinfo, characters, host spelling, empty labels, port)? See :mod:`.urls`.
2. :func:`check_target` -- decisions that need no resolution: an address literal is judged by
   :func:`judge_address`; a ``localhost`` name is refused unless a host entry opens it.
3. :func:`vet_addresses` -- given the addresses the host resolved to, is *every* one
   acceptable? The caller then connects to the returned address, never resolving again.

:func:`judge_address` (address, port, allowlist), in order:

* the dangerous metadata setting opens its one address, exactly;
* what no allowlist opens is refused (:func:`~gathering_tasks.skills.addresses.never_opened`:
  cloud metadata, unspecified -- in every embedded IPv6 form);
* a network entry open on that port opens the address (and the IPv4 address an IPv4-mapped
  one carries);
* otherwise the address must be public (:func:`~gathering_tasks.skills.addresses.classify`);
  when it is not but an entry names it on other ports, the refusal says
  ``port-not-allowlisted``.

A name opened by a host entry (on that port) has its addresses judged against the first two
rules only. See :mod:`.allowlist` for the entries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gathering_tasks.skills.addresses import classify, never_opened
from gathering_tasks.skills.allowlist import AllowList
from gathering_tasks.skills.errors import SsrfRefused, bounded
from gathering_tasks.skills.urls import (
    DEFAULT_PORTS,
    IPAddress,
    IPNetwork,
    Scheme,
    UrlTarget,
    parse_host,
    parse_ipv4_loose,
    parse_url,
)
from gathering_tasks.skills.verdicts import ALLOWED, RefusalReason, Verdict, refuse

__all__ = [
    "DEFAULT_PORTS",
    "AllowList",
    "IPAddress",
    "IPNetwork",
    "PinnedTarget",
    "RefusalReason",
    "Resolver",
    "Scheme",
    "UrlTarget",
    "Verdict",
    "check_target",
    "classify",
    "judge_address",
    "never_opened",
    "parse_host",
    "parse_ipv4_loose",
    "parse_url",
    "vet_addresses",
    "vet_url",
]

Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port)`` -> the addresses ``host`` resolves to, as text."""


@dataclass(frozen=True)
class PinnedTarget:
    """A vetted URL and the address to connect to -- the one that was checked."""

    target: UrlTarget
    address: IPAddress

    @property
    def address_text(self) -> str:
        """The address as a URL/pool host (IPv6 without brackets)."""
        return str(self.address)


def _with_port(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _never(ip: IPAddress, allow: AllowList) -> Verdict:
    return ALLOWED if allow.opens_metadata(ip) else never_opened(ip)


def judge_address(ip: IPAddress, port: int, allow: AllowList) -> Verdict:
    """May a connection go to ``ip`` on ``port``? (See the module docstring for the order.)"""
    if allow.opens_metadata(ip):
        return ALLOWED
    never = never_opened(ip)
    if not never.allowed:
        return never
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if allow.opens_address(ip, port) or (mapped and allow.opens_address(mapped, port)):
        return ALLOWED
    verdict = classify(ip)
    if verdict.allowed:
        return verdict
    if allow.covers_address(ip) or (mapped and allow.covers_address(mapped)):
        return Verdict(RefusalReason.PORT_NOT_ALLOWED, _with_port(ip, port))
    return verdict


def _is_localhost_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def check_target(target: UrlTarget, allow: AllowList) -> None:
    """Decisions that need no resolution: literal addresses, zone ids, ``localhost`` names.

    Also what a config is checked with at creation: what this refuses, every run would.
    """
    if target.ip is not None:
        verdict = judge_address(target.ip, target.port, allow)
        if not verdict.allowed:
            raise SsrfRefused(verdict)
        if target.zone_id is not None:
            raise refuse(RefusalReason.ZONE_ID, f"[{target.host}%{target.zone_id}]")
        return
    if _is_localhost_name(target.host) and not allow.opens_host(target.host, target.port):
        if allow.covers_host(target.host):
            raise refuse(RefusalReason.PORT_NOT_ALLOWED, target.host_port)
        raise refuse(RefusalReason.LOCALHOST_NAME, target.host)


def _parse_resolved(text: str) -> IPAddress:
    # getaddrinfo appends a zone to link-local IPv6 results; the zone does not change the class.
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise refuse(
            RefusalReason.NO_ADDRESS, f"unparsable resolver answer {bounded(text)!r}"
        ) from None


def _judge_resolved(target: UrlTarget, ip: IPAddress, allow: AllowList) -> Verdict:
    if allow.opens_host(target.host, target.port):
        return _never(ip, allow)
    verdict = judge_address(ip, target.port, allow)
    if verdict.allowed or not allow.covers_host(target.host):
        return verdict
    if verdict.reason == RefusalReason.PORT_NOT_ALLOWED:
        return verdict
    never = _never(ip, allow)
    if not never.allowed:
        return never
    # The name is open on other ports: say so rather than "private".
    return Verdict(RefusalReason.PORT_NOT_ALLOWED, _with_port(ip, target.port))


def vet_addresses(target: UrlTarget, addresses: Sequence[str], allow: AllowList) -> IPAddress:
    """Check *every* address ``target.host`` resolved to; return the one to connect to.

    Refuses when the list is empty or when any address is refused -- a name that resolves to
    one public and one private address is refused, since the connection could use either.
    """
    if not addresses:
        raise refuse(RefusalReason.NO_ADDRESS, target.host)
    parsed = [_parse_resolved(text) for text in addresses]
    for ip in parsed:
        verdict = _judge_resolved(target, ip, allow)
        if not verdict.allowed:
            subject = f"{bounded(target.host, 100)} -> {verdict.subject}"
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
