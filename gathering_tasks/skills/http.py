"""The guarded HTTP client: used by ``call_api`` and by every notification channel over HTTP.

What it guarantees, per request:

* **Vetting** -- the URL passes :func:`~gathering_tasks.skills.urls.parse_url`; a name is
  resolved once through the injected resolver and *every* address is judged, with its port,
  against the allowlist (see :mod:`gathering_tasks.skills.ssrf` for the rules and
  :mod:`gathering_tasks.skills.allowlist` for what the settings open).
* **Connect to the checked address** -- :class:`_PinnedAdapter` (a requests ``HTTPAdapter``)
  asks urllib3's pool manager for a pool whose host is the vetted *address*; urllib3 then
  connects to that literal, so nothing resolves the name a second time and DNS rebinding has
  no window. The URL requests sees keeps the name, the ``Host`` header is set to the name,
  and for HTTPS the pool gets ``server_hostname=<name>``: SNI carries the name and the
  certificate is verified against the name (``ssl`` ``check_hostname``), not the address.
  No proxy is ever used (a proxy would resolve the name itself).
* **Redirects** -- off unless the request asks; followed by hand, each hop vetted again from
  scratch (host *and* port), at most ``max_redirects``; credentials are dropped when a hop
  leaves the origin.
* **Bounded** -- connect/read timeouts, a total time budget, and a response cap enforced
  while streaming (``Content-Length`` may only make us give up earlier, never read more).
* **Retries** (tenacity) -- only on timeouts, connection errors, 429 and 5xx, only when the
  request is safe to repeat (idempotent method, or ``retry: true``), at most
  ``max_attempts`` requests (default 1: no retry of its own, the run's attempts are the
  retries -- see ``docs/security.md``, "Retry budget"), honouring ``Retry-After`` (seconds
  or HTTP date) up to ``max_retry_wait_s``, within ``total_budget_s``.
* **Record** -- every request sent (each retry, each redirect hop) is listed in the result
  and in the failure (:class:`RequestRecord`: attempt, hop, method, host, status or error,
  elapsed time).
* **Secrets** -- read through the policy's secret allowlist (``GATHERING_SECRET_ENV_ALLOW``)
  before anything is sent.
* **Headers** -- every request carries ``Idempotency-Key`` (from the caller, stable across
  attempts) and ``User-Agent: gathering-tasks/<version>``.
* **Failures** -- a status outside ``expected_statuses`` raises
  :class:`~gathering_tasks.skills.errors.HttpStatusFailure`; see
  :mod:`gathering_tasks.skills.errors` for the permanent/retryable split.

Logs carry method, host, status, attempts and timings -- never URLs with queries, headers,
secrets or bodies.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)
from urllib3.exceptions import ReadTimeoutError

from gathering_tasks import __version__
from gathering_tasks.errors import InvalidInput, PermanentFailure, RetryableFailure
from gathering_tasks.skills._validation import SecretPolicy, SecretSource, has_line_break
from gathering_tasks.skills.allowlist import AllowList
from gathering_tasks.skills.errors import (
    HttpFailure,
    HttpStatusFailure,
    HttpTransportFailure,
    PermanentHttpStatus,
    PermanentHttpTransport,
    ResponseTooLarge,
    RetryableHttpStatus,
    RetryableHttpTransport,
    SsrfRefused,
    TooManyRedirects,
    TransportKind,
)
from gathering_tasks.skills.http_spec import (
    HttpRequestSpec,
    OutgoingRequest,
    parse_call_api_config,
)
from gathering_tasks.skills.ssrf import PinnedTarget, Resolver, check_target, vet_addresses
from gathering_tasks.skills.urls import UrlTarget, parse_url

if TYPE_CHECKING:
    from requests.models import PreparedRequest
    from urllib3.connectionpool import ConnectionPool

    from gathering_tasks.settings import Settings

__all__ = [
    "USER_AGENT",
    "GuardedHttpClient",
    "HttpPolicy",
    "HttpRequestSpec",
    "HttpResult",
    "OutgoingRequest",
    "RequestRecord",
    "parse_call_api_config",
    "parse_retry_after",
    "system_resolver",
]

log = logging.getLogger(__name__)

USER_AGENT = f"gathering-tasks/{__version__}"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpPolicy:
    """Limits, allowlist and secret allowlist of the guarded client (from settings, or built
    by tests). ``max_attempts`` is how many requests one call may send (its own retries)."""

    allow: AllowList = field(default_factory=AllowList)
    secrets: SecretPolicy = field(default_factory=SecretPolicy)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_response_bytes: int = 1024 * 1024
    max_attempts: int = 1
    user_agent: str = USER_AGENT
    total_budget_s: float = 120.0
    max_retry_wait_s: float = 30.0
    backoff_base_s: float = 0.5
    excerpt_bytes: int = 2048
    max_json_bytes: int = 8 * 1024
    ca_bundle: str | None = None

    @classmethod
    def allowing(
        cls,
        networks: Sequence[str] = (),
        hosts: Sequence[str] = (),
        *,
        metadata_address: str | None = None,
        secret_env_allow: Sequence[str] = (),
        **changes: Any,
    ) -> HttpPolicy:
        """A policy opening ``networks`` and ``hosts`` (allowlist entry text, see
        :mod:`~gathering_tasks.skills.allowlist`) and the ``secret_env_allow`` patterns;
        other fields by keyword."""
        allow = AllowList.parse(networks, hosts, metadata_address)
        return replace(cls(allow, SecretPolicy(tuple(secret_env_allow))), **changes)

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpPolicy:
        """The policy configured by ``GATHERING_HTTP_*`` and ``GATHERING_SECRET_ENV_ALLOW``."""
        return cls.allowing(
            settings.http_allow_networks,
            settings.http_allow_hosts,
            metadata_address=settings.http_allow_metadata_address_i_know_this_is_dangerous,
            secret_env_allow=settings.secret_env_allow,
            connect_timeout_s=settings.http_connect_timeout_s,
            read_timeout_s=settings.http_read_timeout_s,
            max_response_bytes=settings.http_max_response_bytes,
            max_attempts=settings.http_max_attempts,
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request the client sent: its ``attempt`` (1 for the first, then the client's own
    retries), its redirect ``hop`` (0 for the URL asked), and what came of it: a ``status``,
    or an ``error`` kind (timeout, connect, tls, ...). Only the host, never the path or query.
    """

    attempt: int
    hop: int
    method: str
    host: str
    elapsed_ms: int
    status: int | None = None
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the run record."""
        return {
            "attempt": self.attempt,
            "hop": self.hop,
            "method": self.method,
            "host": self.host,
            "status": self.status,
            "error": self.error,
            "elapsed_ms": self.elapsed_ms,
        }


@dataclass(frozen=True)
class HttpResult:
    """What a successful call returns (and what the run record keeps). No headers.

    ``elapsed_ms`` covers every attempt and wait; ``body_excerpt`` is at most
    ``excerpt_bytes`` of the body, decoded; ``json`` is set only for a JSON body of at most
    ``max_json_bytes``; ``final_url`` is the last hop's URL without its query string;
    ``requests`` lists every request sent, retries and redirect hops included.
    """

    status_code: int
    elapsed_ms: int
    body_excerpt: str
    json: Any
    attempts: int
    final_url: str
    requests: tuple[RequestRecord, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the run record."""
        return {
            "status_code": self.status_code,
            "elapsed_ms": self.elapsed_ms,
            "body_excerpt": self.body_excerpt,
            "json": self.json,
            "attempts": self.attempts,
            "final_url": self.final_url,
            "requests": [request.to_record() for request in self.requests],
        }


@dataclass(frozen=True)
class _Exchange:
    """One response as far as the client needs it."""

    target: UrlTarget
    status_code: int
    body: bytes = field(repr=False)
    content_type: str
    encoding: str | None
    location: str | None
    retry_after: str | None


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with ``socket.getaddrinfo``: every address, in the system's order."""
    addresses: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        text = str(sockaddr[0])
        if text not in addresses:
            addresses.append(text)
    return addresses


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now_s)


class _PinnedAdapter(HTTPAdapter):
    """An adapter whose every connection goes to the vetted address (see module docstring)."""

    def __init__(self, pinned: PinnedTarget) -> None:
        super().__init__(max_retries=0)
        self._pinned = pinned

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: tuple[str, str] | str | None = None,
    ) -> ConnectionPool:
        """A pool for the pinned address; proxies are deliberately ignored."""
        host_params, tls_params = self.build_connection_pool_key_attributes(
            request, True if verify is None else verify, cert
        )
        target = self._pinned.target
        if host_params["host"] != target.host:
            raise PermanentFailure("request URL does not match the vetted target")
        pool_kwargs: dict[str, Any] = dict(tls_params)
        if target.scheme == "https":
            pool_kwargs["server_hostname"] = target.host
        pool: ConnectionPool = self.poolmanager.connection_from_host(
            host=self._pinned.address_text,
            port=target.port,
            scheme=target.scheme,
            pool_kwargs=pool_kwargs,
        )
        return pool


def _transport_failure(
    kind: TransportKind, host: str, retry_safe: bool, detail: str = ""
) -> HttpFailure:
    # A TLS failure (bad certificate, wrong name) will not pass on its own.
    if retry_safe and kind != "tls":
        return RetryableHttpTransport(kind, host, detail)
    return PermanentHttpTransport(kind, host, detail)


def _classify_request_error(exc: requests.RequestException) -> TransportKind:
    if isinstance(exc, requests.exceptions.SSLError):
        return "tls"
    if isinstance(exc, requests.Timeout):
        return "timeout"
    if isinstance(exc, requests.ConnectionError):
        # Timeouts while streaming the body arrive as ConnectionError(ReadTimeoutError).
        cause = exc.args[0] if exc.args else None
        return "timeout" if isinstance(cause, ReadTimeoutError) else "connect"
    return "protocol"


def _status_failure(
    exchange: _Exchange, excerpt: str, retry_safe: bool, now_s: float
) -> HttpFailure:
    status = exchange.status_code
    host = exchange.target.host
    if retry_safe and (status == 429 or status >= 500):
        failure = RetryableHttpStatus(status, host, excerpt)
        failure.retry_after_s = parse_retry_after(exchange.retry_after, now_s)
        return failure
    return PermanentHttpStatus(status, host, excerpt)


def _decode(body: bytes, encoding: str | None) -> str:
    try:
        return body.decode(encoding or "utf-8", errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _parse_json(exchange: _Exchange, max_bytes: int) -> Any:
    if not exchange.body or len(exchange.body) > max_bytes or not _is_json(exchange.content_type):
        return None
    try:
        return json.loads(exchange.body)
    except (ValueError, RecursionError):
        return None


def redirect_request(
    request: OutgoingRequest, origin: UrlTarget, status: int, location: str
) -> OutgoingRequest:
    """The request for the next hop (browser semantics for 301/302/303; 307/308 keep all)."""
    url = urljoin(origin.url, location)
    method, body, headers = request.method, request.body, request.headers
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
        headers = tuple((k, v) for k, v in headers if k.lower() != "content-type")
    try:
        same_origin = parse_url(url).origin == origin.origin
    except SsrfRefused:
        same_origin = False  # the hop is refused when vetted; no credentials go anywhere
    if not same_origin:
        headers = tuple((k, v) for k, v in headers if k.lower() not in request.sensitive_headers)
    return replace(request, method=method, url=url, headers=headers, params=(), body=body)


def _check_key(idempotency_key: str) -> None:
    if not idempotency_key or len(idempotency_key) > 255 or has_line_break(idempotency_key):
        raise InvalidInput("must be 1-255 characters without line breaks", field="idempotency_key")


@dataclass(frozen=True)
class _Attempt:
    """What every hop of every attempt of one call shares; ``sent`` collects the requests."""

    key: str
    deadline: float
    retry_safe: bool
    sent: list[RequestRecord] = field(default_factory=list)

    def note(
        self,
        position: tuple[int, int],
        request: tuple[str, str],
        started: float,
        *,
        status: int | None,
        error: str | None = None,
    ) -> None:
        """Record one request sent: at (attempt, hop), (method, host), started at monotonic
        ``started``."""
        elapsed_ms = round((time.monotonic() - started) * 1000)
        (attempt, hop), (method, host) = position, request
        self.sent.append(RequestRecord(attempt, hop, method, host, elapsed_ms, status, error))

    def transport_failure(self, kind: TransportKind, host: str, detail: str = "") -> HttpFailure:
        return _transport_failure(kind, host, self.retry_safe, detail)

    def remaining_s(self, host: str) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.transport_failure("timeout", host, "total time budget spent")
        return remaining


class GuardedHttpClient:
    """Sends requests under an :class:`HttpPolicy`. Thread-safe; holds no connections.

    ``resolver`` maps ``(host, port)`` to addresses (tests inject one); ``sleep`` waits
    between attempts and ``clock`` (epoch seconds) reads ``Retry-After`` dates.
    """

    def __init__(
        self,
        policy: HttpPolicy,
        *,
        resolver: Resolver = system_resolver,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self._resolver = resolver
        self._sleep = sleep
        self._clock = clock

    def call(
        self, spec: HttpRequestSpec, *, idempotency_key: str, env: Mapping[str, str] | None = None
    ) -> HttpResult:
        """Run a ``call_api`` spec; secrets are read from ``env`` (default ``os.environ``),
        through the policy's secret allowlist, before anything is sent."""
        secrets = SecretSource(os.environ if env is None else env, self.policy.secrets)
        request = spec.build(secrets)
        return self.send(request, idempotency_key=idempotency_key)

    def send(self, request: OutgoingRequest, *, idempotency_key: str) -> HttpResult:
        """Send ``request`` with vetting, pinning, caps and retries (see module docstring)."""
        _check_key(idempotency_key)
        started = time.monotonic()
        context = _Attempt(
            idempotency_key, started + self.policy.total_budget_s, request.retry_safe
        )
        attempts = 0

        def attempt() -> _Exchange:
            nonlocal attempts
            attempts += 1
            try:
                return self._follow(request, context, attempts)
            except HttpFailure as exc:
                exc.attempts = attempts
                exc.requests = tuple(context.sent)
                raise

        retrying = Retrying(
            stop=stop_after_attempt(self.policy.max_attempts)
            | stop_before_delay(self.policy.total_budget_s),
            wait=self._wait,
            retry=retry_if_exception_type(RetryableFailure),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        extra = {"http_method": request.method, "idempotency_key": idempotency_key}
        try:
            exchange = retrying(attempt)
        except (PermanentFailure, RetryableFailure) as exc:
            log.warning("http call failed: %s", exc, extra={**extra, "attempts": attempts})
            raise
        result = HttpResult(
            status_code=exchange.status_code,
            elapsed_ms=round((time.monotonic() - started) * 1000),
            body_excerpt=_decode(exchange.body[: self.policy.excerpt_bytes], exchange.encoding),
            json=_parse_json(exchange, self.policy.max_json_bytes),
            attempts=attempts,
            final_url=exchange.target.redacted_url,
            requests=tuple(context.sent),
        )
        log.info(
            "http call succeeded",
            extra={
                **extra,
                "http_host": exchange.target.host,
                "http_status": result.status_code,
                "attempts": attempts,
                "elapsed_ms": result.elapsed_ms,
            },
        )
        return result

    # --- one attempt: a chain of hops ---------------------------------------------------

    def _follow(self, request: OutgoingRequest, context: _Attempt, attempt: int) -> _Exchange:
        current = request
        host = ""
        for hop in range(request.max_redirects + 1):
            pinned = self._vet(current.url, context)
            host = pinned.target.host
            exchange = self._exchange(current, pinned, context, (attempt, hop))
            if not (request.follow_redirects and _is_redirect(exchange)):
                return self._judge(current, exchange, context)
            current = redirect_request(
                current, pinned.target, exchange.status_code, exchange.location or ""
            )
        raise TooManyRedirects(host, request.max_redirects)

    def _vet(self, url: str, context: _Attempt) -> PinnedTarget:
        target = parse_url(url)
        allow = self.policy.allow
        check_target(target, allow)
        if target.ip is not None:
            return PinnedTarget(target, target.ip)
        try:
            addresses = self._resolver(target.host, target.port)
        except OSError as exc:
            raise context.transport_failure("dns", target.host, type(exc).__name__) from exc
        return PinnedTarget(target, vet_addresses(target, addresses, allow))

    def _judge(self, request: OutgoingRequest, exchange: _Exchange, context: _Attempt) -> _Exchange:
        if request.is_expected(exchange.status_code):
            return exchange
        excerpt = _decode(exchange.body[: self.policy.excerpt_bytes], exchange.encoding)
        raise _status_failure(exchange, excerpt, context.retry_safe, self._clock())

    def _timeouts(
        self, request: OutgoingRequest, host: str, context: _Attempt
    ) -> tuple[float, float]:
        remaining = context.remaining_s(host)
        policy = self.policy
        # A request may shorten the policy's timeouts, never lengthen them.
        connect = min(
            request.connect_timeout_s or policy.connect_timeout_s, policy.connect_timeout_s
        )
        read = min(request.read_timeout_s or policy.read_timeout_s, policy.read_timeout_s)
        return min(connect, remaining), min(read, remaining)

    def _exchange(
        self,
        request: OutgoingRequest,
        pinned: PinnedTarget,
        context: _Attempt,
        position: tuple[int, int],
    ) -> _Exchange:
        target = pinned.target
        headers = {"Accept": "*/*", **dict(request.headers)}
        headers.update(
            {
                "Host": target.authority,
                "User-Agent": self.policy.user_agent,
                "Idempotency-Key": context.key,
            }
        )
        prepared = requests.Request(
            request.method,
            target.url,
            headers=headers,
            params=list(request.params),
            data=request.body,
        ).prepare()
        timeout = self._timeouts(request, target.host, context)
        adapter = _PinnedAdapter(pinned)
        line = (request.method, target.host)
        started = time.monotonic()
        status: int | None = None
        try:
            response = adapter.send(
                prepared, stream=True, timeout=timeout, verify=self.policy.ca_bundle or True
            )
            status = response.status_code
            with response:
                exchange = self._read(response, request, target, context)
        except requests.RequestException as exc:
            kind = _classify_request_error(exc)
            context.note(position, line, started, status=status, error=kind)
            raise context.transport_failure(kind, target.host, type(exc).__name__) from exc
        except HttpFailure as exc:
            context.note(position, line, started, status=status, error=_kind_of(exc))
            raise
        finally:
            adapter.close()
        context.note(position, line, started, status=status)
        return exchange

    def _read(
        self,
        response: requests.Response,
        request: OutgoingRequest,
        target: UrlTarget,
        context: _Attempt,
    ) -> _Exchange:
        status = response.status_code
        headers = response.headers
        body = b""
        skip_body = request.follow_redirects and status in REDIRECT_STATUSES
        if not skip_body and request.method != "HEAD":
            # Unexpected statuses only need an excerpt; expected ones are read up to the cap.
            strict = request.is_expected(status)
            limit = self.policy.max_response_bytes if strict else self.policy.excerpt_bytes
            body = _read_capped(response, limit, strict=strict, host=target.host, context=context)
        return _Exchange(
            target=target,
            status_code=status,
            body=body,
            content_type=headers.get("Content-Type", ""),
            encoding=response.encoding,
            location=headers.get("Location"),
            retry_after=headers.get("Retry-After"),
        )

    # --- retry plumbing -------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, HttpStatusFailure) and exc.retry_after_s is not None:
            wait_s = exc.retry_after_s
        else:
            wait_s = self.policy.backoff_base_s * 2 ** (state.attempt_number - 1)
        return min(wait_s, self.policy.max_retry_wait_s)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info(
            "http attempt failed, retrying: %s",
            exc,
            extra={
                "attempts": state.attempt_number,
                "wait_s": state.upcoming_sleep,
                "http_host": getattr(exc, "host", None),
            },
        )


def _kind_of(exc: HttpFailure) -> str:
    """What went wrong with a request that had an answer: ``timeout`` or ``too-large``."""
    if isinstance(exc, HttpTransportFailure):
        return exc.kind
    return "too-large" if isinstance(exc, ResponseTooLarge) else type(exc).__name__


def _is_redirect(exchange: _Exchange) -> bool:
    return exchange.status_code in REDIRECT_STATUSES and bool(exchange.location)


def _read_capped(
    response: requests.Response, limit: int, *, strict: bool, host: str, context: _Attempt
) -> bytes:
    """Stream the body; over ``limit``: fail when ``strict``, else truncate."""
    declared = response.headers.get("Content-Length", "")
    # The declared length may only make us give up earlier; the count below is what binds.
    if strict and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(host, limit)
    buffer = bytearray()
    for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
        buffer += chunk
        if len(buffer) > limit:
            if strict:
                raise ResponseTooLarge(host, limit)
            return bytes(buffer[:limit])
        context.remaining_s(host)
    return bytes(buffer)
