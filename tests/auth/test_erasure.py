"""DELETE /api/v1/auth/me of an account with a password, on the auth service alone (API.md, "Data
rights"): a wrong password is a failed login (403 `wrong_password`, 429 with Retry-After past the login
throttle's limit, shared with the password grant), a bad body 422, and neither erases anything. The
referral service is a fake on loopback that records the erasures it is sent (the `erasures` fixture).
Accounts without a password: tests/auth/oauth/test_erasure.py; the whole erasure across both real
services: tests/integration/test_erasure.py and tests/e2e/test_erasure.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import assert_problem, password_login, signup

ME = "/api/v1/auth/me"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows(db: Any, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


async def test_a_wrong_password_is_a_failed_login_and_is_throttled(
    make_auth_client, erasures, db, auth_settings
):
    client = await make_auth_client(referral_service_url=erasures.url)
    body = await signup(client, "zelda@example.com")
    headers = bearer(body["access_token"])
    for _ in range(auth_settings.login_max_failures_per_account_address):
        response = await client.delete(ME, json={"password": "not it"}, headers=headers)
        await assert_problem(response, 403, "wrong_password")
    # Past the limit the password is not even checked: the right one is refused too, with Retry-After.
    for password in ("not it", "correct horse"):
        response = await client.delete(ME, json={"password": password}, headers=headers)
        await assert_problem(response, 429, "too_many_requests")
        assert 1 <= int(response.headers["Retry-After"]) <= 900, response.headers
    assert (await password_login(client, "zelda@example.com")).status == 429  # the same counter
    assert rows(db, "SELECT email FROM auth.users WHERE id = %s", body["user"]["id"]) == [
        ("zelda@example.com",)
    ]
    assert erasures.of(body["user"]["id"]) == []
    # Still signed in: the account was not touched.
    assert (await client.get(ME, headers=headers)).status == 200


@pytest.mark.parametrize(
    "payload",
    [
        {},  # an account with a password must send it
        {"password": 12345},
        {"password": None},
        {"password": "correct horse", "extra": 1},
        [],
    ],
)
async def test_a_bad_body_is_422_and_erases_nothing(make_auth_client, erasures, db, payload):
    client = await make_auth_client(referral_service_url=erasures.url)
    body = await signup(client, "yuri@example.com")
    response = await client.delete(ME, json=payload, headers=bearer(body["access_token"]))
    await assert_problem(response, 422, "validation_failed")
    assert rows(db, "SELECT count(*) FROM auth.users WHERE id = %s", body["user"]["id"]) == [(1,)]
    assert erasures.of(body["user"]["id"]) == []
