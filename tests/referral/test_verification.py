"""Email ownership in the referral service: a link's status (pending, confirmed), the auth service's
"verified" notice (`POST /internal/v1/users/{id}/verified`), codes only for proven users, and the
counts the database keeps (API.md: "Email ownership, recovery and sessions", "Referral service")."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import assert_problem, verify_email
from tests.referral.conftest import verified_path

MY_CODE = "/api/v1/referral/codes/me"
SIGNUP = "/api/v1/auth/signup"


async def code_of(system: Any, user: Any, code: str | None = None) -> str:
    response = await system.create_code(user, code)
    assert response.status == 201, await response.text()
    return str((await response.json())["code"])


def rows(db: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def totals(db: Any, referrers: list[str]) -> dict[str, tuple[int, int]]:
    """(total, confirmed) of each referrer as referral.referrer_totals keeps them."""
    found = rows(
        db,
        "SELECT referrer_id::text, total, confirmed FROM referral.referrer_totals"
        " WHERE referrer_id = ANY(%s::uuid[])",
        (referrers,),
    )
    return {referrer: (total, confirmed) for referrer, total, confirmed in found}


def counted(db: Any, referrers: list[str]) -> dict[str, tuple[int, int]]:
    """(total, confirmed) of each referrer counted over referral.referrals (a referrer without rows: 0, 0)."""
    found = rows(
        db,
        "SELECT referrer_id::text, count(*), count(*) FILTER (WHERE status = 'confirmed')"
        " FROM referral.referrals WHERE referrer_id = ANY(%s::uuid[]) GROUP BY referrer_id",
        (referrers,),
    )
    return dict.fromkeys(referrers, (0, 0)) | {r: (t, c) for r, t, c in found}


def status_of(db: Any, referral_id: str) -> str | None:
    found = rows(db, "SELECT status FROM referral.referrals WHERE referral_id = %s", (referral_id,))
    return str(found[0][0]) if found else None


def verified(db: Any, user_id: str) -> list[tuple[Any, ...]]:
    return rows(
        db, "SELECT user_id::text, verified_at FROM referral.verified_users WHERE user_id = %s", (user_id,)
    )


async def wait_for_status(db: Any, referral_id: str, status: str, timeout: float = 10.0) -> None:
    """The link of `referral_id` reaches `status` within `timeout` seconds (the auth service's relays
    deliver in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := status_of(db, referral_id)) != status:
        assert asyncio.get_running_loop().time() < deadline, f"{referral_id}: {found}, not {status}"
        await asyncio.sleep(0.05)


# --- activation ----------------------------------------------------------------------------------


async def test_activation_with_a_verified_token_is_confirmed_and_counted(system, db):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    response = await system.activate(bob, await code_of(system, ann))
    assert response.status == 201, await response.text()
    assert (await response.json())["status"] == "confirmed"
    page = await (await system.referrals_of(ann, ann.id)).json()
    assert (page["total"], page["confirmed"]) == (1, 1)
    assert [(item["referral_id"], item["status"]) for item in page["items"]] == [(bob.id, "confirmed")]
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}


async def test_activation_with_an_unverified_token_is_pending_and_not_confirmed_in_the_counts(system, db):
    ann = await system.user("ann@example.com")
    bob = await system.user("bob@example.com", verified=False)
    cat = await system.user("cat@example.com")
    code = await code_of(system, ann)
    response = await system.activate(bob, code)
    assert response.status == 201, await response.text()
    assert (await response.json())["status"] == "pending"
    assert (await system.activate(cat, code)).status == 201
    for viewer in (ann, cat):
        page = await (await system.referrals_of(viewer, ann.id)).json()
        assert (page["total"], page["confirmed"]) == (2, 1)
        statuses = {item["referral_id"]: item["status"] for item in page["items"]}
        assert statuses == {bob.id: "pending", cat.id: "confirmed"}
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (2, 1)}
    assert verified(db, bob.id) == []


# --- codes only for proven users -----------------------------------------------------------------


async def test_code_creation_needs_a_proven_address_then_works_once_the_notice_arrived(system, db):
    cat = await system.user("cat@example.com", verified=False)
    await assert_problem(await system.create_code(cat), 403, "email_unverified")
    await assert_problem(await system.create_code(cat, "Cat-Code"), 403, "email_unverified")
    # Refused before the values are checked against the rules, and before anything is written.
    await assert_problem(await system.create_code(cat, minutes=-5), 403, "email_unverified")
    # A body that is not the schema's is still a validation error.
    malformed = await system.referral.post("/api/v1/referral/codes", json={}, headers=cat.headers)
    await assert_problem(malformed, 422, "validation_failed")
    assert rows(db, "SELECT code FROM referral.codes WHERE owner_id = %s", (cat.id,)) == []
    await assert_problem(await system.referral.get(MY_CODE, headers=cat.headers), 404, "code_not_found")

    # The auth service's notice: the same token (it still says email_verified: false) now may.
    notice = await system.notify_verified(cat.id)
    assert notice.status == 204, await notice.text()
    response = await system.create_code(cat, "Cat-Code")
    assert response.status == 201, await response.text()
    assert (await response.json())["code"] == "Cat-Code"
    assert rows(db, "SELECT code FROM referral.codes WHERE owner_id = %s", (cat.id,)) == [("Cat-Code",)]


async def test_a_code_can_be_taken_again_by_a_proven_user_after_the_403(system):
    """The 403 claimed nothing: the text stays free."""
    cat = await system.user("cat@example.com", verified=False)
    dan = await system.user("dan@example.com")
    await assert_problem(await system.create_code(cat, "Wanted"), 403, "email_unverified")
    assert (await system.create_code(dan, "wanted")).status == 201


# --- the notice ----------------------------------------------------------------------------------


async def test_the_notice_confirms_a_pending_link_and_is_idempotent(system, db):
    ann = await system.user("ann@example.com")
    bob = await system.user("bob@example.com", verified=False)
    assert (await system.activate(bob, await code_of(system, ann))).status == 201
    assert status_of(db, bob.id) == "pending"
    assert totals(db, [ann.id]) == {ann.id: (1, 0)}

    response = await system.notify_verified(bob.id)
    assert response.status == 204, await response.text()
    assert await response.read() == b""
    assert status_of(db, bob.id) == "confirmed"
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}
    page = await (await system.referrals_of(ann, ann.id)).json()
    assert (page["total"], page["confirmed"], page["items"][0]["status"]) == (1, 1, "confirmed")
    recorded = verified(db, bob.id)
    assert len(recorded) == 1
    links = rows(
        db, "SELECT referral_id::text, referrer_id::text, status, xmin::text FROM referral.referrals"
    )

    again = await system.notify_verified(bob.id)
    assert again.status == 204, await again.text()
    assert verified(db, bob.id) == recorded  # the first notice's time, kept
    assert (
        rows(db, "SELECT referral_id::text, referrer_id::text, status, xmin::text FROM referral.referrals")
        == links
    )
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}


async def test_a_notice_for_a_user_without_a_link_is_kept_for_the_link_that_comes_later(system, db):
    ann = await system.user("ann@example.com")
    code = await code_of(system, ann)
    # A signup link from the auth service (it carries no claim), after the user's notice.
    newcomer = str(uuid.uuid4())
    assert (await system.notify_verified(newcomer)).status == 204
    assert len(verified(db, newcomer)) == 1 and status_of(db, newcomer) is None
    response = await system.signup_link(newcomer, ann.id, "new@example.com", code)
    assert response.status == 201, await response.text()
    assert (await response.json())["status"] == "confirmed"
    # An activation with a token that does not say so, after the user's notice.
    bob = await system.user("bob@example.com", verified=False)
    assert (await system.notify_verified(bob.id)).status == 204
    activated = await system.activate(bob, code)
    assert activated.status == 201, await activated.text()
    assert (await activated.json())["status"] == "confirmed"
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (2, 2)}


async def test_a_signup_link_is_pending_until_the_notice_and_answers_its_status_when_repeated(system, db):
    ann = await system.user("ann@example.com")
    newcomer = str(uuid.uuid4())
    first = await system.signup_link(newcomer, ann.id, "new@example.com")
    assert first.status == 201, await first.text()
    assert (await first.json())["status"] == "pending"
    assert (await system.notify_verified(newcomer)).status == 204
    again = await system.signup_link(newcomer, ann.id, "new@example.com")
    assert again.status == 200
    assert await again.json() == {**await first.json(), "status": "confirmed"}
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}


@pytest.mark.parametrize("user_id", ["not-a-uuid", "12345", "{x}", "0" * 33, "%20"])
async def test_a_notice_for_a_malformed_id_is_422(system, db, user_id):
    before = rows(db, "SELECT count(*) FROM referral.verified_users")
    response = await system.referral.post(verified_path(user_id), headers=system.service_headers())
    body = await assert_problem(response, 422, "validation_failed")
    assert "user_id" in body["errors"], body
    assert rows(db, "SELECT count(*) FROM referral.verified_users") == before


@contextlib.contextmanager
def slow_commits(db: Any, seconds: float) -> Iterator[None]:
    """Every transaction that writes a link or records a notice waits `seconds` after that write before
    it commits: the moment where a notice and a link that do not wait for each other both miss the
    other's write grows from microseconds to something a test hits every time."""
    with db.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION referral.test_pause() RETURNS trigger LANGUAGE plpgsql AS"
            f" $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
        )
        for table in ("referrals", "verified_users"):
            cursor.execute(
                f"CREATE TRIGGER test_pause AFTER INSERT ON referral.{table}"
                " FOR EACH ROW EXECUTE FUNCTION referral.test_pause()"
            )
    try:
        yield
    finally:
        with db.cursor() as cursor:
            for table in ("referrals", "verified_users"):
                cursor.execute(f"DROP TRIGGER test_pause ON referral.{table}")
            cursor.execute("DROP FUNCTION referral.test_pause()")


@pytest.mark.parametrize("pause", [0, 0.02], ids=["as-is", "slow-commits"])
async def test_notices_and_signup_links_sent_together_leave_no_proven_user_pending(make_system, db, pause):
    """Each user's notice and link race (random order, all at once): whichever commits second must see
    the other, so every notified user's link ends confirmed; the others stay pending; the totals equal a
    count over the rows."""
    system = await make_system(db_pool_max=120)  # no request waits for a connection: they all overlap
    rng = random.Random(20260601)
    referrers = [str(uuid.uuid4()) for _ in range(12)]
    notified: list[str] = []
    silent: list[str] = []
    with slow_commits(db, pause) if pause else contextlib.nullcontext():
        for round_ in range(4):
            # Each user's two calls side by side, in a random order; the users in a random order.
            calls: list[Any] = []
            for n in range(48):
                user = str(uuid.uuid4())
                link = (
                    system.signup_link,
                    (user, referrers[n % len(referrers)], f"r{round_}.{n}@example.com"),
                )
                if n % 4 == 3:
                    silent.append(user)  # no notice: their address is not proven
                    calls.append(link)
                else:
                    notified.append(user)
                    calls.append(rng.sample([link, (system.notify_verified, (user,))], 2))
            rng.shuffle(calls)
            flat = [call for entry in calls for call in (entry if isinstance(entry, list) else [entry])]
            responses = await asyncio.gather(*(call(*args) for call, args in flat))
            assert sorted({response.status for response in responses}) == [201, 204], [
                (response.status, await response.text()) for response in responses if response.status >= 300
            ]
    statuses = dict(
        rows(
            db,
            "SELECT referral_id::text, status FROM referral.referrals WHERE referrer_id = ANY(%s::uuid[])",
            (referrers,),
        )
    )
    assert len(statuses) == len(notified) + len(silent)
    assert [user for user in notified if statuses[user] != "confirmed"] == []
    assert [user for user in silent if statuses[user] != "pending"] == []
    assert totals(db, referrers) == counted(db, referrers)
    assert sum(confirmed for _, confirmed in totals(db, referrers).values()) == len(notified)


# --- the counts the database keeps ---------------------------------------------------------------


def test_the_totals_stay_exact_through_inserts_status_changes_and_deletes(db):
    """The statement triggers on referral.referrals (0002, 0003), driven with plain SQL: multi-row
    statements, COPY, status changes both ways, other updates, a change of referrer, deletes."""
    a, b, c, d = (str(uuid.uuid4()) for _ in range(4))
    everyone = [a, b, c, d]

    def check(expected: dict[str, tuple[int, int]]) -> None:
        assert counted(db, everyone) == {**dict.fromkeys(everyone, (0, 0)), **expected}
        assert totals(db, everyone) == expected

    def execute(sql: str, params: Any = None) -> None:
        with db.cursor() as cursor:
            cursor.execute(sql, params)

    # One statement: 5 rows of a (2 confirmed) and 3 of b (none).
    execute(
        "INSERT INTO referral.referrals (referral_id, referrer_id, referral_email, code, status)"
        " SELECT gen_random_uuid(), r.referrer_id, 'x' || n || '@example.com', 'CODE',"
        "        CASE WHEN n <= r.confirmed THEN 'confirmed' ELSE 'pending' END"
        " FROM (VALUES (%s::uuid, 2, 5), (%s::uuid, 0, 3)) AS r (referrer_id, confirmed, count),"
        "      generate_series(1, r.count) AS n",
        (a, b),
    )
    check({a: (5, 2), b: (3, 0)})

    copied = "".join(
        f"{uuid.uuid4()}\t{c}\tc{n}@example.com\tCODE\t{'confirmed' if n else 'pending'}\n" for n in range(3)
    )
    with db.cursor() as cursor:
        cursor.copy_expert(
            "COPY referral.referrals (referral_id, referrer_id, referral_email, code, status) FROM STDIN",
            io.StringIO(copied),
        )
    check({a: (5, 2), b: (3, 0), c: (3, 2)})

    # A row written without a status is pending.
    execute(
        "INSERT INTO referral.referrals (referral_id, referrer_id, referral_email, code)"
        " VALUES (gen_random_uuid(), %s, 'bare@example.com', 'CODE')",
        (c,),
    )
    check({a: (5, 2), b: (3, 0), c: (4, 2)})

    # One statement confirming rows of two referrers.
    execute(
        "UPDATE referral.referrals SET status = 'confirmed'"
        " WHERE referrer_id IN (%s, %s) AND status = 'pending'",
        (a, b),
    )
    check({a: (5, 5), b: (3, 3), c: (4, 2)})

    # And back (the service never does it, the counts follow anyway).
    execute(
        "UPDATE referral.referrals SET status = 'pending'"
        " WHERE referral_id = (SELECT referral_id FROM referral.referrals WHERE referrer_id = %s LIMIT 1)",
        (a,),
    )
    check({a: (5, 4), b: (3, 3), c: (4, 2)})

    # An update that changes no status or referrer writes no totals row.
    versions = (
        "SELECT referrer_id::text, xmin::text FROM referral.referrer_totals"
        " WHERE referrer_id = ANY(%s::uuid[])"
    )
    before = rows(db, versions, (everyone,))
    execute(
        "UPDATE referral.referrals SET referral_email = 'gone@example.com' WHERE referrer_id IN (%s, %s)",
        (a, b),
    )
    execute("UPDATE referral.referrals SET status = status WHERE referrer_id = %s", (c,))
    assert rows(db, versions, (everyone,)) == before
    check({a: (5, 4), b: (3, 3), c: (4, 2)})

    # Rows given another referrer: one that has a totals row, and one that has none yet.
    execute(
        "UPDATE referral.referrals"
        " SET referrer_id = CASE WHEN status = 'confirmed' THEN %s::uuid ELSE %s::uuid END"
        " WHERE referrer_id = %s",
        (a, d, c),
    )
    check({a: (7, 6), b: (3, 3), c: (0, 0), d: (2, 0)})

    # Deletes: one pending and one confirmed row of a, then everything.
    execute(
        "DELETE FROM referral.referrals WHERE referral_id IN ("
        " (SELECT referral_id FROM referral.referrals WHERE referrer_id = %(a)s AND status = 'pending'"
        "  LIMIT 1),"
        " (SELECT referral_id FROM referral.referrals WHERE referrer_id = %(a)s AND status = 'confirmed'"
        "  LIMIT 1))",
        {"a": a},
    )
    check({a: (5, 5), b: (3, 3), c: (0, 0), d: (2, 0)})
    execute("DELETE FROM referral.referrals WHERE referrer_id = ANY(%s::uuid[])", (everyone,))
    check(dict.fromkeys(everyone, (0, 0)))


# --- with the auth service: the whole path -------------------------------------------------------


async def test_verifying_the_address_with_the_auth_service_confirms_the_link(system, db):
    """The owner proves the address with the mailed link; the auth service's relay sends the notice to
    this service; the pending link becomes confirmed, and code creation opens."""
    ann = await system.user("ann@example.com")
    bob = await system.user("bob@example.com", verified=False)
    assert (await system.activate(bob, await code_of(system, ann))).status == 201
    assert status_of(db, bob.id) == "pending"
    await verify_email(system.auth, system.mailbox, bob.email)
    await wait_for_status(db, bob.id, "confirmed")
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}
    assert (await system.create_code(bob)).status == 201  # his old token: the notice is enough


async def test_a_signup_with_a_code_is_pending_until_the_address_is_verified(system, db):
    ann = await system.user("ann@example.com")
    code = await code_of(system, ann)
    response = await system.auth.post(
        SIGNUP, json={"email": "carl@example.com", "password": "correct horse", "referral_code": code}
    )
    assert response.status == 201, await response.text()
    carl = (await response.json())["user"]
    assert carl["email_verified"] is False
    await wait_for_status(db, carl["id"], "pending")
    assert totals(db, [ann.id]) == {ann.id: (1, 0)}
    await verify_email(system.auth, system.mailbox, "carl@example.com")
    await wait_for_status(db, carl["id"], "confirmed")
    assert totals(db, [ann.id]) == counted(db, [ann.id]) == {ann.id: (1, 1)}
