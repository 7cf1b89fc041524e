"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient


async def signup(client: TestClient[Any, Any], email: str, password: str = "correct horse") -> dict[str, Any]:
    """Sign up and return the 201 body."""
    response = await client.post("/api/v1/auth/signup", json={"email": email, "password": password})
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def password_login(client: TestClient[Any, Any], email: str, password: str = "correct horse") -> Any:
    """POST the password grant; return the response."""
    return await client.post(
        "/api/v1/auth/token",
        data={"grant_type": "password", "username": email, "password": password},
    )
