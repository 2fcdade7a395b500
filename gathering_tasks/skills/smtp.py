"""Email over SMTP (``smtplib``): STARTTLS, implicit TLS or plain, optional login.

The SMTP server comes from settings, never from an action config, so it is not subject to
the SSRF rules. Credentials are a :class:`~pydantic.SecretStr` and never logged. ``security
= "none"`` sends the login in clear text: use it only for a local relay.

Each message gets a ``Message-ID`` derived from the idempotency key, so a receiving system
can recognise a re-sent message as the same one.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Literal

from gathering_tasks.errors import GatheringError
from gathering_tasks.skills.errors import (
    PermanentSmtpFailure,
    RetryableSmtpFailure,
    SmtpNotConfigured,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

    from gathering_tasks.settings import Settings
    from gathering_tasks.skills.notification_config import Message

log = logging.getLogger(__name__)

SmtpSecurity = Literal["starttls", "ssl", "none"]


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to send email. ``host=None`` means email is not configured."""

    host: str | None
    port: int = 587
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    from_address: str = "gathering-tasks@localhost"
    timeout_s: float = 30.0
    ca_bundle: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpSettings:
        """The SMTP settings configured by ``GATHERING_SMTP_*``."""
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password,
            from_address=settings.smtp_from,
        )


def message_id(idempotency_key: str, from_address: str) -> str:
    """A ``Message-ID`` that is the same for every attempt of one notification."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    domain = from_address.rpartition("@")[2] or "localhost"
    return f"<{digest}@{domain}>"


def build_email(
    message: Message, to: Sequence[str], smtp: SmtpSettings, idempotency_key: str, now_s: float
) -> EmailMessage:
    """The MIME message: plain text, plus an HTML alternative when ``message.html`` is set."""
    email = EmailMessage()
    email["From"] = smtp.from_address
    email["To"] = ", ".join(to)
    email["Subject"] = message.title
    email["Date"] = formatdate(now_s, usegmt=True)
    email["Message-ID"] = message_id(idempotency_key, smtp.from_address)
    email.set_content(message.text)
    if message.html is not None:
        email.add_alternative(message.html, subtype="html")
    return email


def _smtp_failure(exc: Exception) -> GatheringError:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return PermanentSmtpFailure("authentication failed", exc.smtp_code)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        transient = all(400 <= code < 500 for code in codes)
        flavour = RetryableSmtpFailure if transient else PermanentSmtpFailure
        return flavour(f"all {len(codes)} recipient(s) refused", min(codes, default=None))
    if isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        flavour = RetryableSmtpFailure if 400 <= code < 500 else PermanentSmtpFailure
        return flavour(f"server answered {code}", code)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentSmtpFailure("server does not support STARTTLS or AUTH")
    if isinstance(exc, ssl.SSLError):
        return PermanentSmtpFailure(f"TLS failure ({type(exc).__name__})")
    return RetryableSmtpFailure(f"connection failed ({type(exc).__name__})")


def _open(smtp: SmtpSettings, host: str) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=smtp.ca_bundle)
    # gethostname, not smtplib's default getfqdn: no reverse-DNS lookup on every send.
    helo = socket.gethostname() or "localhost"
    if smtp.security == "ssl":
        return smtplib.SMTP_SSL(
            host, smtp.port, local_hostname=helo, timeout=smtp.timeout_s, context=context
        )
    client = smtplib.SMTP(host, smtp.port, local_hostname=helo, timeout=smtp.timeout_s)
    try:
        if smtp.security == "starttls":
            client.starttls(context=context)
    except BaseException:
        client.close()
        raise
    return client


def send_email(
    message: Message, to: Sequence[str], smtp: SmtpSettings, idempotency_key: str, now_s: float
) -> str:
    """Send one email; returns a short description. Raises permanent/retryable failures."""
    if smtp.host is None:
        raise SmtpNotConfigured
    if smtp.username is not None and smtp.password is None:
        raise SmtpNotConfigured("SMTP username is set but no password (GATHERING_SMTP_PASSWORD)")
    email = build_email(message, to, smtp, idempotency_key, now_s)
    try:
        with _open(smtp, smtp.host) as client:
            if smtp.username is not None and smtp.password is not None:
                client.login(smtp.username, smtp.password.get_secret_value())
            refused = client.send_message(email)
    except (smtplib.SMTPException, OSError) as exc:
        raise _smtp_failure(exc) from exc
    accepted = len(to) - len(refused)
    if refused:
        log.warning(
            "email partly refused",
            extra={
                "refused": len(refused),
                "accepted": accepted,
                "idempotency_key": idempotency_key,
            },
        )
    return f"accepted for {accepted} of {len(to)} recipient(s)"
