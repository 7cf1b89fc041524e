"""Both services as real servers on loopback ports that know each other's URL, and a fault-injecting hop.

The auth service reaches the referral service through `Hop`, a forwarding HTTP server on loopback that
a test can make lose answers or run a step right after a code check succeeded (stop the referral
service, expire the code). The referral service can be stopped and started again on its port.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, unused_port

from services.auth.app import create_app as create_auth_app
from services.auth.settings import AuthSettings
from services.referral.app import create_app as create_referral_app
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import load_settings
from shared.migrations import apply_migrations
from tests.helpers import Mailbox, User

ROOT = Path(__file__).resolve().parents[2]
REFERRAL_MIGRATIONS = ROOT / "services" / "referral" / "migrations"
SIGNUP = "/api/v1/auth/signup"
VERIFY = "/api/v1/auth/email/verify"
TOKEN = "/api/v1/auth/token"
CODES = "/api/v1/referral/codes"


@dataclass
class Hop:
    """Forwards every request to the referral service; records what it relayed; injects faults."""

    upstream: str
    session: aiohttp.ClientSession
    lose_link_answers: int = 0
    after_code_ok: Callable[[str], Awaitable[None]] | None = None
    link_answers: list[tuple[str, int]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with self.session.request(
                request.method, self.upstream + request.raw_path, data=body, headers=headers
            ) as upstream:
                status, payload = upstream.status, await upstream.read()
                content_type = upstream.headers.get("Content-Type", "application/json")
        except aiohttp.ClientError:
            return web.json_response({"status": 502, "code": "bad_gateway"}, status=502)
        if request.method == "POST" and request.path == "/internal/v1/referrals":
            referral_id = (await request.json())["referral_id"]
            self.link_answers.append((referral_id, status))
            if self.lose_link_answers > 0:
                self.lose_link_answers -= 1
                return web.json_response({"status": 502, "code": "bad_gateway"}, status=502)
        # The signup's code check: the reservation of a use of the code (POST .../reservations, 201).
        is_code_check = request.method == "POST" and request.path.endswith("/reservations")
        if is_code_check and status == 201 and self.after_code_ok is not None:
            step, self.after_code_ok = self.after_code_ok, None
            await step(request.match_info["tail"])
        return web.Response(status=status, body=payload, headers={"Content-Type": content_type})


@dataclass
class Cluster:
    """The auth service, the referral service and the hop between them, each on its own port."""

    auth_url: str
    referral_url: str
    auth_settings: AuthSettings
    referral_settings: ReferralSettings
    hop: Hop
    http: aiohttp.ClientSession
    start_server: Callable[..., Awaitable[TestServer]]
    referral_port: int
    mail_dir: Path
    referral: TestServer | None = None

    async def start_referral(self) -> None:
        assert self.referral is None
        app = create_referral_app(self.referral_settings)
        self.referral = await self.start_server(app, port=self.referral_port)

    async def stop_referral(self) -> None:
        assert self.referral is not None
        await self.referral.close()
        self.referral = None

    async def post(self, url: str, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await self.http.post(url, **kwargs)
        await response.read()
        return response

    async def signup(self, email: str, code: str | None = None) -> aiohttp.ClientResponse:
        body: dict[str, Any] = {"email": email, "password": "correct horse"}
        if code is not None:
            body["referral_code"] = code
        return await self.post(self.auth_url + SIGNUP, json=body)

    async def user(self, email: str, *, verified: bool = True) -> User:
        """A new user; `verified`: their address proven from the mailed link, with a token that says so."""
        mailbox = Mailbox(self.mail_dir)
        response = await self.signup(email)
        assert response.status == 201, await response.text()
        body = await response.json()
        token = body["access_token"]
        if verified:
            proof = await mailbox.token(email, "verify-email")
            assert (await self.post(self.auth_url + VERIFY, json={"token": proof})).status == 200
            form = {"grant_type": "password", "username": email, "password": "correct horse"}
            granted = await self.post(self.auth_url + TOKEN, data=form)
            assert granted.status == 200, await granted.text()
            token = (await granted.json())["access_token"]
        return User(body["user"]["id"], body["user"]["email"], token)

    async def create_code(self, owner: User, code: str | None = None, *, minutes: int = 60) -> str:
        expires_at = (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()
        payload: dict[str, Any] = {"expires_at": expires_at}
        if code is not None:
            payload["code"] = code
        response = await self.post(self.referral_url + CODES, json=payload, headers=owner.headers)
        assert response.status == 201, await response.text()
        return str((await response.json())["code"])

    async def referrer_with_code(self, email: str, code: str | None = None) -> tuple[User, str]:
        owner = await self.user(email)
        return owner, await self.create_code(owner, code)


@pytest.fixture(scope="session")
def referral_schema(database_url: str) -> str:
    """The referral migrations on the test database (a no-op when the root conftest applied them)."""
    apply_migrations(database_url, "referral", REFERRAL_MIGRATIONS)
    return database_url


@pytest.fixture
async def cluster(
    aiohttp_server: Any,
    auth_settings: AuthSettings,
    redis_prefix: str,
    referral_schema: str,
    redis_url: str,
    db: Any,
    smtp: Any,
) -> Any:
    auth_port, referral_port, hop_port = unused_port(), unused_port(), unused_port()
    auth_url, referral_url = f"http://127.0.0.1:{auth_port}", f"http://127.0.0.1:{referral_port}"
    environ = {
        "DATABASE_URL": referral_schema,
        "REDIS_URL": redis_url,
        f"{REFERRAL_PREFIX}ENV": "production",
        f"{REFERRAL_PREFIX}REDIS_PREFIX": f"{redis_prefix}ref:",
        f"{REFERRAL_PREFIX}DENY_LIST_PREFIX": f"{redis_prefix}deny:",
        f"{REFERRAL_PREFIX}AUTH_JWKS_URL": f"{auth_url}/api/v1/auth/.well-known/jwks.json",
        f"{REFERRAL_PREFIX}AUTH_ISSUER": auth_settings.issuer,
        f"{REFERRAL_PREFIX}PORT": str(referral_port),
        f"{REFERRAL_PREFIX}DB_POOL_MIN": "1",
        f"{REFERRAL_PREFIX}DB_POOL_MAX": "16",
    }
    referral_settings = load_settings(ReferralSettings, REFERRAL_PREFIX, environ)
    settings = replace(
        auth_settings,
        referral_service_url=f"http://127.0.0.1:{hop_port}",
        referral_timeout=1.0,
        outbox_poll_interval=0.1,
        outbox_max_backoff=0.5,
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        hop = Hop(referral_url, http)
        hop_app = web.Application()
        hop_app.router.add_route("*", "/{tail:.*}", hop.handle)
        await aiohttp_server(hop_app, port=hop_port)
        await aiohttp_server(create_auth_app(settings), port=auth_port)
        cluster = Cluster(
            auth_url=auth_url,
            referral_url=referral_url,
            auth_settings=settings,
            referral_settings=referral_settings,
            hop=hop,
            http=http,
            start_server=aiohttp_server,
            referral_port=referral_port,
            mail_dir=smtp.mail_dir,
        )
        await cluster.start_referral()
        yield cluster


def referrals_in(db: Any, referrer_id: str) -> list[tuple[str, str]]:
    """(referral_id, code) of every link the referral service recorded for the referrer."""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT referral_id::text, code FROM referral.referrals"
            " WHERE referrer_id = %s ORDER BY created_at",
            (referrer_id,),
        )
        return [(row[0], row[1]) for row in cursor.fetchall()]


def users_with(db: Any, email: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users WHERE lower(email) = lower(%s)", (email,))
        return int(cursor.fetchone()[0])


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def new_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}@example.com"
