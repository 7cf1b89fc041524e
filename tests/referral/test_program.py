"""The referral program (API.md): statistics by level, the leaderboard, alias-aware self-referral."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.auth.adapters.signing import AccessTokenIssuer, parse_key_ring
from services.auth.app import create_app as create_auth_app
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import SettingsError, load_settings
from tests.helpers import User, assert_problem

LEADERBOARD = "/api/v1/referral/leaderboard"


def stats_path(referrer_id: str) -> str:
    return f"/api/v1/referral/referrers/{referrer_id}/stats"


def user_token(system, subject: str) -> dict[str, str]:
    """A user's access token as the auth service signs one (for ids that have no account here)."""
    issuer = AccessTokenIssuer(
        parse_key_ring(system.signing_pem),
        issuer=system.auth_settings.issuer,
        audience=system.referral_settings.token_audience,
        ttl=300,
    )
    token = issuer.issue(subject, email=None, email_verified=True).token
    return {"Authorization": f"Bearer {token}"}


async def code_of(system, user: User, code: str | None = None) -> str:
    response = await system.create_code(user, code)
    assert response.status == 201, await response.text()
    return str((await response.json())["code"])


async def link(system, referral_id: str, referrer_id: str, email: str | None = None) -> None:
    response = await system.signup_link(referral_id, referrer_id, email or f"{referral_id[:8]}@example.org")
    assert response.status == 201, await response.text()


async def confirm(system, user_id: str) -> None:
    assert (await system.notify_verified(user_id)).status == 204


# --- statistics --------------------------------------------------------------------------------


async def test_stats_show_the_codes_uses_and_limit(system):
    owner = await system.user("limited@example.com")
    expires_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    created = await system.referral.post(
        "/api/v1/referral/codes", json={"expires_at": expires_at, "max_uses": 5}, headers=owner.headers
    )
    assert created.status == 201, await created.text()
    code = (await created.json())["code"]
    referral = await system.user("limited-referral@example.com")
    assert (await system.activate(referral, code)).status == 201

    body = await (await system.referral.get(stats_path(owner.id), headers=owner.headers)).json()
    assert body["code"] == {"code": code, "expires_at": body["code"]["expires_at"], "max_uses": 5, "uses": 1}


async def test_stats_count_each_level_and_show_the_active_code(system):
    ann = await system.user("ann@example.com")
    code = await code_of(system, ann)
    # ann <- b1 (confirmed), b2 (pending); b1 <- c1 (confirmed); c1 <- d1 (pending); d1 <- e1 (level 4)
    b1, b2, c1, d1, e1 = (str(uuid.uuid4()) for _ in range(5))
    for referral, referrer in ((b1, ann.id), (b2, ann.id), (c1, b1), (d1, c1), (e1, d1)):
        await link(system, referral, referrer)
    for user in (b1, c1):
        await confirm(system, user)

    response = await system.referral.get(stats_path(ann.id), headers=ann.headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"referrer_id", "total", "confirmed", "pending", "levels", "code"}
    assert body["referrer_id"] == ann.id
    assert body["levels"] == [
        {"level": 1, "total": 2, "confirmed": 1},
        {"level": 2, "total": 1, "confirmed": 1},
        {"level": 3, "total": 1, "confirmed": 0},
    ]  # REFERRAL_STATS_DEPTH defaults to 3: e1 (level 4) is not shown
    assert (body["total"], body["confirmed"], body["pending"]) == (4, 2, 2)
    assert body["code"]["code"] == code
    assert datetime.fromisoformat(body["code"]["expires_at"]) > datetime.now(UTC)
    assert set(body["code"]) == {"code", "expires_at", "max_uses", "uses"}
    assert body["code"]["max_uses"] is None

    # b1 sees their own levels: c1, d1, e1 at 1, 2, 3; and no code.
    response = await system.referral.get(stats_path(b1), headers=user_token(system, b1))
    body = await response.json()
    assert [(level["total"], level["confirmed"]) for level in body["levels"]] == [(1, 1), (1, 0), (1, 0)]
    assert body["code"] is None


async def test_stats_of_a_referrer_without_referrals_are_zeros(system):
    ann = await system.user("ann@example.com")
    response = await system.referral.get(stats_path(ann.id), headers=ann.headers)
    assert response.status == 200
    assert await response.json() == {
        "referrer_id": ann.id,
        "total": 0,
        "confirmed": 0,
        "pending": 0,
        "levels": [{"level": level, "total": 0, "confirmed": 0} for level in (1, 2, 3)],
        "code": None,
    }


async def test_stats_depth_is_a_setting(make_system):
    system = await make_system(stats_depth=5)
    root = str(uuid.uuid4())
    chain = [root] + [str(uuid.uuid4()) for _ in range(6)]
    for above, below in itertools.pairwise(chain):
        await link(system, below, above)
    body = await (await system.referral.get(stats_path(root), headers=user_token(system, root))).json()
    assert [level["total"] for level in body["levels"]] == [1, 1, 1, 1, 1]
    assert body["total"] == 5


async def test_stats_are_the_referrers_alone(system):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    await assert_problem(await system.referral.get(stats_path(ann.id), headers=bob.headers), 403, "forbidden")
    await assert_problem(await system.referral.get(stats_path("not-a-uuid"), headers=ann.headers), 422)
    response = await system.referral.get(stats_path(ann.id))
    assert response.status == 401


async def test_a_deleted_code_leaves_the_stats(system):
    ann = await system.user("ann@example.com")
    await code_of(system, ann)
    assert (await system.referral.delete("/api/v1/referral/codes/me", headers=ann.headers)).status == 204
    body = await (await system.referral.get(stats_path(ann.id), headers=ann.headers)).json()
    assert body["code"] is None


# --- leaderboard -------------------------------------------------------------------------------


async def test_the_leaderboard_ranks_confirmed_referrals_with_masked_emails(system, db):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    await code_of(system, ann)
    await code_of(system, bob)
    # bob: 2 confirmed; ann: 2 confirmed but her first one later; an unknown referrer: 1; pending: none.
    unknown = str(uuid.uuid4())
    made: list[tuple[str, str]] = []
    for referrer in (bob.id, ann.id, ann.id, bob.id, unknown, ann.id):
        referral = str(uuid.uuid4())
        await link(system, referral, referrer)
        made.append((referral, referrer))
    for referral, _ in made[:5]:
        await confirm(system, referral)

    response = await system.referral.get(LEADERBOARD)  # public, month by default
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body == {
        "period": "month",
        "items": [
            {"rank": 1, "referrer_id": bob.id, "email": "b***@example.com", "confirmed": 2},
            {"rank": 2, "referrer_id": ann.id, "email": "a***@example.com", "confirmed": 2},
            {"rank": 3, "referrer_id": unknown, "email": None, "confirmed": 1},
        ],
    }
    for period in ("week", "all"):
        body = await (await system.referral.get(LEADERBOARD, params={"period": period})).json()
        assert body["period"] == period
        assert [item["referrer_id"] for item in body["items"]] == [bob.id, ann.id, unknown]
    body = await (await system.referral.get(LEADERBOARD, params={"limit": "1"})).json()
    assert [item["rank"] for item in body["items"]] == [1]
    # The same count and the same first confirmation: the smaller id first.
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.referrals SET confirmed_at = '2026-01-05T00:00:00Z' WHERE status = 'confirmed'"
        )
    body = await (await system.referral.get(LEADERBOARD, params={"period": "all"})).json()
    assert [item["referrer_id"] for item in body["items"]] == [*sorted([ann.id, bob.id]), unknown]


@pytest.mark.parametrize(
    "query",
    [{"period": "year"}, {"period": ""}, {"limit": "0"}, {"limit": "101"}, {"limit": "ten"}],
)
async def test_a_bad_leaderboard_query_is_422(system, query):
    await assert_problem(await system.referral.get(LEADERBOARD, params=query), 422)


def _previous_boundaries(now: datetime) -> dict[str, datetime]:
    week = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return {"week": week, "month": month}


async def test_leaderboard_periods_end_at_their_boundaries(system, db):
    """A confirmation in the last second of the previous week or month is not in the current one; one in
    its first second is. Set directly in the database: the triggers move the counts."""
    now = datetime.now(UTC)
    starts = _previous_boundaries(now)
    counted: dict[str, str] = {}
    for period, start in starts.items():
        inside, outside = str(uuid.uuid4()), str(uuid.uuid4())
        for referrer, at in ((inside, start), (outside, start - timedelta(microseconds=1))):
            referral = str(uuid.uuid4())
            await link(system, referral, referrer)
            await confirm(system, referral)
            with db.cursor() as cursor:
                cursor.execute(
                    "UPDATE referral.referrals SET confirmed_at = %s WHERE referral_id = %s", (at, referral)
                )
        counted[period] = inside
        counted[f"not-{period}"] = outside

    boards = {}
    for period in ("week", "month", "all"):
        body = await (await system.referral.get(LEADERBOARD, params={"period": period, "limit": 100})).json()
        boards[period] = {item["referrer_id"] for item in body["items"]}
    assert counted["week"] in boards["week"]
    assert counted["not-week"] not in boards["week"]
    assert counted["month"] in boards["month"]
    assert counted["not-month"] not in boards["month"]
    # The first second of the week is in the month too unless the week began last month.
    assert (counted["week"] in boards["month"]) == (starts["week"] >= starts["month"])
    assert (counted["not-week"] in boards["month"]) == (starts["week"] > starts["month"])
    assert boards["all"] == set(counted.values())


async def test_confirmed_at_is_stamped_when_a_link_is_confirmed(system, db):
    referrer, referral = str(uuid.uuid4()), str(uuid.uuid4())
    await link(system, referral, referrer)
    with db.cursor() as cursor:
        cursor.execute("SELECT status, confirmed_at FROM referral.referrals")
        assert cursor.fetchall() == [("pending", None)]
    await confirm(system, referral)
    with db.cursor() as cursor:
        cursor.execute("SELECT status, confirmed_at IS NOT NULL FROM referral.referrals")
        assert cursor.fetchall() == [("confirmed", True)]


async def test_erased_links_leave_the_counters(system, db):
    root, middle, leaf = (str(uuid.uuid4()) for _ in range(3))
    await link(system, middle, root)
    await link(system, leaf, middle)
    await confirm(system, leaf)
    await confirm(system, middle)
    with db.cursor() as cursor:
        cursor.execute("DELETE FROM referral.referrals WHERE referral_id = %s", (middle,))
        cursor.execute(
            "SELECT referrer_id::text, level, total, confirmed FROM referral.referrer_levels WHERE total > 0"
        )
        assert cursor.fetchall() == [(middle, 1, 1, 1)]
        cursor.execute(
            "SELECT period, referrer_id::text, confirmed FROM referral.leaderboard_counts ORDER BY 1"
        )
        assert cursor.fetchall() == [(p, middle, 1) for p in ("all", "month", "week")]


# --- self-referral under another spelling ------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "alias"),
    [
        ("jane.doe@gmail.com", "JaneDoe@gmail.com"),
        ("jane.doe@gmail.com", "j.a.n.e.doe+promo@googlemail.com"),
        ("ann@example.com", "Ann+second@Example.com"),
    ],
)
async def test_activation_by_the_owners_alias_is_self_referral(system, owner, alias):
    first = await system.user(owner)
    second = await system.user(alias)
    code = await code_of(system, first)
    await assert_problem(await system.activate(second, code), 422, "self_referral")


async def test_another_mailbox_is_not_self_referral(system):
    first = await system.user("jane.doe@example.com")
    second = await system.user("janedoe@example.com")  # dots count outside Gmail
    code = await code_of(system, first)
    assert (await system.activate(second, code)).status == 201


@pytest.mark.parametrize("alias", ["Jane.Doe+x@gmail.com", "janedoe@googlemail.com"])
async def test_signup_with_the_owners_alias_is_self_referral(system, db, alias):
    owner = await system.user("jane.doe@gmail.com")
    code = await code_of(system, owner)
    response = await system.auth.post(
        "/api/v1/auth/signup", json={"email": alias, "password": "correct horse", "referral_code": code}
    )
    await assert_problem(response, 422, "self_referral")
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users")
        assert cursor.fetchone() == (1,)


# --- disposable domains at signup --------------------------------------------------------------


@pytest.mark.parametrize("email", ["someone@mailinator.com", "someone@Sub.Mailinator.com"])
async def test_disposable_domains_are_refused_at_signup(system, db, email):
    response = await system.auth.post(
        "/api/v1/auth/signup", json={"email": email, "password": "correct horse"}
    )
    await assert_problem(response, 422, "email_undeliverable")
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users")
        assert cursor.fetchone() == (0,)


async def test_disposable_domains_are_allowed_when_blocking_is_off(aiohttp_client, auth_settings, db):
    auth = await aiohttp_client(create_auth_app(replace(auth_settings, block_disposable=False)))
    response = await auth.post(
        "/api/v1/auth/signup", json={"email": "someone@mailinator.com", "password": "correct horse"}
    )
    assert response.status == 201, await response.text()


@pytest.mark.parametrize("depth", ["0", "6"])
def test_the_stats_depth_is_within_the_counted_levels(referral_settings, depth):
    environ = {
        "DATABASE_URL": referral_settings.database_url,
        "REDIS_URL": referral_settings.redis_url,
        f"{REFERRAL_PREFIX}STATS_DEPTH": depth,
    }
    with pytest.raises(SettingsError, match="STATS_DEPTH"):
        load_settings(ReferralSettings, REFERRAL_PREFIX, environ)
