"""Why a URL or an address is refused: the reasons and the verdict the SSRF rules give.

Shared by :mod:`.urls` (refusals on the URL's text), :mod:`.allowlist` and :mod:`.ssrf` (the
decisions). A verdict quotes what it judged, bounded (see
:func:`~gathering_tasks.skills.errors.bounded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gathering_tasks.skills.errors import SsrfRefused, bounded

SUBJECT_LIMIT = 200
"""The most characters of a verdict's subject a message quotes (a host, then an address)."""


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
    PORT_NOT_ALLOWED = "port-not-allowlisted"
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
    """The answer of a check: allowed, or refused with a reason.

    ``subject`` is what was judged (an address, a host, ``host:port``); ``via`` names the IPv6
    form that carried an embedded IPv4 address (``"nat64"``, ...).
    """

    reason: RefusalReason | None = None
    subject: str = ""
    via: str | None = None

    @property
    def allowed(self) -> bool:
        """True when nothing was refused."""
        return self.reason is None

    def describe(self) -> str:
        """What was judged, e.g. ``127.0.0.1 (in ::ffff:7f00:1) via ipv4-mapped``; bounded."""
        via = f" via {self.via}" if self.via else ""
        return f"{bounded(self.subject, SUBJECT_LIMIT)}{via}"


ALLOWED = Verdict()


def refuse(reason: RefusalReason, subject: str = "", via: str | None = None) -> SsrfRefused:
    """The exception for a refusal (to ``raise``)."""
    return SsrfRefused(Verdict(reason, subject, via))
