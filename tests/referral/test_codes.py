"""POST, GET and DELETE of a referral code (`/api/v1/referral/codes`, `/codes/me`) against API.md."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from joserfc import jwt

from services.auth.adapters.signing import parse_key_ring
from services.referral.domain.codes import ALPHABET, LENGTH, generate_code
from tests.helpers import assert_problem

CODES = "/api/v1/referral/codes"
MY_CODE = "/api/v1/referral/codes/me"
REFERRALS = "/api/v1/referral/referrals"
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
LOOK_ALIKES = set("0O1ILUV")


def assert_rfc3339(value: Any) -> datetime:
    assert isinstance(value, str) and RFC3339.fullmatch(value), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None, value
    return parsed


def ahead(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def post_code(system: Any, user: Any, body: Any) -> Any:
    return await system.referral.post(CODES, json=body, headers=user.headers)


def expire(db: Any, owner_id: str) -> None:
    """Make the owner's codes expired, as if their time had passed."""
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.codes SET expires_at = now() - interval '1 second',"
            " created_at = now() - interval '2 seconds' WHERE owner_id = %s",
            (owner_id,),
        )
        assert cursor.rowcount >= 1


def open_codes(db: Any, owner_id: str) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT code FROM referral.codes WHERE owner_id = %s AND deleted_at IS NULL", (owner_id,)
        )
        return [row[0] for row in cursor.fetchall()]


# --- creation ------------------------------------------------------------------------------------


async def test_create_answers_201_with_the_documented_body(system, db):
    alice = await system.user("alice@example.com")
    expires_at = datetime.now(UTC) + timedelta(hours=2)
    before = datetime.now(UTC)
    response = await post_code(system, alice, {"expires_at": expires_at.isoformat()})
    assert response.status == 201, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"code", "expires_at", "created_at", "owner_id", "max_uses", "uses"}
    assert body["owner_id"] == alice.id
    assert abs((assert_rfc3339(body["expires_at"]) - expires_at).total_seconds()) < 1e-3
    created = assert_rfc3339(body["created_at"])
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)
    assert re.fullmatch(f"[{ALPHABET}]{{{LENGTH}}}", body["code"]), body["code"]
    assert open_codes(db, alice.id) == [body["code"]]


async def test_expires_at_with_another_offset_is_the_same_instant(system):
    alice = await system.user("alice@example.com")
    local = (datetime.now(UTC) + timedelta(hours=3)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    response = await post_code(system, alice, {"expires_at": local.isoformat()})
    assert response.status == 201, await response.text()
    body = await response.json()
    assert abs((assert_rfc3339(body["expires_at"]) - local).total_seconds()) < 1e-3


@pytest.mark.parametrize("hours", [16, 20, -20, 23])
async def test_expires_at_with_an_offset_postgresql_cannot_store_is_the_same_instant(system, hours):
    """RFC 3339 allows offsets up to 23:59; PostgreSQL's timestamptz input only up to 15:59."""
    alice = await system.user(f"alice{hours}@example.com")
    offset = timezone(timedelta(hours=hours, minutes=59 if hours > 0 else -59))
    local = (datetime.now(UTC) + timedelta(days=2)).astimezone(offset)
    response = await post_code(system, alice, {"expires_at": local.isoformat()})
    assert response.status == 201, await response.text()
    body = await response.json()
    assert abs((assert_rfc3339(body["expires_at"]) - local).total_seconds()) < 1e-3


@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
async def test_expires_at_at_the_ends_of_the_calendar_is_a_validation_error(system, expires_at):
    alice = await system.user("alice@example.com")
    response = await post_code(system, alice, {"expires_at": expires_at})
    body = await assert_problem(response, 422, "validation_failed")
    assert "expires_at" in body["errors"]


def test_generated_codes_use_the_alphabet_without_look_alikes_and_are_distinct():
    assert len(ALPHABET) == len(set(ALPHABET))
    assert not LOOK_ALIKES & set(ALPHABET.upper())
    assert LENGTH * math.log2(len(ALPHABET)) >= 50
    codes = [generate_code() for _ in range(200)]
    assert len(set(codes)) == 200
    for code in codes:
        assert len(code) == 11 == LENGTH, code
        assert set(code) <= set(ALPHABET), code
        assert not LOOK_ALIKES & set(code.upper()), code


async def test_null_code_is_treated_as_omitted(system):
    """`code: null` (the schema's default) gets a generated code."""
    alice = await system.user("alice@example.com")
    response = await post_code(system, alice, {"expires_at": ahead(hours=1), "code": None})
    assert response.status == 201, await response.text()
    assert re.fullmatch(f"[{ALPHABET}]{{{LENGTH}}}", (await response.json())["code"])


async def test_vanity_code_is_stored_as_given(system, db):
    alice = await system.user("alice@example.com")
    for vanity in ("abcd", "My_Code-2024", "Z" * 32, "0000", "----", "a_B-"):
        response = await system.create_code(alice, vanity)
        assert response.status == 201, (vanity, await response.text())
        assert (await response.json())["code"] == vanity
        assert open_codes(db, alice.id) == [vanity]
        me = await system.referral.get(MY_CODE, headers=alice.headers)
        assert me.status == 200
        assert (await me.json())["code"] == vanity
        assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204


async def test_vanity_code_is_unique_case_insensitively(system, db):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    assert (await system.create_code(alice, "abcd")).status == 201
    for text in ("ABCD", "abcd", "AbCd"):
        await assert_problem(await system.create_code(bob, text), 409, "code_taken")
    assert open_codes(db, bob.id) == []
    await assert_problem(await system.referral.get(MY_CODE, headers=bob.headers), 404, "code_not_found")
    assert (await system.create_code(bob, "abcde")).status == 201


async def test_deleted_code_text_stays_taken(system):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    assert (await system.create_code(alice, "Gone_Code")).status == 201
    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    await assert_problem(await system.create_code(bob, "GONE_CODE"), 409, "code_taken")
    await assert_problem(await system.create_code(alice, "gone_code"), 409, "code_taken")


async def test_expired_code_text_stays_taken(system, db):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    assert (await system.create_code(alice, "Old_Code")).status == 201
    expire(db, alice.id)
    await assert_problem(await system.create_code(bob, "old_code"), 409, "code_taken")
    await assert_problem(await system.create_code(alice, "OLD_CODE"), 409, "code_taken")


async def test_second_code_while_one_is_active_is_409(system, db):
    alice = await system.user("alice@example.com")
    first = await system.create_code(alice)
    assert first.status == 201
    await assert_problem(await system.create_code(alice), 409, "active_code_exists")
    await assert_problem(await system.create_code(alice, "another"), 409, "active_code_exists")
    assert open_codes(db, alice.id) == [(await first.json())["code"]]


async def test_new_code_after_delete(system, db):
    alice = await system.user("alice@example.com")
    first = await (await system.create_code(alice)).json()
    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    second = await system.create_code(alice, "fresh")
    assert second.status == 201, await second.text()
    assert (await second.json())["code"] == "fresh" != first["code"]
    me = await system.referral.get(MY_CODE, headers=alice.headers)
    assert (await me.json())["code"] == "fresh"
    assert open_codes(db, alice.id) == ["fresh"]


async def test_new_code_after_expiry(system, db):
    alice = await system.user("alice@example.com")
    first = await (await system.create_code(alice)).json()
    expire(db, alice.id)
    second = await system.create_code(alice)
    assert second.status == 201, await second.text()
    body = await second.json()
    assert body["code"] != first["code"]
    me = await system.referral.get(MY_CODE, headers=alice.headers)
    assert (await me.json())["code"] == body["code"]
    assert open_codes(db, alice.id) == [body["code"]]


# --- validation ----------------------------------------------------------------------------------


def _naive() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()


EXPIRY_CASES = {
    "missing": lambda: None,
    "null": lambda: {"expires_at": None},
    "naive": lambda: {"expires_at": _naive()},
    "not a date": lambda: {"expires_at": "tomorrow"},
    "empty": lambda: {"expires_at": ""},
    "number": lambda: {"expires_at": int(time.time()) + 3600},
    "30 seconds ahead": lambda: {"expires_at": ahead(seconds=30)},
    "now": lambda: {"expires_at": ahead()},
    "in the past": lambda: {"expires_at": ahead(hours=-1)},
    "366 days ahead": lambda: {"expires_at": ahead(days=366)},
    "365 days and an hour ahead": lambda: {"expires_at": ahead(days=365, hours=1)},
    "year 9999": lambda: {"expires_at": "9999-12-31T23:59:59+00:00"},
}


async def test_bad_expires_at_is_422(system, db):
    alice = await system.user("alice@example.com")
    failures = {}
    for case, make_body in EXPIRY_CASES.items():
        response = await post_code(system, alice, make_body() or {})
        text = await response.text()
        if response.status != 422 or "expires_at" not in (await response.json(content_type=None)).get(
            "errors", {}
        ):
            failures[case] = (response.status, text)
            continue
        await assert_problem(response, 422)
    assert not failures, failures
    assert open_codes(db, alice.id) == []


async def test_expires_at_within_bounds_is_accepted(system):
    alice = await system.user("alice@example.com")
    for delta in (timedelta(days=364), timedelta(days=365, minutes=-5), timedelta(minutes=2)):
        response = await post_code(system, alice, {"expires_at": (datetime.now(UTC) + delta).isoformat()})
        assert response.status == 201, (delta, await response.text())
        assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204


BAD_VANITY = {
    "3 chars": "abc",
    "33 chars": "a" * 33,
    "empty": "",
    "space inside": "ab cd",
    "leading space": " abcd",
    "trailing space": "abcd ",
    "trailing newline": "abcd\n",
    "unicode letter": "abcé",
    "unicode uppercase": "ÄBCD",
    "arabic digits": "١٢٣٤",
    "dot": "ab.cd",
    "bang": "abcd!",
    "slash": "ab/cd",
    "percent": "ab%cd",
    "nul": "ab\x00cd",
    "number": 12345,
    "list": ["abcd"],
    "object": {"code": "abcd"},
    "bool": True,
}


async def test_bad_vanity_code_is_422(system, db):
    alice = await system.user("alice@example.com")
    failures = {}
    for case, vanity in BAD_VANITY.items():
        response = await post_code(system, alice, {"expires_at": ahead(hours=1), "code": vanity})
        text = await response.text()
        if response.status != 422 or "code" not in (await response.json(content_type=None)).get("errors", {}):
            failures[case] = (response.status, text)
            if response.status == 201:
                assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
            continue
        await assert_problem(response, 422)
    assert not failures, failures
    assert open_codes(db, alice.id) == []


async def test_unknown_field_is_422(system, db):
    alice = await system.user("alice@example.com")
    response = await post_code(system, alice, {"expires_at": ahead(hours=1), "owner_id": str(uuid.uuid4())})
    problem = await assert_problem(response, 422)
    assert "owner_id" in problem["errors"], problem
    assert open_codes(db, alice.id) == []


async def test_malformed_json_is_400_and_non_json_is_415(system, db):
    alice = await system.user("alice@example.com")
    for raw in ('{"expires_at": ', "{'a': 1}", "nope", '{"expires_at": NaN}', b"\xff\xfe{}"):
        response = await system.referral.post(
            CODES, data=raw, headers={**alice.headers, "Content-Type": "application/json"}
        )
        await assert_problem(response, 400, "malformed_json")
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await system.referral.post(
            CODES,
            data=f"expires_at={ahead(hours=1)}",
            headers={**alice.headers, "Content-Type": content_type},
        )
        await assert_problem(response, 415, "unsupported_media_type")
    too_big = {"expires_at": ahead(hours=1), "code": "a" * (system.referral_settings.max_body_bytes + 1)}
    await assert_problem(await post_code(system, alice, too_big), 413)
    assert open_codes(db, alice.id) == []


async def test_json_that_is_not_an_object_is_4xx(system):
    alice = await system.user("alice@example.com")
    for body in ([], "abcd", 1, None, [{"expires_at": ahead(hours=1)}]):
        response = await post_code(system, alice, body)
        assert 400 <= response.status < 500, (body, await response.text())
        assert response.content_type == "application/problem+json"


# --- tokens --------------------------------------------------------------------------------------


def _token(signing_pem: str, issuer: str, user_id: str, email: str, *, exp_offset: int) -> str:
    key = parse_key_ring(signing_pem).signing_key
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": "referral-system",
        "sub": user_id,
        "email": email,
        "iat": now - 4000,
        "exp": now + exp_offset,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims, key, algorithms=["RS256"])


def assert_invalid_token(response: Any) -> None:
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"'), response.headers


async def test_missing_or_bad_token_is_401(system, db, signing_pem):
    alice = await system.user("alice@example.com")
    issuer = system.auth_settings.issuer
    valid_self_signed = _token(signing_pem, issuer, alice.id, alice.email, exp_offset=600)
    expired = _token(signing_pem, issuer, alice.id, alice.email, exp_offset=-3000)
    body = {"expires_at": ahead(hours=1)}
    bad_headers = {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic": {"Authorization": f"Basic {alice.access_token}"},
        "garbage": {"Authorization": "Bearer not-a-jwt"},
        "bad signature": {"Authorization": f"Bearer {alice.access_token[:-4]}AAAA"},
        "expired": {"Authorization": f"Bearer {expired}"},
    }
    for method, path in (("POST", CODES), ("GET", MY_CODE), ("DELETE", MY_CODE)):
        for name, headers in bad_headers.items():
            response = await system.referral.request(method, path, json=body, headers=headers)
            assert response.status == 401, (method, name, await response.text())
            await assert_problem(response, 401, "invalid_token")
            assert_invalid_token(response)
    assert open_codes(db, alice.id) == []
    # The hand-made token is accepted when it is not expired: the 401 above is for the expiry alone.
    good = {"Authorization": f"Bearer {valid_self_signed}"}
    assert (await system.referral.post(CODES, json=body, headers=good)).status == 201
    assert (await system.referral.get(MY_CODE, headers=good)).status == 200
    assert (await system.referral.delete(MY_CODE, headers=good)).status == 204


async def test_invalid_body_without_token_is_401_not_422(system):
    for data, content_type in (
        ('{"code": 1}', "application/json"),
        ('{"expires_at": "x", "extra": 1}', "application/json"),
        ("{", "application/json"),
        ("x", "text/plain"),
        ("", "application/json"),
    ):
        response = await system.referral.post(CODES, data=data, headers={"Content-Type": content_type})
        assert response.status == 401, (data, await response.text())
        await assert_problem(response, 401, "invalid_token")
        assert_invalid_token(response)


# --- GET /codes/me -------------------------------------------------------------------------------


async def test_get_my_code_answers_the_active_code(system):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    created = await (await system.create_code(alice, "Alice_Code")).json()
    assert (await system.create_code(bob)).status == 201
    response = await system.referral.get(MY_CODE, headers=alice.headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert set(body) == {"code", "expires_at", "created_at", "owner_id", "max_uses", "uses"}
    assert body["code"] == "Alice_Code"
    assert body["owner_id"] == alice.id
    assert assert_rfc3339(body["expires_at"]) == datetime.fromisoformat(created["expires_at"])
    assert assert_rfc3339(body["created_at"]) == datetime.fromisoformat(created["created_at"])


async def test_get_my_code_is_404_without_one(system, db):
    alice = await system.user("alice@example.com")
    await assert_problem(await system.referral.get(MY_CODE, headers=alice.headers), 404, "code_not_found")
    assert (await system.create_code(alice)).status == 201
    assert (await system.referral.get(MY_CODE, headers=alice.headers)).status == 200
    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    await assert_problem(await system.referral.get(MY_CODE, headers=alice.headers), 404, "code_not_found")
    assert (await system.create_code(alice)).status == 201
    assert (await system.referral.get(MY_CODE, headers=alice.headers)).status == 200
    expire(db, alice.id)
    await assert_problem(await system.referral.get(MY_CODE, headers=alice.headers), 404, "code_not_found")


# --- DELETE /codes/me ----------------------------------------------------------------------------


async def test_delete_twice_is_404_the_second_time(system, db):
    alice = await system.user("alice@example.com")
    assert (await system.create_code(alice)).status == 201
    response = await system.referral.delete(MY_CODE, headers=alice.headers)
    assert response.status == 204
    assert await response.read() == b""
    await assert_problem(await system.referral.delete(MY_CODE, headers=alice.headers), 404, "code_not_found")
    with db.cursor() as cursor:
        cursor.execute("SELECT deleted_at IS NOT NULL FROM referral.codes WHERE owner_id = %s", (alice.id,))
        assert cursor.fetchall() == [(True,)]


async def test_delete_without_code_and_of_expired_code_is_404(system, db):
    alice = await system.user("alice@example.com")
    await assert_problem(await system.referral.delete(MY_CODE, headers=alice.headers), 404, "code_not_found")
    assert (await system.create_code(alice)).status == 201
    expire(db, alice.id)
    await assert_problem(await system.referral.delete(MY_CODE, headers=alice.headers), 404, "code_not_found")


async def test_deleted_code_is_refused_on_the_very_next_request(system):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    code = (await (await system.create_code(alice)).json())["code"]
    # Warm every cache entry first: both reads answer the live code.
    lookup = await system.referral.get(CODES, params={"email": alice.email})
    assert lookup.status == 200 and (await lookup.json())["code"] == code
    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    await assert_problem(await system.activate(bob, code), 410, "code_expired")
    await assert_problem(await system.activate(bob, code.lower()), 410, "code_expired")
    await assert_problem(
        await system.referral.get(CODES, params={"email": alice.email}), 404, "code_not_found"
    )


# --- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_creations_by_one_user_make_one_code(system, db):
    alice = await system.user("alice@example.com")
    responses = await asyncio.gather(*(system.create_code(alice) for _ in range(20)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 19, statuses
    for response in responses:
        if response.status == 409:
            await assert_problem(response, 409, "active_code_exists")
    created = next(r for r in responses if r.status == 201)
    assert open_codes(db, alice.id) == [(await created.json())["code"]]
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.codes WHERE owner_id = %s", (alice.id,))
        assert cursor.fetchone()[0] == 1


async def test_concurrent_creations_of_one_vanity_code_by_many_users(system, db):
    users = await asyncio.gather(*(system.user(f"racer{i}@example.com") for i in range(20)))
    texts = ["Race_Code" if i % 2 else "RACE_CODE" for i in range(20)]
    responses = await asyncio.gather(*(system.create_code(u, t) for u, t in zip(users, texts, strict=True)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [201] + [409] * 19, statuses
    for response in responses:
        if response.status == 409:
            await assert_problem(response, 409, "code_taken")
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.codes WHERE lower(code) = 'race_code'")
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT count(*) FROM referral.codes")
        assert cursor.fetchone()[0] == 1
