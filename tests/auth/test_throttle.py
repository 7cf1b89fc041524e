"""Login throttling: per account and per client address, in Redis, with a memory fallback."""

from __future__ import annotations

import asyncio

from tests.helpers import password_login, signup


async def test_account_locks_after_repeated_failures(make_auth_client):
    client = await make_auth_client(login_max_failures_per_account=3, login_lockout_seconds=2)
    await signup(client, "ivy@example.com")
    for _ in range(3):
        assert (await password_login(client, "ivy@example.com", "bad guess")).status == 400
    locked = await password_login(client, "ivy@example.com")  # even the right password
    assert locked.status == 429
    assert 1 <= int(locked.headers["Retry-After"]) <= 2
    assert locked.headers["Cache-Control"] == "no-store"
    assert (await locked.json())["error"] == "temporarily_unavailable"
    # Another account from the same address is not affected.
    await signup(client, "jack@example.com")
    assert (await password_login(client, "jack@example.com")).status == 200
    await asyncio.sleep(2.1)
    assert (await password_login(client, "IVY@example.com")).status == 200


async def test_success_clears_the_account_counter(make_auth_client):
    client = await make_auth_client(login_max_failures_per_account=3)
    await signup(client, "kim@example.com")
    for _ in range(2):
        await password_login(client, "kim@example.com", "bad guess")
    assert (await password_login(client, "kim@example.com")).status == 200
    for _ in range(2):
        await password_login(client, "kim@example.com", "bad guess")
    assert (await password_login(client, "kim@example.com")).status == 200


async def test_address_locks_after_failures_across_accounts(make_auth_client):
    client = await make_auth_client(login_max_failures_per_account=100, login_max_failures_per_address=4)
    await signup(client, "lee@example.com")
    for n in range(4):
        assert (await password_login(client, f"guess{n}@example.com", "bad guess")).status == 400
    response = await password_login(client, "lee@example.com")
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1


async def test_forwarded_address_counts_only_from_trusted_proxies(make_auth_client):
    client = await make_auth_client(
        login_max_failures_per_account=100, login_max_failures_per_address=2, trusted_proxies=("127.0.0.1",)
    )
    await signup(client, "max@example.com")

    async def attempt(forwarded_for, password="bad guess"):
        return await client.post(
            "/api/v1/auth/token",
            data={"grant_type": "password", "username": "max@example.com", "password": password},
            headers={"X-Forwarded-For": forwarded_for},
        )

    for _ in range(2):
        assert (await attempt("203.0.113.7")).status == 400
    assert (await attempt("203.0.113.7", "correct horse")).status == 429
    # A different client behind the same proxy is another address.
    assert (await attempt("198.51.100.9", "correct horse")).status == 200


async def test_redis_down_falls_back_to_process_memory(make_auth_client):
    """No Redis: throttling still holds per process, and logins still work."""
    client = await make_auth_client(
        redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2, login_max_failures_per_account=2
    )
    await signup(client, "ned@example.com")
    assert (await password_login(client, "ned@example.com")).status == 200
    for _ in range(2):
        assert (await password_login(client, "ned@example.com", "bad guess")).status == 400
    assert (await password_login(client, "ned@example.com")).status == 429
    metrics = await (await client.get("/metrics")).text()
    fallback = [
        line for line in metrics.splitlines() if line.startswith("auth_login_throttle_fallback_total")
    ]
    assert fallback and float(fallback[0].split()[-1]) >= 3
