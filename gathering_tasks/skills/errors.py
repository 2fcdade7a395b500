"""Exceptions of the skills, each under the root class that tells the caller how to respond.

* :class:`SsrfRefused`, :class:`ResponseTooLarge`, :class:`TooManyRedirects`,
  :class:`SecretNotAvailable`, :class:`SecretNotAllowed`, :class:`SmtpNotConfigured` --
  permanent.
* :class:`HttpStatusFailure` and :class:`HttpTransportFailure` come in a permanent and a
  retryable flavour. A failure is retryable only when it may pass (timeouts, connection
  errors, 429, 5xx) *and* repeating the request is safe (idempotent method, or ``retry: true``
  in the request); otherwise the permanent flavour is raised.
* :class:`NotificationFailed` (batch) is retryable only when every failed required channel
  failed retryably.

Messages name the reason and the host, never a secret, a header value or a whole body; any
piece of input they quote goes through :func:`bounded` first, so a 100k-character host makes a
short message (and a short log line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from gathering_tasks.errors import GatheringError, PermanentFailure, RetryableFailure

if TYPE_CHECKING:
    from gathering_tasks.skills.http import RequestRecord
    from gathering_tasks.skills.notifications import ChannelOutcome
    from gathering_tasks.skills.verdicts import Verdict

TransportKind = Literal["timeout", "connect", "dns", "tls", "protocol"]

QUOTE_LIMIT = 120
"""The most characters of one piece of input a message quotes."""


def bounded(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a message may quote it: at most ``limit`` characters, the cut said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class SsrfRefused(PermanentFailure):
    """The request was refused: its target is not a public address nor allowlisted."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        detail = verdict.describe()
        suffix = f": {detail}" if detail else ""
        super().__init__(f"request refused ({verdict.reason}){suffix}")

    @property
    def reason(self) -> str:
        """The refusal reason, e.g. ``"loopback"`` or ``"userinfo-in-url"``."""
        return str(self.verdict.reason)


class SecretNotAvailable(PermanentFailure):
    """A secret referenced by environment variable name is not set in this worker."""

    def __init__(self, env_name: str) -> None:
        self.env_name = env_name
        name = bounded(env_name)
        super().__init__(f"environment variable {name} is not set (referenced as a secret)")


class SecretNotAllowed(PermanentFailure):
    """A secret is referenced by a variable name that GATHERING_SECRET_ENV_ALLOW does not match.

    Raised when the run reads it, whatever was accepted at creation: the allowlist may have
    shrunk since, and a config stored before the rule existed is checked too.
    """

    def __init__(self, env_name: str, why: str) -> None:
        self.env_name = env_name
        super().__init__(f"environment variable {bounded(env_name)} may not be read: {why}")


class HttpFailure(GatheringError):
    """An HTTP call failed. ``attempts`` is how many requests were sent for it (its own
    retries within one run attempt); ``requests`` describes each of them."""

    attempts: int = 1
    host: str = ""
    requests: tuple[RequestRecord, ...] = ()

    def record(self) -> dict[str, object]:
        """Failure data for the run record (no secrets, bounded)."""
        return {
            "host": self.host,
            "attempts": self.attempts,
            "requests": [request.to_record() for request in self.requests],
        }


class HttpStatusFailure(HttpFailure):
    """The server answered with a status that was not expected."""

    def __init__(self, status_code: int, host: str, body_excerpt: str = "") -> None:
        self.status_code = status_code
        self.host = host
        # Kept out of the message: Flower and logs show messages, bodies may echo input.
        self.body_excerpt = body_excerpt
        self.retry_after_s: float | None = None
        super().__init__(f"HTTP {status_code} from {bounded(host)}")

    def record(self) -> dict[str, object]:
        """Status, host, attempts and the bounded body excerpt."""
        return {
            **super().record(),
            "status_code": self.status_code,
            "body_excerpt": self.body_excerpt,
        }


class PermanentHttpStatus(HttpStatusFailure, PermanentFailure):
    """The server answered with an unexpected status; retrying will not help (or is unsafe)."""


class RetryableHttpStatus(HttpStatusFailure, RetryableFailure):
    """The server answered 429 or 5xx to a request that is safe to repeat."""


class HttpTransportFailure(HttpFailure):
    """No usable response: timeout, connection, DNS, TLS or protocol error."""

    def __init__(self, kind: TransportKind, host: str, detail: str = "") -> None:
        self.kind = kind
        self.host = host
        suffix = f": {detail}" if detail else ""
        super().__init__(f"HTTP {kind} failure talking to {bounded(host)}{bounded(suffix)}")


class PermanentHttpTransport(HttpTransportFailure, PermanentFailure):
    """A transport failure on a request that is not safe to repeat (or cannot pass)."""


class RetryableHttpTransport(HttpTransportFailure, RetryableFailure):
    """A transport failure on a request that is safe to repeat."""


class ResponseTooLarge(HttpFailure, PermanentFailure):
    """The response body exceeded the configured cap."""

    def __init__(self, host: str, max_bytes: int) -> None:
        self.host = host
        self.max_bytes = max_bytes
        super().__init__(f"response too large from {bounded(host)}: more than {max_bytes} bytes")


class TooManyRedirects(HttpFailure, PermanentFailure):
    """The redirect chain was longer than allowed."""

    def __init__(self, host: str, max_redirects: int) -> None:
        self.host = host
        super().__init__(
            f"too many redirects (more than {max_redirects}), last from {bounded(host)}"
        )


class SmtpNotConfigured(PermanentFailure):
    """Email cannot be sent: no SMTP host is configured (GATHERING_SMTP_HOST)."""


class SmtpFailure(GatheringError):
    """The SMTP server refused or failed the message."""

    def __init__(self, detail: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(f"SMTP failure: {detail}")


class PermanentSmtpFailure(SmtpFailure, PermanentFailure):
    """The SMTP server refused the message or the credentials (5xx, auth)."""


class RetryableSmtpFailure(SmtpFailure, RetryableFailure):
    """The SMTP server was unreachable or answered a transient (4xx) error."""


class NotificationFailed(GatheringError):
    """A batch notification failed: at least one required channel failed."""

    def __init__(self, outcomes: tuple[ChannelOutcome, ...]) -> None:
        self.outcomes = outcomes
        failed = [o.label for o in outcomes if o.required and not o.ok]
        super().__init__(f"required notification channel(s) failed: {', '.join(failed)}")

    def record(self) -> dict[str, object]:
        """The per-channel outcomes, for the run record."""
        return {"outcomes": [outcome.to_record() for outcome in self.outcomes]}


class PermanentNotificationFailure(NotificationFailed, PermanentFailure):
    """A required channel failed permanently."""


class RetryableNotificationFailure(NotificationFailed, RetryableFailure):
    """Every failed required channel failed for a reason that may pass."""
