"""A code's `max_uses` across the two real services, each on its own port with a hop between them:
a signup's reserved use is given back when its signup fails, and kept for its link when the link is
late and activations exhausted the code meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.integration.conftest import CODES, Cluster, eventually, new_email, referrals_in, users_with

PROBLEM = "application/problem+json"


async def problem(response: Any, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    assert (await response.json(content_type=None))["code"] == code


async def limited_code(cluster: Cluster, max_uses: int) -> tuple[Any, str]:
    owner = await cluster.user(new_email("owner"))
    payload = {"expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(), "max_uses": max_uses}
    response = await cluster.post(cluster.referral_url + CODES, json=payload, headers=owner.headers)
    assert response.status == 201, await response.text()
    return owner, str((await response.json())["code"])


def uses_of(db: Any, code: str) -> tuple[int, int]:
    """The code's uses, and its reservations waiting for a link."""
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT c.uses, (SELECT count(*) FROM referral.code_reservations r WHERE r.code_id = c.id)"
            " FROM referral.codes c WHERE c.code = %s",
            (code,),
        )
        row = cursor.fetchone()
    return int(row[0]), int(row[1])


async def activate(cluster: Cluster, user: Any, code: str) -> Any:
    return await cluster.post(
        cluster.referral_url + "/api/v1/referral/referrals", json={"code": code}, headers=user.headers
    )


async def test_a_signup_failing_after_its_reservation_gives_the_use_back(cluster, db):
    owner, code = await limited_code(cluster, 1)
    email = new_email("racer")

    async def someone_takes_the_email(_: str) -> None:
        # Between the code check and the user's transaction, another signup takes the address.
        with db.cursor() as cursor:
            cursor.execute("INSERT INTO auth.users (email) VALUES (%s)", (email,))

    cluster.hop.after_code_ok = someone_takes_the_email
    await problem(await cluster.signup(email, code), 409, "email_taken")
    assert users_with(db, email) == 1  # the other one only
    # The use it reserved went back (the auth service released it): the code's one use is free.
    await eventually(lambda: uses_of(db, code) == (0, 0))
    later = await cluster.signup(new_email("later"), code)
    assert later.status == 201, await later.text()
    assert uses_of(db, code) == (1, 0)
    assert len(referrals_in(db, owner.id)) == 1


async def test_a_late_link_keeps_its_use_though_activations_exhausted_the_code(cluster, db):
    owner, code = await limited_code(cluster, 2)

    async def go_down(_: str) -> None:
        await cluster.stop_referral()

    # The signup is accepted with a reserved use; the referral service goes down before the link.
    cluster.hop.after_code_ok = go_down
    response = await cluster.signup(new_email("reserved"), code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    assert referrals_in(db, owner.id) == []
    await cluster.start_referral()
    # Meanwhile an activation takes the last use, and the next one is refused...
    quick = await cluster.user(new_email("quick"))
    first = await activate(cluster, quick, code)
    assert first.status == 201, await first.text()
    await problem(await activate(cluster, await cluster.user(new_email("late")), code), 409, "code_exhausted")
    # ...but the outbox delivers the accepted signup's link: it consumes its reservation.
    await eventually(lambda: {u for u, _ in referrals_in(db, owner.id)} == {user_id, quick.id})
    assert uses_of(db, code) == (2, 0)
    await problem(await cluster.signup(new_email("after"), code), 409, "code_exhausted")
