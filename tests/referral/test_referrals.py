"""POST /api/v1/referral/referrals (activation) and GET /api/v1/referral/referrers/{id}/referrals."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest

from tests.helpers import assert_problem
from tests.referral.conftest import REFERRALS


async def code_of(system, user, code=None):
    response = await system.create_code(user, code)
    assert response.status == 201, await response.text()
    return (await response.json())["code"]


async def test_activation_links_the_caller_to_the_owner(system, db):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    code = await code_of(system, ann)
    response = await system.activate(bob, code.lower())
    assert response.status == 201
    body = await response.json()
    assert set(body) == {"referrer_id", "referral_id", "created_at", "status"}
    assert body["referrer_id"] == ann.id
    assert body["referral_id"] == bob.id
    assert body["created_at"].endswith("+00:00")
    assert body["status"] == "confirmed"  # bob's token says his address is proven
    with db.cursor() as cursor:
        cursor.execute("SELECT referrer_id::text, referral_email, code, status FROM referral.referrals")
        assert cursor.fetchall() == [(ann.id, "bob@example.com", code, "confirmed")]


async def test_activation_errors(system, db):
    ann, bob, cat = [await system.user(f"{n}@example.com") for n in ("ann", "bob", "cat")]
    code = await code_of(system, ann)
    await assert_problem(await system.activate(bob, "NOSUCHCODE"), 404, "code_not_found")
    await assert_problem(await system.activate(ann, code), 422, "self_referral")
    assert (await system.activate(bob, code)).status == 201
    await assert_problem(await system.activate(bob, code), 409, "already_referred")
    # bob is ann's referral: ann using bob's code would close a cycle.
    bob_code = await code_of(system, bob)
    await assert_problem(await system.activate(ann, bob_code), 422, "referral_cycle")
    # So would a longer one: cat joins via bob, then ann tries cat's code.
    assert (await system.activate(cat, bob_code)).status == 201
    cat_code = await code_of(system, cat)
    await assert_problem(await system.activate(ann, cat_code), 422, "referral_cycle")
    # Expired and deleted codes are refused with 410.
    dan = await system.user("dan@example.com")
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.codes SET created_at = now() - interval '2 hours',"
            " expires_at = now() - interval '1 second' WHERE code = %s",
            (cat_code,),
        )
    await assert_problem(await system.activate(dan, cat_code), 410, "code_expired")
    assert (await system.referral.delete("/api/v1/referral/codes/me", headers=ann.headers)).status == 204
    await assert_problem(await system.activate(dan, code), 410, "code_expired")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"code": ""}, 422),
        ({"code": 5}, 422),
        ({"code": "x" * 65}, 422),
        ({"code": "a", "x": 1}, 422),
    ],
)
async def test_activation_validation(system, body, status):
    bob = await system.user("bob@example.com")
    response = await system.referral.post(REFERRALS, json=body, headers=bob.headers)
    assert response.status == status


async def test_activation_needs_a_token(system):
    response = await system.referral.post(REFERRALS, json={"code": "whatever"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    # Without a token, even a bad body answers 401 first.
    assert (await system.referral.post(REFERRALS, data=b"{not json")).status == 401


async def test_twenty_simultaneous_activations_make_one_link(system, db):
    owners = [await system.user(f"owner{n}@example.com") for n in range(4)]
    codes = [await code_of(system, owner) for owner in owners]
    eve = await system.user("eve@example.com")
    responses = await asyncio.gather(*(system.activate(eve, codes[n % 4]) for n in range(20)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 19
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.referrals WHERE referral_id = %s", (eve.id,))
        assert cursor.fetchone()[0] == 1


async def test_users_using_each_others_codes_at_once_cannot_form_a_cycle(system, db):
    for round_ in range(5):
        a, b = await system.user(f"a{round_}@example.com"), await system.user(f"b{round_}@example.com")
        code_a, code_b = await code_of(system, a), await code_of(system, b)
        first, second = await asyncio.gather(system.activate(a, code_b), system.activate(b, code_a))
        assert sorted([first.status, second.status]) == [201, 422]
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM referral.referrals x JOIN referral.referrals y"
            " ON x.referrer_id = y.referral_id AND y.referrer_id = x.referral_id"
        )
        assert cursor.fetchone()[0] == 0


async def test_a_ring_closed_from_both_ends_at_once_cannot_form_a_cycle(system, db):
    """a<-b and c<-d exist; b uses c's code while d uses a's code: together they would close a-b-c-d-a."""
    a, b, c, d = [await system.user(f"{n}@example.com") for n in "abcd"]
    assert (await system.activate(b, await code_of(system, a))).status == 201
    assert (await system.activate(d, await code_of(system, c))).status == 201
    code_b_owner_c = await code_of(system, b)
    code_d = await code_of(system, d)
    # c becomes b's referral (edge b->c) while a becomes d's referral (edge d->a): a->b->c->d->a.
    first, second = await asyncio.gather(system.activate(c, code_b_owner_c), system.activate(a, code_d))
    assert sorted([first.status, second.status]) == [201, 422]


async def test_listing_masks_emails_for_anyone_but_the_referrer(system):
    ann, bob, cat = [await system.user(f"{n}@example.com") for n in ("ann", "Bob.Smith", "cat")]
    assert (await system.activate(bob, await code_of(system, ann))).status == 201
    mine = await (await system.referrals_of(ann, ann.id)).json()
    theirs = await (await system.referrals_of(cat, ann.id)).json()
    assert mine["items"][0]["email"] == "Bob.Smith@example.com"
    assert theirs["items"][0]["email"] == "B***@example.com"
    assert mine["total"] == theirs["total"] == 1
    assert mine["confirmed"] == theirs["confirmed"] == 1
    assert mine["items"][0]["referral_id"] == bob.id
    assert mine["items"][0]["status"] == theirs["items"][0]["status"] == "confirmed"
    assert set(mine) == {"referrer_id", "total", "confirmed", "items", "next_cursor"}
    assert set(mine["items"][0]) == {"referral_id", "email", "joined_at", "status"}
    assert mine["next_cursor"] is None


async def test_listing_of_someone_without_referrals_is_empty(system):
    ann = await system.user("ann@example.com")
    body = await (await system.referrals_of(ann, str(uuid.uuid4()))).json()
    assert body["total"] == 0
    assert body["confirmed"] == 0
    assert body["items"] == []
    assert body["next_cursor"] is None


@pytest.mark.parametrize(
    ("path_id", "query"),
    [
        ("not-a-uuid", {}),
        ("VALID", {"limit": 0}),
        ("VALID", {"limit": 101}),
        ("VALID", {"limit": "ten"}),
        ("VALID", {"cursor": "garbage"}),
        ("VALID", {"cursor": "W10"}),  # base64 of []
        ("VALID", {"cursor": "WyJ4IiwieSJd"}),  # ["x","y"]
        ("VALID", {"cursor": "x" * 201}),
    ],
)
async def test_listing_validation(system, path_id, query):
    ann = await system.user("ann@example.com")
    referrer = ann.id if path_id == "VALID" else path_id
    response = await system.referrals_of(ann, referrer, **query)
    assert response.status == 422, await response.text()
    assert response.content_type == "application/problem+json"


def _cursor(created_at: str) -> str:
    raw = json.dumps([created_at, str(uuid.uuid4())]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("created_at", "status"),
    [
        ("2026-01-01T10:00:00+20:00", 200),  # a valid instant PostgreSQL's input would refuse
        ("2026-01-01T10:00:00-23:59", 200),
        ("9999-12-31T23:59:59-23:59", 422),  # past the end of the calendar in UTC
        ("0001-01-01T00:00:00+23:59", 422),
    ],
)
async def test_a_cursor_with_any_offset_is_a_page_or_a_validation_error(system, created_at, status):
    ann = await system.user("ann@example.com")
    response = await system.referrals_of(ann, ann.id, cursor=_cursor(created_at))
    assert response.status == status, await response.text()


async def test_listing_needs_a_token(system):
    response = await system.referral.get(f"/api/v1/referral/referrers/{uuid.uuid4()}/referrals")
    assert response.status == 401


async def test_250_referrals_page_through_newest_first_without_gaps(system, db):
    ann = await system.user("ann@example.com")
    with db.cursor() as cursor:
        # Some share a created_at, so the tie-break on referral_id is exercised too.
        cursor.execute(
            "INSERT INTO referral.referrals"
            " (referral_id, referrer_id, referral_email, code, created_at, status)"
            " SELECT gen_random_uuid(), %s, 'r' || n || '@example.com', 'CODE',"
            "        now() - (n / 3) * interval '1 second',"
            "        CASE WHEN n %% 5 = 0 THEN 'pending' ELSE 'confirmed' END"
            " FROM generate_series(1, 250) AS n",
            (ann.id,),
        )
        cursor.execute(
            "SELECT referral_id::text, status FROM referral.referrals WHERE referrer_id = %s"
            " ORDER BY created_at DESC, referral_id DESC",
            (ann.id,),
        )
        expected = cursor.fetchall()
    seen, cursor_value, pages = [], None, 0
    while True:
        query = {"limit": 40}
        if cursor_value:
            query["cursor"] = cursor_value
        response = await system.referrals_of(ann, ann.id, **query)
        assert response.status == 200
        body = await response.json()
        assert body["total"] == 250
        assert body["confirmed"] == 200
        seen.extend((item["referral_id"], item["status"]) for item in body["items"])
        pages += 1
        cursor_value = body["next_cursor"]
        if cursor_value is None:
            break
    assert seen == expected
    assert pages == 7
