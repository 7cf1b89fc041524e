"""Codes with a usage limit (API.md: `max_uses`, `uses`, 409 `code_exhausted`), on both real services.

Activations and signups with a code take uses of it; `max_uses` holds under any concurrency; a signup
reserves its use before its user is created, and its link consumes the reservation.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.auth.adapters.signing import AccessTokenIssuer, parse_key_ring
from services.referral.appkeys import USE_CASES
from tests.helpers import User, assert_problem
from tests.referral.conftest import CODES, System

MY_CODE = "/api/v1/referral/codes/me"
SIGNUP = "/api/v1/auth/signup"


def reservations(code: str) -> str:
    return f"/internal/v1/codes/{code}/reservations"


async def limited_code(system: System, owner: User, max_uses: int | None, code: str | None = None) -> Any:
    body: dict[str, Any] = {"expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    if max_uses is not None:
        body["max_uses"] = max_uses
    if code is not None:
        body["code"] = code
    response = await system.referral.post(CODES, json=body, headers=owner.headers)
    assert response.status == 201, await response.text()
    return await response.json()


def minted_user(system: System, email: str) -> User:
    """A user of the referral service without a signup: an access token signed with the auth service's
    key (the referral service verifies it against the auth service's JWKS like any other)."""
    issuer = AccessTokenIssuer(
        parse_key_ring(system.signing_pem),
        issuer=system.auth_settings.issuer,
        audience=system.referral_settings.token_audience,
        ttl=300,
    )
    user_id = uuid.uuid4()
    token = issuer.issue(user_id, email=email, email_verified=True).token
    return User(str(user_id), email, token)


def code_row(db: Any, code: str) -> tuple[int | None, int]:
    with db.cursor() as cursor:
        cursor.execute("SELECT max_uses, uses FROM referral.codes WHERE lower(code) = lower(%s)", (code,))
        row = cursor.fetchone()
    return row[0], row[1]


def links_with(db: Any, code: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.referrals WHERE lower(code) = lower(%s)", (code,))
        return int(cursor.fetchone()[0])


def users_named(db: Any, email: str) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users WHERE lower(email) = lower(%s)", (email,))
        return int(cursor.fetchone()[0])


async def reserve(system: System, code: str, referral_id: str) -> Any:
    """The auth service's reservation of a use of `code` for the user it is about to create."""
    body = {"referral_id": referral_id}
    return await system.referral.post(reservations(code), json=body, headers=system.service_headers())


async def exhausted_for_activation(system: System, code: str, email: str) -> None:
    await assert_problem(await system.activate(minted_user(system, email), code), 409, "code_exhausted")


async def signup(system: System, email: str, code: str) -> Any:
    body = {"email": email, "password": "correct horse", "referral_code": code}
    return await system.auth.post(SIGNUP, json=body)


# --- the fields --------------------------------------------------------------------------------------


async def test_create_with_max_uses_answers_max_uses_and_uses(system):
    ann = await system.user("ann@example.com")
    created = await limited_code(system, ann, 3)
    assert set(created) == {"code", "expires_at", "created_at", "owner_id", "max_uses", "uses"}
    assert (created["max_uses"], created["uses"]) == (3, 0)
    mine = await system.referral.get(MY_CODE, headers=ann.headers)
    assert mine.status == 200
    assert await mine.json() == created


async def test_no_max_uses_is_no_limit(system, db):
    ann = await system.user("ann@example.com")
    created = await limited_code(system, ann, None)
    assert (created["max_uses"], created["uses"]) == (None, 0)
    for n in range(3):
        response = await system.activate(minted_user(system, f"u{n}@example.com"), created["code"])
        assert response.status == 201, await response.text()
    body = await (await system.referral.get(MY_CODE, headers=ann.headers)).json()
    assert (body["max_uses"], body["uses"]) == (None, 3)


@pytest.mark.parametrize("bad", [0, -1, 1_000_001, 1.5, "5", True, [3]])
async def test_max_uses_out_of_range_or_not_an_integer_is_422(system, db, bad):
    ann = await system.user("ann@example.com")
    body = {"expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(), "max_uses": bad}
    response = await system.referral.post(CODES, json=body, headers=ann.headers)
    problem = await assert_problem(response, 422, "validation_failed")
    assert "max_uses" in problem["errors"], problem
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.codes")
        assert cursor.fetchone()[0] == 0


@pytest.mark.parametrize("edge", [1, 1_000_000])
async def test_max_uses_bounds_are_accepted(system, edge):
    ann = await system.user("ann@example.com")
    assert (await limited_code(system, ann, edge))["max_uses"] == edge


# --- exhaustion ----------------------------------------------------------------------------------------


async def test_activation_of_an_exhausted_code_is_409_and_links_nobody(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 2))["code"]
    for n in range(2):
        assert (await system.activate(minted_user(system, f"ok{n}@example.com"), code)).status == 201
    late = minted_user(system, "late@example.com")
    await assert_problem(await system.activate(late, code), 409, "code_exhausted")
    assert links_with(db, code) == 2
    assert code_row(db, code) == (2, 2)
    mine = await (await system.referral.get(MY_CODE, headers=ann.headers)).json()
    assert (mine["max_uses"], mine["uses"]) == (2, 2)


async def test_signup_with_an_exhausted_code_is_409_and_creates_nothing(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 1))["code"]
    assert (await system.activate(minted_user(system, "first@example.com"), code)).status == 201
    response = await signup(system, "second@example.com", code)
    await assert_problem(response, 409, "code_exhausted")
    assert users_named(db, "second@example.com") == 0
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.referral_outbox")
        assert cursor.fetchone()[0] == 0
        cursor.execute("SELECT count(*) FROM referral.code_reservations")
        assert cursor.fetchone()[0] == 0
    assert links_with(db, code) == 1
    assert code_row(db, code) == (1, 1)


async def test_a_signup_uses_the_code_and_its_link_consumes_the_reservation(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 2))["code"]
    response = await signup(system, "new@example.com", code)
    assert response.status == 201, await response.text()
    user_id = (await response.json())["user"]["id"]
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT referral_id::text FROM referral.referrals WHERE lower(code) = lower(%s)", (code,)
        )
        assert cursor.fetchall() == [(user_id,)]
        cursor.execute("SELECT count(*) FROM referral.code_reservations")
        assert cursor.fetchone()[0] == 0  # consumed by the link, in the link's transaction
    assert code_row(db, code) == (2, 1)  # one use, not two


async def test_50_concurrent_activations_and_signups_on_max_uses_10_make_exactly_10_links(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 10))["code"]
    activators = [minted_user(system, f"act{n}@example.com") for n in range(25)]

    async def activation(user: User) -> tuple[str, int, str | None]:
        response = await system.activate(user, code)
        body = await response.json(content_type=None)
        return "activation", response.status, body.get("code") if response.status != 201 else None

    async def a_signup(n: int) -> tuple[str, int, str | None]:
        response = await signup(system, f"sig{n}@example.com", code)
        body = await response.json(content_type=None)
        return "signup", response.status, body.get("code") if response.status != 201 else None

    tasks = [activation(user) for user in activators] + [a_signup(n) for n in range(25)]
    results = await asyncio.gather(*tasks)
    successes = [r for r in results if r[1] == 201]
    refused = [r for r in results if r[1] != 201]
    assert len(successes) == 10, results
    assert {(status, problem) for _, status, problem in refused} == {(409, "code_exhausted")}, results
    # Every success is a link now (a signup's link is delivered before its answer), and no more.
    assert links_with(db, code) == 10
    assert code_row(db, code) == (10, 10)
    signed_up = sum(kind == "signup" for kind, _, _ in successes)
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users WHERE email LIKE 'sig%%@example.com'")
        assert cursor.fetchone()[0] == signed_up  # a refused signup created nothing
        cursor.execute("SELECT count(*) FROM referral.code_reservations")
        assert cursor.fetchone()[0] == 0


# --- reservations (the auth service's side of a signup) ------------------------------------------------


async def test_a_reservation_is_idempotent_by_referral_id_and_released_once(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 2, "Ann-Code"))["code"]
    headers = system.service_headers()
    referral_id = str(uuid.uuid4())
    first = await reserve(system, "ann-code", referral_id)
    assert first.status == 201, await first.text()
    body = await first.json()
    assert (body["code"], body["owner_id"], body["referral_id"]) == (code, ann.id, referral_id)
    assert (body["max_uses"], body["uses"]) == (2, 1)
    again = await reserve(system, code, referral_id)
    assert again.status == 201
    assert await again.json() == body
    assert code_row(db, code) == (2, 1)  # taken once
    # The signup failed: the use goes back, once.
    for _ in range(2):
        released = await system.referral.delete(f"{reservations(code)}/{referral_id}", headers=headers)
        assert released.status == 204
        assert code_row(db, code) == (2, 0)
    # A user's token does not open it.
    refused = await system.referral.post(
        reservations(code), json={"referral_id": referral_id}, headers=ann.headers
    )
    assert refused.status in (401, 403)


async def test_reservations_count_toward_the_limit(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 1))["code"]
    held = await reserve(system, code, str(uuid.uuid4()))
    assert held.status == 201
    other = await reserve(system, code, str(uuid.uuid4()))
    await assert_problem(other, 409, "code_exhausted")
    await exhausted_for_activation(system, code, "b@example.com")


async def test_a_reserved_signup_link_is_recorded_though_activations_exhausted_the_code_meanwhile(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 2))["code"]
    referral_id = str(uuid.uuid4())
    reserved = await reserve(system, code, referral_id)
    assert reserved.status == 201
    # The user is created (in the auth service); meanwhile an activation takes the last use.
    assert (await system.activate(minted_user(system, "quick@example.com"), code)).status == 201
    await exhausted_for_activation(system, code, "late@example.com")
    # The signup's link arrives (the outbox): it consumes its reservation and is never refused.
    link = await system.signup_link(referral_id, ann.id, "reserved@example.com", code)
    assert link.status == 201, await link.text()
    assert links_with(db, code) == 2
    assert code_row(db, code) == (2, 2)
    again = await system.signup_link(referral_id, ann.id, "reserved@example.com", code)
    assert again.status == 200  # idempotent: nothing taken again
    assert code_row(db, code) == (2, 2)


async def test_an_unreserved_signup_link_takes_a_use_and_is_refused_when_none_is_left(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 1))["code"]
    assert (await system.signup_link(str(uuid.uuid4()), ann.id, "a@example.com", code)).status == 201
    assert code_row(db, code) == (1, 1)
    refused = await system.signup_link(str(uuid.uuid4()), ann.id, "b@example.com", code)
    await assert_problem(refused, 409, "code_exhausted")
    assert links_with(db, code) == 1


async def test_the_sweep_gives_back_the_uses_of_expired_reservations(system, db):
    ann = await system.user("ann@example.com")
    code = (await limited_code(system, ann, 1))["code"]
    crashed = str(uuid.uuid4())  # the auth service reserved, then died before creating the user
    assert (await reserve(system, code, crashed)).status == 201
    await exhausted_for_activation(system, code, "b@example.com")
    use_cases = system.referral.app[USE_CASES]
    assert await use_cases.release_expired_reservations() == 0  # not expired yet: kept
    assert code_row(db, code) == (1, 1)
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.code_reservations SET created_at = now() - interval '2 days',"
            " expires_at = now() - interval '1 second' WHERE referral_id = %s",
            (crashed,),
        )
    assert await use_cases.release_expired_reservations() == 1
    assert code_row(db, code) == (1, 0)
    assert (await system.activate(minted_user(system, "c@example.com"), code)).status == 201
    assert code_row(db, code) == (1, 1)


async def test_reservation_input_is_validated(system):
    headers = system.service_headers()
    bad_id = await system.referral.post(reservations("SOME-CODE"), json={"referral_id": "x"}, headers=headers)
    await assert_problem(bad_id, 422, "validation_failed")
    bad_code = await system.referral.post(
        reservations("a%00bcd"), json={"referral_id": str(uuid.uuid4())}, headers=headers
    )
    await assert_problem(bad_code, 422, "validation_failed")
    release = await system.referral.delete(f"{reservations('a%00bcd')}/{uuid.uuid4()}", headers=headers)
    await assert_problem(release, 422, "validation_failed")
    unknown = await system.referral.post(
        reservations("NO-SUCH-CODE"), json={"referral_id": str(uuid.uuid4())}, headers=headers
    )
    await assert_problem(unknown, 404, "code_not_found")
