"""Client helpers for the end-to-end tests: everything over HTTP, normally through the gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tests.e2e import secrets as run_secrets
from tests.harness import harness_smtp
from tests.helpers import Mailbox

AUTH = "/api/v1/auth"
REFERRAL = "/api/v1/referral"
SIGNUP = f"{AUTH}/signup"
TOKEN = f"{AUTH}/token"
REVOKE = f"{AUTH}/revoke"
ME = f"{AUTH}/me"
CODES = f"{REFERRAL}/codes"
MY_CODE = f"{REFERRAL}/codes/me"
REFERRALS = f"{REFERRAL}/referrals"
PASSWORD = "correct horse battery"


class _ReadResponse(aiohttp.ClientResponse):
    """A response read whole as soon as it arrives: its connection is released at once, whatever the
    test does with it (an unread response would hold a connection past its session and its loop)."""

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        await super().start(connection)
        await self.read()
        return self


def client(base_url: str | None = None) -> aiohttp.ClientSession:
    """A client session whose responses are always read whole (see `_ReadResponse`)."""
    return aiohttp.ClientSession(base_url=base_url, response_class=_ReadResponse)


def referrals_of(referrer_id: str) -> str:
    return f"{REFERRAL}/referrers/{referrer_id}/referrals"


def unique_email(tag: str) -> str:
    """A new address each call (the run shares one database)."""
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JWT's header and claims, not verified (the services do that)."""
    header, claims, _ = token.split(".")

    def decode(segment: str) -> dict[str, Any]:
        return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))

    return decode(header), decode(claims)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, f"not an RFC 3339 time with an offset: {text!r}"
    return moment


@dataclass
class Account:
    """A user signed up over HTTP: what the signup answered."""

    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str
    referrer_id: str | None

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.access_token)


async def signup(
    session: aiohttp.ClientSession, email: str, *, password: str = PASSWORD, referral_code: str | None = None
) -> aiohttp.ClientResponse:
    body: dict[str, str] = {"email": email, "password": password}
    if referral_code is not None:
        body["referral_code"] = referral_code
    run_secrets.record("password", password)
    response = await session.post(SIGNUP, json=body)
    await response.read()
    await record_issued_tokens(response)
    return response


async def record_issued_tokens(response: aiohttp.ClientResponse) -> None:
    """Remember the tokens a signup, callback or token answer issued (for the log scan)."""
    if response.status not in (200, 201) or response.content_type != "application/json":
        return
    try:
        body = json.loads(await response.read())
    except ValueError:
        return
    if isinstance(body, dict):
        run_secrets.record("access_token", body.get("access_token"))
        run_secrets.record("refresh_token", body.get("refresh_token"))


async def new_account(
    session: aiohttp.ClientSession,
    tag: str = "user",
    *,
    referral_code: str | None = None,
    verified: bool = True,
) -> Account:
    """Sign up a new user (201 expected) and return it; `verified`: its owner then proves the address
    with the mailed link, as a person would, and logs in again (the tokens say email_verified)."""
    email = unique_email(tag)
    mailbox = Mailbox(harness_smtp().mail_dir)
    response = await signup(session, email, referral_code=referral_code)
    assert response.status == 201, await response.text()
    body = await response.json()
    assert body["token_type"] == "Bearer", body
    user = body["user"]
    assert user["email"] == email, body
    tokens = body
    if verified:
        await prove(session, mailbox, email)
        granted = await token(session, grant_type="password", username=email, password=PASSWORD)
        assert granted.status == 200, await granted.text()
        tokens = await granted.json()
    return Account(
        id=user["id"],
        email=email,
        password=PASSWORD,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        referrer_id=user["referrer_id"],
    )


async def prove(session: aiohttp.ClientSession, mailbox: Mailbox, email: str) -> None:
    """Open the verification link mailed to `email` (the API call its page makes)."""
    proof = await mailbox.token(email, "verify-email")
    run_secrets.record("mail token", proof)
    response = await session.post(f"{AUTH}/email/verify", json={"token": proof})
    assert response.status == 200, await response.text()


async def token(session: aiohttp.ClientSession, **form: str) -> aiohttp.ClientResponse:
    """POST the token endpoint with a form (RFC 6749)."""
    run_secrets.record("password", form.get("password"))
    run_secrets.record("refresh_token", form.get("refresh_token"))
    response = await session.post(TOKEN, data=form)
    await response.read()
    await record_issued_tokens(response)
    return response


async def password_grant(session: aiohttp.ClientSession, account: Account) -> dict[str, Any]:
    response = await token(session, grant_type="password", username=account.email, password=account.password)
    assert response.status == 200, await response.text()
    return dict(await response.json())


async def assert_oauth_error(response: aiohttp.ClientResponse, status: int, error: str) -> None:
    """An RFC 6749 section 5.2 error answer."""
    text = await response.text()
    assert response.status == status, text
    body = json.loads(text)
    assert body.get("error") == error, body
    assert response.headers.get("X-Request-ID")


async def create_code(
    session: aiohttp.ClientSession, account: Account, *, days: float = 7, code: str | None = None
) -> dict[str, Any]:
    """Create the account's code (201 expected) and return the body."""
    body: dict[str, str] = {"expires_at": rfc3339(datetime.now(UTC) + timedelta(days=days))}
    if code is not None:
        body["code"] = code
    response = await session.post(CODES, json=body, headers=account.headers)
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def lookup(session: aiohttp.ClientSession, email: str) -> aiohttp.ClientResponse:
    response = await session.get(CODES, params={"email": email})
    await response.read()
    return response


async def activate(session: aiohttp.ClientSession, account: Account, code: str) -> aiohttp.ClientResponse:
    response = await session.post(REFERRALS, json={"code": code}, headers=account.headers)
    await response.read()
    return response


async def raw_request(
    url: str, request_line_target: str, method: str = "GET", body: bytes = b""
) -> RawAnswer:
    """Send one HTTP/1.1 request with the target exactly as given (no client-side normalisation)."""
    head = f"{method} {request_line_target} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
    return await exchange_raw(url, head.encode("latin-1"), body)


async def exchange_raw(url: str, head: bytes, body: bytes = b"", timeout: float = 10) -> RawAnswer:
    """Send the request line and headers in `head` (plus Host and Connection: close) and `body`
    byte for byte over a fresh connection; read and parse the whole answer."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host and port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + f"Host: {parts.netloc}\r\nConnection: close\r\n\r\n".encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = _unchunk(payload)
    return RawAnswer(int(status_line.split()[1]), headers, payload)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def problem(self, status: int) -> dict[str, Any]:
        """The answer is problem+json with this status; its body."""
        text = self.body.decode(errors="replace")
        assert self.status == status, (self.status, self.headers, text)
        assert self.headers.get("content-type", "").split(";")[0] == "application/problem+json", self.headers
        body = dict(json.loads(text))
        assert body["status"] == status and body.get("code"), body
        assert self.headers.get("x-request-id"), self.headers
        return body
