"""Fixtures for the sign-in pieces: a real OpenID Connect provider (oidc-provider-mock) in a subprocess
for the whole run, and an outgoing HTTP session per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.auth.oauth.helpers import MockProvider, running_mock_provider


@pytest.fixture(scope="session")
def mock_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProvider]:
    """One real OpenID Connect provider for the whole run."""
    with running_mock_provider(tmp_path_factory.mktemp("oidc") / "provider.log") as provider:
        yield provider


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An outgoing session like the service's (shared.resources.http_client_ctx)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client
