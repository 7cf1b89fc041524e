"""Sessions and the data export through the gateway: list, end one, export (API.md "Data rights")."""

from __future__ import annotations

from tests.e2e.api import AUTH, bearer, create_code, jwt_parts, record_issued_tokens, token
from tests.helpers import assert_problem

SESSIONS = f"{AUTH}/sessions"
EXPORT = f"{AUTH}/me/export"


async def test_sessions_and_export_through_the_gateway(gateway, make_account):
    referrer = await make_account("dr-referrer")
    code = (await create_code(gateway, referrer))["code"]
    user = await make_account("dr-user", referral_code=code)
    assert user.referrer_id == referrer.id

    # A second device logs in; its access token names its session (`sid`).
    form = {"grant_type": "password", "username": user.email, "password": user.password}
    response = await gateway.post(f"{AUTH}/token", data=form, headers={"User-Agent": "E2E-Phone/1.0"})
    assert response.status == 200, await response.text()
    await record_issued_tokens(response)  # the log scan looks for them
    phone = await response.json()
    sid = jwt_parts(phone["access_token"])[1]["sid"]

    listed = await gateway.get(SESSIONS, headers=bearer(phone["access_token"]))
    assert listed.status == 200, await listed.text()
    assert listed.headers["Cache-Control"] == "no-store"
    items = (await listed.json())["items"]
    assert len(items) == 3, items  # the signup's login, the one after verifying, the phone's
    newest = items[0]
    assert (newest["id"], newest["current"], newest["user_agent"]) == (sid, True, "E2E-Phone/1.0")
    assert newest["address"] == "127.0.0.1", "the address the gateway saw, passed on to the service"
    assert [item["current"] for item in items[1:]] == [False, False]
    user_session = jwt_parts(user.access_token)[1]["sid"]
    assert user_session in [item["id"] for item in items]

    # The first device ends the phone's session: its refresh token is refused, the first one's works.
    ended = await gateway.delete(f"{SESSIONS}/{sid}", headers=user.headers)
    assert ended.status == 204, await ended.text()
    refused = await token(gateway, grant_type="refresh_token", refresh_token=phone["refresh_token"])
    assert refused.status == 400 and (await refused.json())["error"] == "invalid_grant"
    kept = await token(gateway, grant_type="refresh_token", refresh_token=user.refresh_token)
    assert kept.status == 200, await kept.text()
    await assert_problem(
        await gateway.delete(f"{SESSIONS}/{sid}", headers=user.headers), 404, "session_not_found"
    )

    exported = await gateway.get(EXPORT, headers=user.headers)
    assert exported.status == 200, await exported.text()
    assert exported.headers["Cache-Control"] == "no-store"
    export = await exported.json()
    assert export["account"]["id"] == user.id and export["account"]["email"] == user.email
    assert export["account"]["referrer_id"] == referrer.id and export["account"]["has_password"] is True
    assert export["referrer"]["referrer_id"] == referrer.id and export["referrer"]["code"] == code
    assert export["codes"] == [] and export["referrals"] == [] and export["identities"] == []
    assert sid not in [s["id"] for s in export["sessions"]]
    assert user_session in [s["id"] for s in export["sessions"]]
    text = await exported.text()
    assert user.refresh_token not in text and "argon2" not in text

    # The referrer sees the user among their referrals in their own export, unmasked.
    theirs = await (await gateway.get(EXPORT, headers=referrer.headers)).json()
    assert [(r["referral_id"], r["email"]) for r in theirs["referrals"]] == [(user.id, user.email)]
    assert [(c["code"], c["status"], c["uses"]) for c in theirs["codes"]] == [(code, "active", 1)]

    # The referral service's internal export is not reachable through the gateway.
    internal = await gateway.get(f"/internal/v1/users/{user.id}/export")
    assert internal.status == 404
