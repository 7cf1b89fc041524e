"""Sending mail over SMTP with aiosmtplib: STARTTLS required or implicit TLS, plain only when asked for."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal, get_args
from urllib.parse import unquote, urlsplit

import aiosmtplib

Security = Literal["starttls", "tls", "none"]

DEFAULT_PORTS: dict[str, int] = {"smtp": 587, "smtps": 465}
_URL_FORMS = "smtp://[user:password@]host[:port][?starttls=off] or smtps://[user:password@]host[:port]"
_STARTTLS_VALUES: dict[str, Security] = {"on": "starttls", "off": "none"}


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to hand mail over: the server, its credentials, the transport security, a time limit."""

    host: str
    port: int
    username: str | None = None
    password: str = field(default="", repr=False)
    security: Security = "starttls"
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("the SMTP host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"the SMTP port must be between 1 and 65535, got {self.port}")
        if self.security not in get_args(Security):
            raise ValueError(f"the SMTP security must be one of {get_args(Security)}, got {self.security!r}")
        if not self.timeout > 0:
            raise ValueError("the SMTP timeout must be positive")
        if self.password and not self.username:
            raise ValueError("an SMTP password needs a user name")
        if self.username and self.security == "none":
            raise ValueError("SMTP credentials need TLS: starttls=off would send them in plaintext")


def parse_smtp_url(url: str, *, timeout: float) -> SmtpConfig:
    """A config from `smtp://user:password@host:587` (STARTTLS), `smtps://...` (TLS) or `?starttls=off`."""
    # No message below quotes any part of the URL: an unencoded '/', '?' or '#' in the password makes
    # the parser cut the URL inside it, and that piece would then show up as a host, port or parameter.
    hint = f"; expected {_URL_FORMS} (percent-encode special characters in the user and password)"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            f"the SMTP URL is malformed or its port is not a number from 1 to 65535{hint}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"the SMTP URL must start with smtp:// or smtps://{hint}")
    if not parts.hostname:
        raise ValueError(f"the SMTP URL has no host{hint}")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"the SMTP URL has a path or fragment, which mean nothing here{hint}")
    security: Security = "tls" if scheme == "smtps" else "starttls"
    if parts.query:
        pairs = [pair.partition("=") for pair in parts.query.split("&")]
        if scheme != "smtp" or len(pairs) != 1 or pairs[0][0] != "starttls":
            raise ValueError(
                f"the SMTP URL has an unknown query parameter (smtp:// takes only starttls){hint}"
            )
        value = pairs[0][2].lower()
        if value not in _STARTTLS_VALUES:
            raise ValueError(f"starttls in the SMTP URL must be on or off{hint}")
        security = _STARTTLS_VALUES[value]
    if port == 0:
        raise ValueError(f"the SMTP URL's port must be between 1 and 65535{hint}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else ""
    return SmtpConfig(
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        username=username,
        password=password,
        security=security,
        timeout=timeout,
    )


class MailDeliveryError(Exception):
    """A mail was not handed over; `permanent` says whether sending it again can ever succeed."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"MailDeliveryError({self.reason!r}, permanent={self.permanent})"


class SmtpMailer:
    """Hands each message to the configured SMTP server, on a connection of its own."""

    def __init__(self, config: SmtpConfig, *, tls_context: ssl.SSLContext | None = None) -> None:
        self._config = config
        # Verifies the server's certificate and name against the system's CAs.
        self._tls_context = tls_context or ssl.create_default_context()

    async def send(self, message: EmailMessage) -> None:
        """Send `message` to its To recipients, within the configured timeout; raise MailDeliveryError."""
        config = self._config
        client = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            timeout=config.timeout,
            use_tls=config.security == "tls",
            # Never the library's opportunistic mode (STARTTLS if offered, else plaintext): upgraded
            # explicitly below, and refused when the server does not offer it.
            start_tls=False,
            tls_context=self._tls_context,
        )
        accepted = False
        try:
            async with asyncio.timeout(config.timeout):
                await client.connect()
                if config.security == "starttls":
                    await client.ehlo()
                    if not client.supports_extension("starttls"):
                        raise MailDeliveryError("the server does not offer STARTTLS", permanent=False)
                    await client.starttls()
                if config.username:
                    await client.ehlo()  # the extensions offered before STARTTLS no longer count (RFC 3207)
                    if not client.supports_extension("auth"):
                        raise MailDeliveryError("the server does not offer AUTH", permanent=False)
                    await client.login(config.username, config.password)
                # One recipient per message: a refusal refuses the whole message (SMTPRecipientsRefused).
                await client.send_message(message)
                accepted = True
                await client.quit()
        except (aiosmtplib.SMTPException, OSError) as error:  # OSError covers TimeoutError and ssl.SSLError
            if accepted:
                # The server has the message: a failed goodbye must not become a retry that sends it twice.
                return
            raise _delivery_error(error) from error
        finally:
            client.close()


def _delivery_error(error: Exception) -> MailDeliveryError:
    """Classify what went wrong; reasons name the step and the reply code, never addresses or content."""
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        codes = [refused.code for refused in error.recipients]
        return MailDeliveryError(
            f"recipient refused ({', '.join(map(str, codes))})", permanent=all(_is_5xx(c) for c in codes)
        )
    for kind, step in (
        (aiosmtplib.SMTPSenderRefused, "sender refused"),
        (aiosmtplib.SMTPRecipientRefused, "recipient refused"),
        (aiosmtplib.SMTPDataError, "message refused"),
    ):
        if isinstance(error, kind):
            assert isinstance(error, aiosmtplib.SMTPResponseException)
            return MailDeliveryError(f"{step} ({error.code})", permanent=_is_5xx(error.code))
    # Everything else is temporary. A failed login, or a server refusing this client's EHLO or TLS, is a
    # misconfiguration an operator will fix; sending again later is then right, dropping the mail is not.
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        return MailDeliveryError(f"authentication failed ({error.code})", permanent=False)
    if _caused_by(error, ssl.SSLError):
        return MailDeliveryError("TLS handshake failed", permanent=False)
    if isinstance(error, TimeoutError):  # aiosmtplib's own timeouts are TimeoutErrors too
        return MailDeliveryError("timed out", permanent=False)
    if isinstance(error, aiosmtplib.SMTPResponseException):
        return MailDeliveryError(f"the server answered {error.code}", permanent=False)
    if isinstance(error, aiosmtplib.SMTPConnectError):
        return MailDeliveryError("could not connect", permanent=False)
    if isinstance(error, (aiosmtplib.SMTPServerDisconnected, OSError)):
        return MailDeliveryError("connection lost", permanent=False)
    return MailDeliveryError(f"SMTP error ({type(error).__name__})", permanent=False)


def _is_5xx(code: int) -> bool:
    return 500 <= code < 600


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
