"""The whole user journey, through the gateway only."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from tests.e2e.api import (
    MY_CODE,
    REVOKE,
    activate,
    assert_oauth_error,
    create_code,
    jwt_parts,
    lookup,
    parse_time,
    password_grant,
    referrals_of,
    token,
)
from tests.helpers import assert_problem

LINK_DEADLINE = 10.0  # a signup's link is delivered by the auth service's outbox, maybe just after the 201


async def test_the_whole_journey(stack, gateway, make_account):
    # A signs up: 201, the user and a first token pair.
    a = await make_account("alice")
    assert a.referrer_id is None
    header, claims = jwt_parts(a.access_token)
    assert header["typ"] == "at+jwt" and header["kid"], header
    assert claims["sub"] == a.id and claims["email"] == a.email, claims
    assert claims["iss"] == stack.issuer, claims

    # The password grant, then a refresh that rotates the refresh token.
    granted = await password_grant(gateway, a)
    assert granted["token_type"] == "Bearer" and granted["expires_in"] > 0, granted
    assert granted["refresh_token"] != a.refresh_token
    refreshed = await token(gateway, grant_type="refresh_token", refresh_token=granted["refresh_token"])
    assert refreshed.status == 200, await refreshed.text()
    assert refreshed.headers.get("Cache-Control") == "no-store"
    rotated = await refreshed.json()
    assert rotated["refresh_token"] != granted["refresh_token"], rotated
    assert jwt_parts(rotated["access_token"])[1]["sub"] == a.id
    me = await gateway.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {rotated['access_token']}"})
    assert me.status == 200, await me.text()
    assert (await me.json())["email"] == a.email

    # A creates a code; anyone looks it up by A's email (case and spaces do not matter).
    created = await create_code(gateway, a, days=3)
    code = created["code"]
    assert created["owner_id"] == a.id, created
    expires_at = parse_time(created["expires_at"])
    assert timedelta(days=3) - timedelta(minutes=1) < expires_at - datetime.now(UTC) <= timedelta(days=3)
    for email in (a.email, f"  {a.email.upper()} "):
        found = await lookup(gateway, email)
        assert found.status == 200, await found.text()
        assert await found.json() == {"code": code, "expires_at": created["expires_at"]}
    unknown = await lookup(gateway, f"nobody-{a.id}@example.com")
    await assert_problem(unknown, 404, "code_not_found")

    # C signs up with the code: 201, with A as the referrer.
    c = await make_account("carol", referral_code=code.lower())
    assert c.referrer_id == a.id

    # B signs up first, then becomes A's referral by activating the code.
    b = await make_account("bob")
    assert b.referrer_id is None
    activated = await activate(gateway, b, code)
    assert activated.status == 201, await activated.text()
    link = await activated.json()
    assert link["referrer_id"] == a.id and link["referral_id"] == b.id, link
    again = await activate(gateway, b, code)
    await assert_problem(again, 409, "already_referred")
    me_b = await gateway.get("/api/v1/auth/me", headers=b.headers)
    assert me_b.status == 200

    # A lists two referrals with full emails, newest first; someone else sees them masked.
    listing = await _referrals_when(gateway, a.id, a.headers, total=2)
    assert listing["referrer_id"] == a.id
    by_id = {item["referral_id"]: item for item in listing["items"]}
    assert set(by_id) == {b.id, c.id}, listing
    assert by_id[b.id]["email"] == b.email and by_id[c.id]["email"] == c.email, listing
    joined = [parse_time(item["joined_at"]) for item in listing["items"]]
    assert joined == sorted(joined, reverse=True), listing
    masked = await _referrals_when(gateway, a.id, b.headers, total=2)
    for item in masked["items"]:
        full = b.email if item["referral_id"] == b.id else c.email
        local, domain = full.split("@")
        assert item["email"] != full, masked
        assert item["email"].endswith("@" + domain) and item["email"].startswith(local[0]), masked
        assert "*" in item["email"] and local[1:] not in item["email"], masked
    anonymous = await gateway.get(referrals_of(a.id))
    await assert_problem(anonymous, 401)
    assert anonymous.headers.get("WWW-Authenticate", "").startswith("Bearer")

    # A deletes the code: 204, and it is gone at once for the lookup, the owner and a new activation.
    deleted = await gateway.delete(MY_CODE, headers=a.headers)
    assert deleted.status == 204, await deleted.text()
    await assert_problem(await lookup(gateway, a.email), 404, "code_not_found")
    await assert_problem(await gateway.get(MY_CODE, headers=a.headers), 404, "code_not_found")
    d = await make_account("dave")
    refused = await activate(gateway, d, code)
    assert refused.status in (404, 410), await refused.text()
    await assert_problem(refused, refused.status)

    # Revoking A's refresh token: 200, then refreshing with it fails.
    revoked = await gateway.post(REVOKE, data={"token": rotated["refresh_token"]})
    assert revoked.status == 200, await revoked.text()
    failed = await token(gateway, grant_type="refresh_token", refresh_token=rotated["refresh_token"])
    await assert_oauth_error(failed, 400, "invalid_grant")


async def test_a_reused_refresh_token_revokes_its_family(gateway, make_account):
    account = await make_account("reuse")
    first = account.refresh_token
    rotated = await token(gateway, grant_type="refresh_token", refresh_token=first)
    assert rotated.status == 200, await rotated.text()
    second = (await rotated.json())["refresh_token"]
    reused = await token(gateway, grant_type="refresh_token", refresh_token=first)
    await assert_oauth_error(reused, 400, "invalid_grant")
    # The theft answer revoked the whole family: the live descendant is dead too.
    await assert_oauth_error(
        await token(gateway, grant_type="refresh_token", refresh_token=second), 400, "invalid_grant"
    )
    # A wrong password is the same invalid_grant, and the right one still logs in.
    wrong = await token(gateway, grant_type="password", username=account.email, password="not the password")
    await assert_oauth_error(wrong, 400, "invalid_grant")
    await password_grant(gateway, account)


async def _referrals_when(gateway, referrer_id: str, headers: dict[str, str], *, total: int) -> dict:
    """The referrer's list once it has `total` entries (a signup's link may land just after its 201)."""
    deadline = time.monotonic() + LINK_DEADLINE
    while True:
        response = await gateway.get(referrals_of(referrer_id), headers=headers)
        assert response.status == 200, await response.text()
        body = dict(await response.json())
        if body["total"] >= total or time.monotonic() > deadline:
            assert body["total"] == total == len(body["items"]), body
            assert body["next_cursor"] is None, body
            return body
        await asyncio.sleep(0.1)
