"""The SMTP transport, the auth mails and the embedded SMTP server, against real servers on loopback."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy.local.embedded import EmbeddedServerError, EmbeddedSmtp, start_smtp
from services.auth.adapters.mail.messages import RESET_PASSWORD, SUBJECTS, VERIFY_EMAIL, compose
from services.auth.adapters.mail.smtp import (
    MailDeliveryError,
    Security,
    SmtpConfig,
    SmtpMailer,
    parse_smtp_url,
)

pytestmark = pytest.mark.timeout(20)

HOST = "127.0.0.1"
SENDER = "Referrals <no-reply@example.com>"
RECIPIENT = "alice@example.org"
# '&' must become '&amp;' in the HTML; the token sits in the fragment, as the auth service's links have it.
LINK = "https://app.example.com/verify-email?lang=en&step=2#token=AbC-_9~xYz.0123456789abcdefghijklmnop"
USER = "mailer"
PASSWORD = "pa:ss w/rd%?#sEcReT"


# --- certificates ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """A server context with a certificate for 127.0.0.1, and a client context trusting its test CA."""

    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A test CA, a server certificate it signed for 127.0.0.1, and TLS contexts for both ends."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mail transport test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    (directory / "server.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "server.pem", directory / "server.key")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return Tls(server=server, client=client)


# --- servers --------------------------------------------------------------------------------------------


@dataclass
class Inbox:
    """An aiosmtpd handler keeping what it receives; `refuse` maps MAIL/RCPT/DATA to the reply to give."""

    refuse: dict[str, str] = field(default_factory=dict)
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    over_tls: list[bool] = field(default_factory=list)

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if "MAIL" in self.refuse:
            return self.refuse["MAIL"]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if "RCPT" in self.refuse:
            return self.refuse["RCPT"]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if "DATA" in self.refuse:
            return self.refuse["DATA"]
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.over_tls.append(session.ssl is not None)
        return "250 OK"


Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiosmtpd server on this test's loop at a free loopback port; returns the port."""
    servers: list[asyncio.Server] = []

    async def start(handler: Any, *, implicit_tls: ssl.SSLContext | None = None, **options: Any) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="localhost", loop=loop, **options),
            HOST,
            0,
            ssl=implicit_tls,
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@dataclass
class RawServer:
    """A hand-written SMTP peer recording every byte it receives."""

    port: int = 0
    received: bytearray = field(default_factory=bytearray)


@pytest.fixture
async def serve_raw() -> AsyncIterator[Callable[[bool], Awaitable[RawServer]]]:
    """A server that answers like SMTP without STARTTLS (but offering AUTH), or that never answers."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(answers: bool) -> RawServer:
        state = RawServer()

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            if answers:
                writer.write(b"220 localhost ESMTP\r\n")
            while line := await reader.readline():
                state.received += line
                if not answers:
                    continue
                command = line[:4].upper()
                if command in (b"EHLO", b"HELO"):
                    writer.write(b"250-localhost\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
                elif command == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    break
                else:
                    # A lax peer: a client that went on would show its MAIL FROM or AUTH here.
                    writer.write(b"250 OK\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(session, HOST, 0)
        servers.append(server)
        state.port = int(server.sockets[0].getsockname()[1])
        return state

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


def _mail(kind: str = VERIFY_EMAIL, recipient: str = RECIPIENT, link: str = LINK) -> EmailMessage:
    return compose(kind, sender=SENDER, recipient=recipient, link=link, valid_for="24 hours")


def _config(
    port: int, security: Security = "none", *, timeout: float = 5.0, **credentials: Any
) -> SmtpConfig:
    return SmtpConfig(host=HOST, port=port, security=security, timeout=timeout, **credentials)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.texts: list[str] = []
        self._in_link = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"] or "")
            self._in_link = True

    def handle_endtag(self, tag: str) -> None:
        self._in_link = self._in_link and tag != "a"

    def handle_data(self, data: str) -> None:
        if self._in_link:
            self.texts.append(data)


def _assert_parts_hold(message: EmailMessage, link: str) -> tuple[str, str]:
    """Both parts, plain text first, with `link` intact; returns their decoded text."""
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    text, page = (str(part.get_content()) for part in parts)
    assert link in text.splitlines()
    links = _Links()
    links.feed(page)
    assert links.hrefs == [link]
    assert "".join(links.texts) == link
    return text, page


# --- sending --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [VERIFY_EMAIL, RESET_PASSWORD])
async def test_a_plain_server_receives_both_parts_with_the_link_intact(serve: Serve, kind: str) -> None:
    inbox = Inbox()
    port = await serve(inbox)

    await SmtpMailer(_config(port)).send(_mail(kind))

    (message,) = inbox.messages
    assert inbox.envelopes == [("no-reply@example.com", [RECIPIENT])]
    assert message["Subject"] == SUBJECTS[kind]
    assert message["From"] == SENDER
    assert message["To"] == RECIPIENT
    assert message["Date"]
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", message["Message-ID"])
    _, page = _assert_parts_hold(message, LINK)
    assert "lang=en&amp;step=2#token=" in page  # escaped in the source, in the href and in the text
    assert "lang=en&step=2" not in page


async def test_starttls_upgrades_with_a_verified_certificate(serve: Serve, tls: Tls) -> None:
    inbox = Inbox()
    port = await serve(inbox, tls_context=tls.server, require_starttls=True)

    await SmtpMailer(_config(port, "starttls"), tls_context=tls.client).send(_mail())

    assert inbox.over_tls == [True]
    _assert_parts_hold(inbox.messages[0], LINK)


async def test_implicit_tls_sends(serve: Serve, tls: Tls) -> None:
    inbox = Inbox()
    port = await serve(inbox, implicit_tls=tls.server)
    config = parse_smtp_url(f"smtps://{HOST}:{port}", timeout=5.0)

    await SmtpMailer(config, tls_context=tls.client).send(_mail(RESET_PASSWORD))

    assert [m["Subject"] for m in inbox.messages] == ["Reset your password"]
    _assert_parts_hold(inbox.messages[0], LINK)


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_logs_in_over_starttls_with_the_decoded_credentials(
    serve: Serve, tls: Tls, mechanism: str
) -> None:
    inbox = Inbox()
    attempts: list[tuple[str, bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, used: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        attempts.append((used, data.login, data.password))
        valid = data.login == USER.encode() and data.password == PASSWORD.encode()
        return AuthResult(success=valid, handled=False)

    other = {"LOGIN": "PLAIN", "PLAIN": "LOGIN"}[mechanism]
    port = await serve(
        inbox,
        tls_context=tls.server,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticator,
        auth_exclude_mechanism=[other],
    )
    # The URL's form of the credentials: percent-encoded.
    quoted = "pa%3Ass%20w%2Frd%25%3F%23sEcReT"
    config = parse_smtp_url(f"smtp://{USER}:{quoted}@{HOST}:{port}", timeout=5.0)
    assert config.password == PASSWORD

    await SmtpMailer(config, tls_context=tls.client).send(_mail())

    assert attempts == [(mechanism, USER.encode(), PASSWORD.encode())]
    assert len(inbox.messages) == 1


async def test_a_refused_login_is_temporary_and_keeps_the_password_out(serve: Serve, tls: Tls) -> None:
    inbox = Inbox()
    port = await serve(
        inbox,
        tls_context=tls.server,
        require_starttls=True,
        auth_required=True,
        # handled=False: aiosmtpd's default (True) means the authenticator has answered the client itself.
        authenticator=lambda *_: AuthResult(success=False, handled=False),
    )
    mailer = SmtpMailer(_config(port, "starttls", username=USER, password=PASSWORD), tls_context=tls.client)

    with pytest.raises(MailDeliveryError) as caught:
        await mailer.send(_mail())

    assert not caught.value.permanent
    assert caught.value.reason.startswith("authentication failed")
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert "sEcReT" not in shown
    assert inbox.messages == []


async def test_no_starttls_offered_means_no_send_and_no_credentials_in_the_clear(
    serve_raw: Callable[[bool], Awaitable[RawServer]],
) -> None:
    peer = await serve_raw(True)
    mailer = SmtpMailer(_config(peer.port, "starttls", username=USER, password=PASSWORD))

    with pytest.raises(MailDeliveryError) as caught:
        await mailer.send(_mail())

    assert not caught.value.permanent
    assert "STARTTLS" in caught.value.reason
    received = bytes(peer.received)
    assert received.startswith(b"EHLO ")
    for never in (b"AUTH", b"MAIL FROM", b"RCPT TO", b"DATA", PASSWORD.encode(), LINK.encode()):
        assert never not in received.upper() and never not in received
    assert base64.b64encode(PASSWORD.encode()) not in received
    assert base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) not in received


async def test_an_untrusted_certificate_is_a_temporary_tls_failure(serve: Serve, tls: Tls) -> None:
    inbox = Inbox()
    port = await serve(inbox, tls_context=tls.server, require_starttls=True)

    with pytest.raises(MailDeliveryError) as caught:
        await SmtpMailer(_config(port, "starttls")).send(_mail())  # the system's CAs only

    assert (caught.value.permanent, caught.value.reason) == (False, "TLS handshake failed")
    assert inbox.messages == []


@pytest.mark.parametrize(
    ("stage", "reply", "permanent"),
    [
        ("MAIL", "550 5.1.0 Sender rejected", True),
        ("RCPT", "550 5.1.1 No such user", True),
        ("RCPT", "451 4.3.0 Try again later", False),
        ("DATA", "554 5.6.0 Message refused", True),
        ("DATA", "452 4.3.1 Out of storage", False),
    ],
)
async def test_refusals_are_permanent_for_5xx_only(
    serve: Serve, stage: str, reply: str, permanent: bool
) -> None:
    port = await serve(Inbox(refuse={stage: reply}))

    with pytest.raises(MailDeliveryError) as caught:
        await SmtpMailer(_config(port)).send(_mail())

    assert caught.value.permanent is permanent
    assert reply[:3] in caught.value.reason
    assert RECIPIENT not in caught.value.reason


async def test_nothing_listening_is_a_quick_temporary_error() -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]  # closed again before the send: nothing listens there
    started = time.monotonic()

    with pytest.raises(MailDeliveryError) as caught:
        await SmtpMailer(_config(port)).send(_mail())

    assert (caught.value.permanent, caught.value.reason) == (False, "could not connect")
    assert time.monotonic() - started < 2.0


async def test_a_server_that_never_answers_times_out(
    serve_raw: Callable[[bool], Awaitable[RawServer]],
) -> None:
    peer = await serve_raw(False)
    started = time.monotonic()

    with pytest.raises(MailDeliveryError) as caught:
        await SmtpMailer(_config(peer.port, "starttls", timeout=0.5)).send(_mail())

    elapsed = time.monotonic() - started
    assert (caught.value.permanent, caught.value.reason) == (False, "timed out")
    assert 0.4 < elapsed < 1.5


# --- the URL --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", ("mail.example.com", 587, None, "", "starttls")),
        ("smtp://u:p@mail.example.com:2525", ("mail.example.com", 2525, "u", "p", "starttls")),
        (
            "SMTP://u%40x.org:p%2Fq%3A@Mail.Example.com/",
            ("mail.example.com", 587, "u@x.org", "p/q:", "starttls"),
        ),
        ("smtp://mail.example.com?starttls=on", ("mail.example.com", 587, None, "", "starttls")),
        ("smtp://127.0.0.1:25?starttls=off", ("127.0.0.1", 25, None, "", "none")),
        ("smtp://localhost:1025?starttls=OFF", ("localhost", 1025, None, "", "none")),
        ("smtps://mail.example.com", ("mail.example.com", 465, None, "", "tls")),
        ("smtps://u:p@[::1]:4650", ("::1", 4650, "u", "p", "tls")),
        ("smtp://u:p:q@mail.example.com", ("mail.example.com", 587, "u", "p:q", "starttls")),  # RFC 3986
    ],
)
def test_parse_smtp_url_accepts(url: str, expected: tuple[Any, ...]) -> None:
    config = parse_smtp_url(url, timeout=7.5)

    assert (config.host, config.port, config.username, config.password, config.security) == expected
    assert config.timeout == 7.5


@pytest.mark.parametrize(
    "url",
    [
        "http://u:sEcReT@mail.example.com",
        "u:sEcReT@mail.example.com:587",
        "smtp://u:sEcReT@",
        "smtp://u:sEcReT@mail.example.com:http",
        "smtp://u:sEcReT@mail.example.com:0",
        "smtp://u:sEcReT@mail.example.com:70000",
        "smtp://u:sEcReT@mail.example.com/inbox",
        "smtp://u:sEcReT@mail.example.com?tls=off",
        "smtp://u:sEcReT@mail.example.com?starttls=maybe",
        "smtp://u:sEcReT@mail.example.com?starttls=off&starttls=on",
        "smtp://u:sEcReT@mail.example.com?starttls=off",  # credentials would go in plaintext
        "smtps://u:sEcReT@mail.example.com?starttls=off",
        "smtp://:sEcReT@mail.example.com",
        # An unencoded '/', '?' or '#' in the password cuts the URL inside it.
        "smtp://u:sEcReT/xsEcReT@mail.example.com",
        "smtp://u:12/sEcReT@mail.example.com",
        "smtp://u:sEcReT?sEcReT@mail.example.com",
        "smtp://u:sEcReT#sEcReT@mail.example.com",
    ],
)
def test_parse_smtp_url_refuses_without_showing_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="SMTP") as caught:
        parse_smtp_url(url, timeout=5.0)

    shown = "".join(traceback.format_exception(caught.value)).lower()
    assert "secret" not in shown


def test_the_config_repr_hides_the_password() -> None:
    config = parse_smtp_url("smtps://mailer:sEcReT@mail.example.com", timeout=5.0)

    assert config.password == "sEcReT"
    assert "sEcReT" not in repr(config)
    assert "mailer" in repr(config)


# --- the messages ---------------------------------------------------------------------------------------


def test_compose_escapes_values_in_the_html_part_only() -> None:
    link = 'https://app.example.com/reset-password?x="><script>alert(1)</script>#token=a&b'
    message = compose(RESET_PASSWORD, sender=SENDER, recipient=RECIPIENT, link=link, valid_for="<1 hour>")

    text, page = _assert_parts_hold(message, link)
    assert "<script>" not in page
    assert "&lt;1 hour&gt;" in page
    assert "<1 hour>" in text
    assert "If you did not ask for this, ignore this mail." in text
    assert page.count("http") == 2  # the link's href and text: no images, pixels or tracked links
    assert "<img" not in page


def test_compose_refuses_an_unknown_kind_and_a_link_that_is_no_web_address() -> None:
    with pytest.raises(ValueError, match="unknown mail kind"):
        compose("welcome", sender=SENDER, recipient=RECIPIENT, link=LINK, valid_for="1 day")
    for link in ("javascript:alert(1)", "https://example.com/a b", "https://example.com/\r\nBcc: x@y.z"):
        with pytest.raises(ValueError, match="http"):
            compose(VERIFY_EMAIL, sender=SENDER, recipient=RECIPIENT, link=link, valid_for="1 day")


def test_a_long_link_stays_on_one_line_in_the_raw_mail() -> None:
    link = LINK + "x" * 300

    raw = _mail(link=link).as_bytes()

    assert link.encode() in raw  # readable and copyable in the .eml files of `make run`
    assert link.replace("&", "&amp;").encode() in raw


# --- the embedded server --------------------------------------------------------------------------------


def _eml_files(server: EmbeddedSmtp) -> list[Path]:
    return sorted(server.mail_dir.glob("*.eml"))


async def test_embedded_smtp_keeps_each_mail_in_arrival_order_and_logs_no_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy.local.embedded")
    with start_smtp(tmp_path / "mail") as server:
        assert re.fullmatch(r"smtp://127\.0\.0\.1:\d+\?starttls=off", server.url)
        mailer = SmtpMailer(parse_smtp_url(server.url, timeout=5.0))
        recipients = [f"user{i}@example.org" for i in range(3)]
        for i, recipient in enumerate(recipients):
            kind = RESET_PASSWORD if i == 1 else VERIFY_EMAIL
            await mailer.send(_mail(kind, recipient, f"{LINK}{i}"))

    files = _eml_files(server)
    assert [path.name for path in files] == sorted(path.name for path in files)
    assert all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.eml", path.name) for path in files)
    assert sorted(server.mail_dir.iterdir()) == files  # no partial files left
    mails = [email.message_from_bytes(path.read_bytes(), policy=email.policy.default) for path in files]
    assert [mail["To"] for mail in mails] == recipients
    for i, mail in enumerate(mails):
        assert isinstance(mail, EmailMessage)
        _assert_parts_hold(mail, f"{LINK}{i}")

    lines = [r.getMessage() for r in caplog.records if r.name == "deploy.local.embedded"]
    assert len(lines) == 3
    for line, recipient, subject in zip(lines, recipients, [mail["Subject"] for mail in mails], strict=True):
        assert recipient in line
        assert subject in line
        assert "token" not in line
        assert "app.example.com" not in line
    assert not any("token=" in r.getMessage() for r in caplog.records)


def test_embedded_smtp_runs_without_an_event_loop_and_stops(tmp_path: Path) -> None:
    threads = threading.active_count()
    server = start_smtp(tmp_path / "mail")
    config = parse_smtp_url(server.url, timeout=5.0)
    assert config.security == "none"
    with smtplib.SMTP(config.host, config.port, timeout=5) as client:
        client.send_message(_mail())
    server.stop()
    server.stop()

    (path,) = _eml_files(server)
    mail = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(mail, EmailMessage)
    _assert_parts_hold(mail, LINK)
    assert threading.active_count() == threads
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((config.host, config.port), timeout=1),
    ):
        pass


def test_embedded_smtp_on_a_taken_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(EmbeddedServerError, match=f"SMTP server could not listen on {HOST}:{port}"):
            start_smtp(tmp_path / "mail", port=port)
