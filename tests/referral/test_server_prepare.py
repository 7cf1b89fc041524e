"""The referral service with REFERRAL_DB_SERVER_PREPARE=false, as behind a transaction-mode pooler."""

from __future__ import annotations

from tests.helpers import prepared_per_connection


async def test_the_service_answers_without_preparing_a_statement_on_the_server(make_system):
    system = await make_system(db_server_prepare=False)
    ann, bob, cat = [await system.user(f"{name}@example.com") for name in ("ann", "bob", "cat")]
    created = await system.create_code(ann, "SPRING25")
    assert created.status == 201, await created.text()
    looked_up = await system.referral.get("/api/v1/referral/codes", params={"email": "ann@example.com"})
    assert (await looked_up.json())["code"] == "SPRING25"
    for user in (bob, cat):
        activated = await system.activate(user, "spring25")
        assert activated.status == 201, await activated.text()
    listed = await (await system.referrals_of(ann, ann.id)).json()
    assert sorted(item["referral_id"] for item in listed["items"]) == sorted((bob.id, cat.id))
    assert (listed["total"], listed["confirmed"]) == (2, 2)
    stats = await system.referral.get(f"/api/v1/referral/referrers/{ann.id}/stats", headers=ann.headers)
    body = await stats.json()
    assert body["levels"][0] == {"level": 1, "total": 2, "confirmed": 2}
    assert body["code"]["uses"] == 2

    assert set(await prepared_per_connection(system.referral)) == {0}
    # The auth service beside it prepares as by default: the count above can see a prepared statement.
    assert max(await prepared_per_connection(system.auth)) > 0
