"""The auth service with AUTH_DB_SERVER_PREPARE=false, as behind a transaction-mode pooler."""

from __future__ import annotations

from tests.helpers import password_login, prepared_per_connection, signup, verify_email


async def test_the_service_answers_without_preparing_a_statement_on_the_server(make_auth_client, mailbox):
    client = await make_auth_client(db_server_prepare=False)
    user = (await signup(client, "ann@example.com"))["user"]
    await verify_email(client, mailbox, "ann@example.com")
    granted = await password_login(client, "ann@example.com")
    assert granted.status == 200, await granted.text()
    tokens = await granted.json()
    refreshed = await client.post(
        "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status == 200, await refreshed.text()
    me = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {(await refreshed.json())['access_token']}"}
    )
    body = await me.json()
    assert (body["id"], body["email"], body["email_verified"]) == (user["id"], "ann@example.com", True)

    assert set(await prepared_per_connection(client)) == {0}
