"""Signups racing for one email: the database decides, exactly one wins."""

from __future__ import annotations

import asyncio


async def test_twenty_simultaneous_signups_make_one_user(auth_client, db):
    async def attempt(n):
        response = await auth_client.post(
            "/api/v1/auth/signup", json={"email": "Race@Example.com", "password": f"password-{n}"}
        )
        return response.status, await response.json()

    results = await asyncio.gather(*(attempt(n) for n in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * 19
    assert all(body["code"] == "email_taken" for status, body in results if status == 409)
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users WHERE lower(email) = 'race@example.com'")
        assert cursor.fetchone()[0] == 1
