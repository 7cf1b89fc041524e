"""Helpers of the sign-in tests: the mock provider process, settings, the browser-less authorization step."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from services.auth.adapters.oauth.config import OIDC, OAuthProviderSettings

CLIENT_ID = "referral-system"
CLIENT_SECRET = "s3cret/with+odd:chars"
REDIRECT_URI = "http://127.0.0.1:8080/api/v1/auth/oauth/mock/callback"


def free_port() -> int:
    """A port nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MockProvider:
    """oidc-provider-mock running as a subprocess on a loopback port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, deadline: float = 20.0) -> None:
        url = f"{self.issuer}/.well-known/openid-configuration"
        give_up = time.monotonic() + deadline
        while time.monotonic() < give_up:
            if self._process.poll() is not None:
                raise RuntimeError(f"oidc-provider-mock exited with {self._process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("oidc-provider-mock did not serve its discovery document in time")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._log.close()


@contextlib.contextmanager
def running_mock_provider(log_path: Path) -> Iterator[MockProvider]:
    provider = MockProvider(log_path)
    try:
        provider.wait_ready()
        yield provider
    finally:
        provider.stop()


def oidc_settings(issuer: str, **changes: Any) -> OAuthProviderSettings:
    values: dict[str, Any] = {
        "name": "mock",
        "kind": OIDC,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "openid email profile",
        "issuer": issuer,
        "timeout": 5.0,
    }
    values.update(changes)
    return OAuthProviderSettings(**values)


async def sign_in_at_provider(
    session: aiohttp.ClientSession, authorization_url: str, sub: str, claims: dict[str, Any] | None = None
) -> tuple[str, str]:
    """What a browser does at the mock provider: show the form, submit `sub`; -> (code, state)."""
    origin = URL(authorization_url).origin()
    if claims is not None:
        async with session.put(origin / "users" / sub, json=claims) as response:
            assert response.status == 204, await response.text()
    async with session.get(authorization_url, allow_redirects=False) as response:
        assert response.status == 200, await response.text()
    async with session.post(authorization_url, data={"sub": sub}, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
        location = URL(response.headers["Location"])
    assert str(location.with_query(None)) == REDIRECT_URI
    return location.query["code"], location.query["state"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
