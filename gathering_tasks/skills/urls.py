"""Is a URL acceptable on its text alone? The parsing half of the SSRF rules. No I/O.

:func:`parse_url` accepts only ``http``/``https``; no userinfo (``http://user@host``,
``http://evil.com@127.0.0.1``); no backslashes, whitespace or control characters (parsers
disagree about them); a non-empty host and a valid port. The host is normalised: IPv4
literals in any spelling the C resolver accepts (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
``127.1``) become the address they denote; IPv6 literals lose their brackets and zone id;
names are lower-cased, IDNA-encoded and lose *one* trailing dot (the root). A host with an
empty label (``127.0.0.1..``, ``.example.com``, ``a..b``) is refused: resolvers and parsers
read it differently (``127.0.0.1..`` would otherwise be read as ``127.0.0.1``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from gathering_tasks.skills.verdicts import RefusalReason, refuse

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Scheme = Literal["http", "https"]
DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}
MAX_HOST_CHARS = 253

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

    @property
    def host_port(self) -> str:
        """``host:port`` with the port always written, as refusals name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


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
        raise refuse(RefusalReason.INVALID_HOST, host)
    *head, last = checked
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(checked)):
        raise refuse(RefusalReason.INVALID_HOST, host)
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
        raise refuse(RefusalReason.INVALID_HOST, f"[{literal}]") from None
    return ip, (zone or None) if "%" in literal else None


def _normalise_name(host: str) -> str:
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise refuse(RefusalReason.INVALID_HOST, host) from None
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def parse_host(host: str) -> tuple[str, IPAddress | None]:
    """A URL host (without brackets or port) -> (normalised host, address if a literal)."""
    if host == "":
        raise refuse(RefusalReason.EMPTY_HOST)
    if "%" in host:
        raise refuse(RefusalReason.INVALID_HOST, host)
    name = _normalise_name(host)
    if name == "":
        raise refuse(RefusalReason.EMPTY_HOST)
    labels = name.split(".")
    # Only one trailing dot (the root) was dropped: any empty label left is not a host.
    if "" in labels or len(name) > MAX_HOST_CHARS:
        raise refuse(RefusalReason.INVALID_HOST, host)
    ip = parse_ipv4_loose(name)
    if ip is not None:
        return str(ip), ip
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise refuse(RefusalReason.INVALID_HOST, host)
    return name, None


def _split_authority(netloc: str) -> tuple[str, str | None, bool]:
    """netloc -> (host text, port text or None, bracketed?)."""
    if netloc.startswith("["):
        literal, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise refuse(RefusalReason.MALFORMED, netloc)
        return literal, (rest[1:] if rest else None), True
    if netloc.count(":") > 1:
        raise refuse(RefusalReason.MALFORMED, netloc)
    host, colon, port = netloc.partition(":")
    return host, (port if colon else None), False


def parse_port(text: str | None, scheme: Scheme) -> int:
    """A URL's port text (None or empty: the scheme's default); refused when invalid."""
    if text is None or text == "":
        return DEFAULT_PORTS[scheme]
    if not set(text) <= _DEC or len(text) > 5 or not 0 < int(text) < 65536:
        raise refuse(RefusalReason.INVALID_PORT, text)
    return int(text)


def _check_characters(url: str) -> None:
    if "\\" in url:
        raise refuse(RefusalReason.BACKSLASH)
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in url):
        raise refuse(RefusalReason.CONTROL_CHARACTER)


def _scheme(text: str) -> Scheme:
    lowered = text.lower()
    if lowered == "http":
        return "http"
    if lowered == "https":
        return "https"
    raise refuse(RefusalReason.SCHEME, f"scheme {lowered!r}" if lowered else "scheme ''")


def parse_url(url: str) -> UrlTarget:
    """Accept or refuse a URL on its text alone; see the module docstring for the rules.

    Raises :class:`SsrfRefused`. An address literal is parsed but not yet classified.
    """
    _check_characters(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise refuse(RefusalReason.MALFORMED) from None
    scheme = _scheme(parts.scheme)
    if "@" in parts.netloc:
        raise refuse(RefusalReason.USERINFO)
    host_text, port_text, bracketed = _split_authority(parts.netloc)
    port = parse_port(port_text, scheme)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if bracketed:
        ip6, zone = _parse_bracketed(host_text)
        return UrlTarget(scheme, str(ip6), port, path, ip6, zone)
    host, ip = parse_host(host_text)
    return UrlTarget(scheme, host, port, path, ip)
