"""Login throttling: per (account, client address) and per client address, never per account alone;
counted atomically with the attempt; in Redis, with a memory fallback."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from services.auth.adapters.throttle import LoginThrottle, ThrottleLimits
from tests.helpers import password_login, signup

TOKEN = "/api/v1/auth/token"


async def login_from(client: Any, address: str, email: str, password: str = "correct horse") -> Any:
    """A login through a proxy the service trusts (loopback, by default) for a client at `address`."""
    return await client.post(
        TOKEN,
        data={"grant_type": "password", "username": email, "password": password},
        headers={"X-Forwarded-For": address},
    )


async def test_guesses_from_elsewhere_never_lock_the_owner_out(make_auth_client):
    """Five wrong passwords from one address lock that address out of the account, not the owner."""
    client = await make_auth_client()
    await signup(client, "ivy@example.com")
    for _ in range(5):
        assert (await login_from(client, "203.0.113.66", "ivy@example.com", "bad guess")).status == 400
    locked = await login_from(client, "203.0.113.66", "ivy@example.com")  # even the right password
    assert locked.status == 429
    assert 890 <= int(locked.headers["Retry-After"]) <= 900
    assert locked.headers["Cache-Control"] == "no-store"
    assert (await locked.json())["error"] == "temporarily_unavailable"
    # The owner, from their own address, is not affected; nor is that address for other accounts.
    assert (await login_from(client, "198.51.100.7", "IVY@example.com")).status == 200
    await signup(client, "jack@example.com")
    assert (await login_from(client, "203.0.113.66", "jack@example.com")).status == 200


async def test_the_lockout_ends_with_its_window(make_auth_client):
    client = await make_auth_client(login_max_failures_per_account_address=3, login_account_address_window=2)
    await signup(client, "kit@example.com")
    for _ in range(3):
        assert (await login_from(client, "203.0.113.5", "kit@example.com", "bad guess")).status == 400
    locked = await login_from(client, "203.0.113.5", "kit@example.com")
    assert locked.status == 429 and 1 <= int(locked.headers["Retry-After"]) <= 2
    await asyncio.sleep(2.1)
    assert (await login_from(client, "203.0.113.5", "kit@example.com")).status == 200


async def test_success_clears_the_failures_of_that_account_at_that_address(make_auth_client):
    client = await make_auth_client(login_max_failures_per_account_address=3)
    await signup(client, "kim@example.com")
    for _ in range(2):
        await password_login(client, "kim@example.com", "bad guess")
    assert (await password_login(client, "kim@example.com")).status == 200
    for _ in range(2):
        await password_login(client, "kim@example.com", "bad guess")
    assert (await password_login(client, "kim@example.com")).status == 200


async def test_an_address_locks_after_failures_across_accounts(make_auth_client):
    client = await make_auth_client(login_max_failures_per_address=4)
    await signup(client, "lee@example.com")
    for n in range(4):
        assert (await login_from(client, "203.0.113.9", f"guess{n}@example.com", "bad guess")).status == 400
    response = await login_from(client, "203.0.113.9", "lee@example.com")
    assert response.status == 429
    assert 290 <= int(response.headers["Retry-After"]) <= 300
    # Successful logins from a shared address (an office behind one NAT) do not use it up.
    assert (await login_from(client, "203.0.113.10", "lee@example.com")).status == 200
    for _ in range(6):
        assert (await login_from(client, "203.0.113.10", "lee@example.com")).status == 200


async def test_parallel_guesses_let_at_most_the_limit_through(make_auth_client):
    """The count is taken with the attempt: 60 guesses at once against a limit of 5 check 5 passwords."""
    client = await make_auth_client(login_max_failures_per_address=7)
    await signup(client, "mia@example.com")
    answers = await asyncio.gather(
        *(login_from(client, "203.0.113.12", "mia@example.com", f"guess {n}") for n in range(60))
    )
    statuses = [answer.status for answer in answers]
    assert statuses.count(400) == 5 and statuses.count(429) == 55, statuses
    # Across accounts, the per-address limit holds the same way.
    answers = await asyncio.gather(
        *(login_from(client, "203.0.113.14", f"nobody{n}@example.com", "guess") for n in range(40))
    )
    statuses = [answer.status for answer in answers]
    assert statuses.count(400) == 7 and statuses.count(429) == 33, statuses


async def test_a_forwarded_address_counts_only_from_a_trusted_proxy(make_auth_client):
    """Loopback is trusted by default; with no trusted proxy the peer is the client, whatever it says."""
    client = await make_auth_client(login_max_failures_per_address=2, trusted_proxies=())
    await signup(client, "max@example.com")
    for n in range(2):
        assert (await login_from(client, f"203.0.113.{n}", "max@example.com", "bad guess")).status == 400
    # Each claimed a new address; both were counted against the peer (loopback).
    assert (await login_from(client, "198.51.100.9", "max@example.com")).status == 429


async def test_redis_down_falls_back_to_process_memory(make_auth_client):
    """No Redis: throttling still holds per process, and logins still work."""
    client = await make_auth_client(
        redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2, login_max_failures_per_account_address=2
    )
    await signup(client, "ned@example.com")
    assert (await password_login(client, "ned@example.com")).status == 200
    for _ in range(2):
        assert (await password_login(client, "ned@example.com", "bad guess")).status == 400
    assert (await password_login(client, "ned@example.com")).status == 429
    assert (await login_from(client, "198.51.100.20", "ned@example.com")).status == 200
    metrics = await (await client.get("/metrics")).text()
    fallback = [
        line for line in metrics.splitlines() if line.startswith("auth_login_throttle_fallback_total")
    ]
    assert fallback and float(fallback[0].split()[-1]) >= 3


# --- the throttle itself, on the real Redis ---------------------------------------------------------


LIMITS = ThrottleLimits(per_account_address=3, account_address_window=60, per_address=10, address_window=60)


async def make_throttle(redis_url: str, redis_prefix: str) -> tuple[LoginThrottle, Redis]:
    redis = Redis.from_url(redis_url)
    return LoginThrottle(redis, prefix=redis_prefix, limits=LIMITS, registry=CollectorRegistry()), redis


async def test_clear_forgets_the_account_at_every_address(redis_url, redis_prefix):
    throttle, redis = await make_throttle(redis_url, redis_prefix)
    try:
        for address in ("203.0.113.1", "203.0.113.2"):
            for _ in range(3):
                assert await throttle.reserve("zoe@example.com", address) is None
            assert await throttle.reserve("zoe@example.com", address) is not None
        await throttle.clear("ZOE@example.com ")
        for address in ("203.0.113.1", "203.0.113.2"):
            assert await throttle.reserve("zoe@example.com", address) is None
        # The addresses' own counts stay (4 of 10 used at the first now): clearing an account is no
        # way to launder an address's guesses.
        for n in range(6):
            assert await throttle.reserve(f"other-{n}@example.com", "203.0.113.1") is None
        assert await throttle.reserve("another@example.com", "203.0.113.1") is not None
    finally:
        await redis.aclose()


async def test_an_attempt_without_a_verdict_gives_its_places_back(redis_url, redis_prefix):
    throttle, redis = await make_throttle(redis_url, redis_prefix)
    try:
        for _ in range(10):
            assert await throttle.reserve("amy@example.com", "203.0.113.3") is None
            await throttle.undecided("amy@example.com", "203.0.113.3")
        for _ in range(3):
            assert await throttle.reserve("amy@example.com", "203.0.113.3") is None
        assert await throttle.reserve("amy@example.com", "203.0.113.3") is not None
    finally:
        await redis.aclose()


async def test_a_peer_outside_the_trusted_proxies_cannot_pick_its_address(make_auth_client):
    """Tried as an attacker would: the services believed X-Forwarded-For from all of loopback and the
    private ranges, so anything reaching a service port directly picked its own address. By default
    only the loopback address the gateway connects from (127.0.0.1, ::1) is believed: a peer at
    127.0.0.2 is counted as itself, whatever it claims."""
    client = await make_auth_client(login_max_failures_per_address=2)
    await signup(client, "noa@example.com")
    url = str(client.make_url(TOKEN))
    form = {"grant_type": "password", "username": "noa@example.com", "password": "bad guess"}
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as elsewhere:
        for n in range(2):
            async with elsewhere.post(
                url, data=form, headers={"X-Forwarded-For": f"198.51.100.{n}"}
            ) as answer:
                assert answer.status == 400
        right = {**form, "password": "correct horse"}
        async with elsewhere.post(url, data=right, headers={"X-Forwarded-For": "198.51.100.99"}) as answer:
            assert answer.status == 429  # both failures were 127.0.0.2's
    # The gateway's address is believed: the same claims from 127.0.0.1 are other clients.
    assert (await login_from(client, "198.51.100.99", "noa@example.com")).status == 200
