"""POST /api/v1/auth/token (RFC 6749 sections 4.3 and 6) and POST /api/v1/auth/revoke (RFC 7009)."""

from __future__ import annotations

import asyncio

import pytest

from services.auth.domain.use_cases import hash_refresh_token
from tests.helpers import password_login, signup

TOKEN = "/api/v1/auth/token"
REVOKE = "/api/v1/auth/revoke"


async def refresh(client, token):
    return await client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": token})


async def assert_oauth_error(response, status, error):
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    return body


async def test_password_grant_issues_tokens(auth_client):
    await signup(auth_client, "ann@example.com")
    response = await password_login(auth_client, "  ANN@example.com ")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    me = await auth_client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status == 200
    assert (await me.json())["email"] == "ann@example.com"


async def test_wrong_password_and_unknown_email_answer_the_same(auth_client):
    await signup(auth_client, "bob@example.com")
    wrong = await assert_oauth_error(
        await password_login(auth_client, "bob@example.com", "not it!!"), 400, "invalid_grant"
    )
    unknown = await assert_oauth_error(
        await password_login(auth_client, "nobody@example.com", "not it!!"), 400, "invalid_grant"
    )
    assert wrong == unknown


async def test_unknown_email_costs_a_password_check(make_auth_client):
    """Login must not reveal which emails exist by answering faster for unknown ones.

    With a deliberately expensive hash, an unknown email must take at least a good part of the
    time a wrong password takes (without the dummy check it would be ~50x faster).
    """
    client = await make_auth_client(argon2_time_cost=3, argon2_memory_kib=65536, argon2_parallelism=1)
    await signup(client, "timing@example.com")

    async def median(email):
        durations = []
        for _ in range(5):
            started = asyncio.get_running_loop().time()
            response = await password_login(client, email, "wrong password")
            durations.append(asyncio.get_running_loop().time() - started)
            assert response.status == 400
        return sorted(durations)[2]

    known, unknown = await median("timing@example.com"), await median("ghost@example.com")
    assert unknown > 0.5 * known, (known, unknown)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password", "username": "a@example.com"}, "invalid_request"),
        ({"grant_type": "password", "password": "whatever1"}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"grant_type": "authorization_code", "code": "x"}, "unsupported_grant_type"),
    ],
)
async def test_bad_token_requests(auth_client, data, error):
    await assert_oauth_error(await auth_client.post(TOKEN, data=data), 400, error)


async def test_token_wants_a_form_body(auth_client):
    response = await auth_client.post(
        TOKEN, json={"grant_type": "password", "username": "a", "password": "b"}
    )
    await assert_oauth_error(response, 400, "invalid_request")


async def test_repeated_parameter_is_invalid_request(auth_client):
    response = await auth_client.post(
        TOKEN,
        data="grant_type=password&username=a%40example.com&password=one&password=two",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await assert_oauth_error(response, 400, "invalid_request")


async def test_undecodable_form_is_invalid_request(auth_client):
    response = await auth_client.post(
        TOKEN,
        data=b"grant_type=password&username=%FF%FE&password=%C3%28",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 400


async def test_refresh_rotates(auth_client):
    first = await signup(auth_client, "carol@example.com")
    response = await refresh(auth_client, first["refresh_token"])
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    second = await response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    third = await refresh(auth_client, second["refresh_token"])
    assert third.status == 200


async def test_reused_refresh_token_revokes_the_family(auth_client, db):
    first = await signup(auth_client, "dave@example.com")
    second = await (await refresh(auth_client, first["refresh_token"])).json()
    # The first token, already rotated, comes back: someone stole it.
    await assert_oauth_error(await refresh(auth_client, first["refresh_token"]), 400, "invalid_grant")
    # The legitimate descendant dies with its family.
    await assert_oauth_error(await refresh(auth_client, second["refresh_token"]), 400, "invalid_grant")
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM auth.refresh_tokens WHERE revoked_at IS NULL AND rotated_at IS NULL"
        )
        assert cursor.fetchone()[0] == 0
    # Other logins of the same user are untouched.
    other = await (await password_login(auth_client, "dave@example.com")).json()
    assert (await refresh(auth_client, other["refresh_token"])).status == 200


async def test_concurrent_refresh_with_one_token_leaves_no_live_token_twice(auth_client, db):
    first = await signup(auth_client, "erin@example.com")
    responses = await asyncio.gather(*(refresh(auth_client, first["refresh_token"]) for _ in range(5)))
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 1, statuses
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT family_id, count(*) FROM auth.refresh_tokens "
            "WHERE revoked_at IS NULL AND rotated_at IS NULL GROUP BY family_id HAVING count(*) > 1"
        )
        assert cursor.fetchall() == []


async def test_expired_refresh_token_is_refused(auth_client, db):
    body = await signup(auth_client, "frank@example.com")
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE auth.refresh_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = %s",
            (hash_refresh_token(body["refresh_token"]),),
        )
        assert cursor.rowcount == 1
    await assert_oauth_error(await refresh(auth_client, body["refresh_token"]), 400, "invalid_grant")


@pytest.mark.parametrize("token", ["garbage", "x" * 5000, "ünïcödé", "a.b.c"])
async def test_unknown_refresh_token_is_invalid_grant(auth_client, token):
    await assert_oauth_error(await refresh(auth_client, token), 400, "invalid_grant")


async def test_refresh_tokens_are_stored_only_as_hashes(auth_client, db):
    body = await signup(auth_client, "gina@example.com")
    with db.cursor() as cursor:
        cursor.execute("SELECT token_hash FROM auth.refresh_tokens")
        stored = [bytes(row[0]) for row in cursor.fetchall()]
    assert stored == [hash_refresh_token(body["refresh_token"])]
    assert body["refresh_token"].encode() not in stored


async def test_revoke_kills_the_whole_login(auth_client):
    first = await signup(auth_client, "hank@example.com")
    second = await (await refresh(auth_client, first["refresh_token"])).json()
    response = await auth_client.post(REVOKE, data={"token": second["refresh_token"]})
    assert response.status == 200
    await assert_oauth_error(await refresh(auth_client, second["refresh_token"]), 400, "invalid_grant")


async def test_revoke_unknown_token_is_200(auth_client):
    response = await auth_client.post(
        REVOKE, data={"token": "never-issued", "token_type_hint": "refresh_token"}
    )
    assert response.status == 200


async def test_revoke_needs_a_token(auth_client):
    await assert_oauth_error(await auth_client.post(REVOKE, data={}), 400, "invalid_request")
    await assert_oauth_error(await auth_client.post(REVOKE, json={"token": "x"}), 400, "invalid_request")
