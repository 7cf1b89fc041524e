"""GET /api/v1/referral/codes?email= (the public lookup), the Redis cache in front of it, Redis outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import assert_problem, kill_tracking_connections

CODES = "/api/v1/referral/codes"
MY_CODE = "/api/v1/referral/codes/me"
DOWN_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def keys_of(cache: redis.Redis, system: Any) -> list[str]:
    return sorted(cache.scan_iter(match=f"{system.referral_settings.redis_prefix}*"))


def email_keys(cache: redis.Redis, system: Any, email: str) -> list[str]:
    return [k for k in keys_of(cache, system) if k.endswith(email.lower()) and "email" in k]


def code_keys(cache: redis.Redis, system: Any, code: str) -> list[str]:
    return [k for k in keys_of(cache, system) if k.lower().endswith(code.lower()) and "code" in k]


def clear_cache(cache: redis.Redis, system: Any) -> None:
    keys = keys_of(cache, system)
    if keys:
        cache.delete(*keys)


async def lookup(system: Any, email: str) -> Any:
    return await system.referral.get(CODES, params={"email": email})


async def code_of(system: Any, user: Any, code: str | None = None, **kwargs: Any) -> dict[str, Any]:
    response = await system.create_code(user, code, **kwargs)
    assert response.status == 201, await response.text()
    return dict(await response.json())


# --- the lookup ----------------------------------------------------------------------------------


async def test_lookup_is_public_and_shows_only_code_and_expiry(system):
    alice = await system.user("alice@example.com")
    created = await code_of(system, alice)
    response = await lookup(system, "alice@example.com")
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body == {"code": created["code"], "expires_at": body["expires_at"]}
    assert datetime.fromisoformat(body["expires_at"]) == datetime.fromisoformat(created["expires_at"])
    assert datetime.fromisoformat(body["expires_at"]).utcoffset() is not None
    text = await response.text()
    assert alice.id not in text and "alice" not in text.lower()


@pytest.mark.parametrize(
    "asked", ["ALICE@EXAMPLE.COM", "Alice@Example.com", "  alice@example.com  ", "\talice@EXAMPLE.com\n"]
)
async def test_lookup_email_is_case_insensitive_and_trimmed(system, cache, asked):
    alice = await system.user("Alice@example.com")
    created = await code_of(system, alice)
    clear_cache(cache, system)  # the database's comparison, then the cache's
    for _ in range(2):
        response = await lookup(system, asked)
        assert response.status == 200, await response.text()
        assert (await response.json())["code"] == created["code"]


async def test_same_404_for_unknown_email_and_for_user_without_code(system, db, cache):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    await code_of(system, bob)
    deleted = await system.user("deleted@example.com")
    await code_of(system, deleted)
    assert (await system.referral.delete(MY_CODE, headers=deleted.headers)).status == 204
    expired = await system.user("expired@example.com")
    await code_of(system, expired)
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.codes SET expires_at = now() - interval '1 second',"
            " created_at = now() - interval '2 seconds' WHERE owner_id = %s",
            (expired.id,),
        )
    clear_cache(cache, system)  # the expiry was simulated behind the cache's back
    bodies = []
    for email in ("nobody@example.com", alice.email, deleted.email, expired.email):
        for _ in range(2):  # from the database, then from the cache
            response = await lookup(system, email)
            bodies.append(await assert_problem(response, 404, "code_not_found"))
    assert all(body == bodies[0] for body in bodies), bodies
    assert "nobody" not in str(bodies[0]) and "alice" not in str(bodies[0])


async def test_missing_or_invalid_email_is_422(system):
    cases = [
        {},
        {"email": ""},
        {"email": "   "},
        {"email": "not-an-email"},
        {"email": "a@b@example.com"},
        {"email": "a" * 243 + "@example.com"},  # 255 characters
    ]
    for params in cases:
        response = await system.referral.get(CODES, params=params)
        problem = await assert_problem(response, 422)
        assert "email" in problem["errors"], (params, problem)
    longest = "a" * 242 + "@example.com"  # 254 characters: valid, merely unknown
    await assert_problem(await lookup(system, longest), 404, "code_not_found")


# --- the cache -----------------------------------------------------------------------------------


async def test_lookup_fills_the_cache_and_the_next_one_is_answered_from_it(system, db, cache):
    alice = await system.user("alice@example.com")
    created = await code_of(system, alice)
    clear_cache(cache, system)
    assert email_keys(cache, system, alice.email) == []
    first = await lookup(system, alice.email)
    assert first.status == 200, await first.text()
    assert len(email_keys(cache, system, alice.email)) == 1, keys_of(cache, system)
    # Change the row behind the cache's back: the cached answer still comes back.
    with db.cursor() as cursor:
        cursor.execute("UPDATE referral.codes SET code = 'CHANGED1' WHERE owner_id = %s", (alice.id,))
        assert cursor.rowcount == 1
    second = await lookup(system, alice.email)
    assert second.status == 200, await second.text()
    assert (await second.json())["code"] == created["code"]
    # A change through the API is seen on the very next request.
    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    await assert_problem(await lookup(system, alice.email), 404, "code_not_found")


async def test_unknown_email_is_cached_briefly_and_a_new_code_is_seen_at_once(system, cache):
    await assert_problem(await lookup(system, "Carol@Example.com"), 404, "code_not_found")
    keys = email_keys(cache, system, "carol@example.com")
    assert len(keys) == 1, keys_of(cache, system)
    ttl = cache.ttl(keys[0])
    assert 0 < ttl <= system.referral_settings.negative_cache_ttl, ttl
    carol = await system.user("carol@example.com")
    await assert_problem(await lookup(system, "carol@example.com"), 404, "code_not_found")
    created = await code_of(system, carol)
    response = await lookup(system, "CAROL@example.com")
    assert response.status == 200, await response.text()
    assert (await response.json())["code"] == created["code"]


async def test_user_without_code_cached_then_code_created_is_seen_at_once(system, cache):
    dave = await system.user("dave@example.com")
    await assert_problem(await lookup(system, dave.email), 404, "code_not_found")
    assert len(email_keys(cache, system, dave.email)) == 1
    created = await code_of(system, dave)
    response = await lookup(system, dave.email)
    assert response.status == 200, await response.text()
    assert (await response.json())["code"] == created["code"]


async def test_code_that_expires_naturally_is_refused_at_once(make_system, cache):
    """An expiry is fixed at creation; once it passes, every path refuses the code, cached or not."""
    system = await make_system(code_min_lifetime=1)
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    expires_at = datetime.now(UTC) + timedelta(seconds=1.5)
    response = await system.referral.post(
        CODES, json={"expires_at": expires_at.isoformat()}, headers=alice.headers
    )
    assert response.status == 201, await response.text()
    code = (await response.json())["code"]
    assert (await lookup(system, alice.email)).status == 200
    await asyncio.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 0.05)
    await assert_problem(await lookup(system, alice.email), 404, "code_not_found")
    await assert_problem(await system.activate(bob, code), 410, "code_expired")
    await assert_problem(await system.referral.get(MY_CODE, headers=alice.headers), 404, "code_not_found")


async def test_cache_ttl_never_exceeds_the_codes_remaining_lifetime(system, cache):
    alice = await system.user("alice@example.com")
    response = await system.referral.post(
        CODES,
        json={"expires_at": (datetime.now(UTC) + timedelta(seconds=90)).isoformat()},
        headers=alice.headers,
    )
    assert response.status == 201, await response.text()
    clear_cache(cache, system)
    assert (await lookup(system, alice.email)).status == 200
    keys = email_keys(cache, system, alice.email)
    assert len(keys) == 1, keys_of(cache, system)
    ttl = cache.ttl(keys[0])
    assert 0 < ttl <= 90, ttl
    # Written through on creation too: both entries stop at the code's expiry.
    clear_cache(cache, system)
    bob = await system.user("bob@example.com")
    response = await system.referral.post(
        CODES,
        json={"expires_at": (datetime.now(UTC) + timedelta(seconds=90)).isoformat()},
        headers=bob.headers,
    )
    assert response.status == 201
    bob_code = (await response.json())["code"]
    written = email_keys(cache, system, bob.email) + code_keys(cache, system, bob_code)
    assert len(written) == 2, keys_of(cache, system)
    for key in written:
        assert 0 < cache.ttl(key) <= 90, (key, cache.ttl(key))


async def test_cache_ttl_is_capped_by_the_setting(system, cache):
    alice = await system.user("alice@example.com")
    await code_of(system, alice, minutes=24 * 60)
    clear_cache(cache, system)
    assert (await lookup(system, alice.email)).status == 200
    keys = email_keys(cache, system, alice.email)
    assert len(keys) == 1
    assert 0 < cache.ttl(keys[0]) <= system.referral_settings.cache_ttl


# --- Redis unreachable ---------------------------------------------------------------------------


def metric_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_every_endpoint_works_from_the_database_when_redis_is_down(make_system, db):
    system = await make_system(redis_url=DOWN_REDIS)
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    carol = await system.user("carol@example.com")
    started = time.monotonic()

    created = await code_of(system, alice, "Alice_Code")
    assert created["owner_id"] == alice.id
    await assert_problem(await system.create_code(alice), 409, "active_code_exists")
    me = await system.referral.get(MY_CODE, headers=alice.headers)
    assert me.status == 200 and (await me.json())["code"] == "Alice_Code"

    found = await lookup(system, " ALICE@example.com ")
    assert found.status == 200, await found.text()
    assert (await found.json())["code"] == "Alice_Code"
    await assert_problem(await lookup(system, "nobody@example.com"), 404, "code_not_found")
    await assert_problem(await lookup(system, bob.email), 404, "code_not_found")

    await assert_problem(await system.activate(bob, "NOSUCHCODE"), 404, "code_not_found")
    linked = await system.activate(bob, "alice_code")
    assert linked.status == 201, await linked.text()
    assert (await linked.json())["referrer_id"] == alice.id

    listing = await system.referrals_of(alice, alice.id)
    assert listing.status == 200, await listing.text()
    page = await listing.json()
    assert page["total"] == 1
    assert [item["email"] for item in page["items"]] == ["bob@example.com"]

    assert (await system.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    await assert_problem(await system.referral.delete(MY_CODE, headers=alice.headers), 404, "code_not_found")
    await assert_problem(await system.referral.get(MY_CODE, headers=alice.headers), 404, "code_not_found")
    await assert_problem(await lookup(system, alice.email), 404, "code_not_found")
    await assert_problem(await system.activate(carol, "Alice_Code"), 410, "code_expired")
    assert (await code_of(system, alice))["owner_id"] == alice.id

    assert time.monotonic() - started < 10, "requests waited on Redis"
    metrics = await system.referral.get("/metrics")
    assert metrics.status == 200
    assert metric_value(await metrics.text(), "referral_cache_errors_total") > 0
    with db.cursor() as cursor:
        cursor.execute("SELECT referrer_id::text, referral_id::text FROM referral.referrals")
        assert cursor.fetchall() == [(alice.id, bob.id)]


async def test_readyz_names_redis_when_it_is_down(make_system):
    system = await make_system(redis_url=DOWN_REDIS)
    response = await system.referral.get("/readyz")
    assert response.status == 503, await response.text()
    body = await response.json(content_type=None)
    assert "redis" in await response.text()
    assert body["checks"]["redis"] != "ok", body
    assert body["checks"]["postgres"] == "ok", body


async def test_readyz_is_200_when_everything_answers(system):
    response = await system.referral.get("/readyz")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["checks"] == {"postgres": "ok", "redis": "ok"}, body
    metrics = await system.referral.get("/metrics")
    assert metric_value(await metrics.text(), "referral_cache_errors_total") == 0


# --- the near cache (process memory, kept coherent by Redis) ---------------------------------------


async def lookups_by_result(system: Any) -> dict[str, float]:
    text = await (await system.referral.get("/metrics")).text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("referral_cache_lookups_total{"):
            labels, _, value = line.partition("} ")
            found[labels.split('result="')[1].rstrip('"')] = float(value)
    return found


async def email_answers(system: Any) -> dict[str, float]:
    """referral_email_lookups_total by source (near, redis, database)."""
    text = await (await system.referral.get("/metrics")).text()
    return {
        sample.labels["source"]: float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "referral_email_lookups_total"
    }


async def test_each_lookup_by_email_is_counted_once_by_where_its_answer_came_from(make_system, cache):
    first = await make_system()
    second = await make_system()  # the same database and Redis prefix: two replicas
    alice = await first.user("alice@example.com")
    await code_of(first, alice)
    clear_cache(cache, first)
    before = await email_answers(first)
    assert (await lookup(first, alice.email)).status == 200  # nothing cached anywhere: the database
    after = await email_answers(first)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"near": 0, "redis": 0, "database": 1}
    before = await email_answers(second)
    assert (await lookup(second, alice.email)).status == 200  # the first one's fill is in Redis
    after = await email_answers(second)
    assert {k: after[k] - before.get(k, 0) for k in after} == {"near": 0, "redis": 1, "database": 0}
    # Once its tracking connection is up, the second keeps what Redis answered: process memory.
    sent = 0
    for _ in range(100):
        assert (await lookup(second, alice.email)).status == 200
        sent += 1
        latest = await email_answers(second)
        if latest["near"] > after["near"]:
            break
        await asyncio.sleep(0.01)
    assert latest["near"] - after["near"] == 1
    assert latest["near"] + latest["redis"] - after["near"] - after["redis"] == sent
    assert latest["database"] == after["database"]


async def test_a_second_instance_sees_a_deletion_made_through_the_first(make_system):
    first = await make_system()
    second = await make_system()  # the same database and Redis prefix: two replicas
    alice = await first.user("alice@example.com")
    await code_of(first, alice)
    for _ in range(3):  # database, then Redis (kept in process memory), then process memory
        assert (await lookup(second, alice.email)).status == 200
    assert (await lookups_by_result(second)).get("near", 0) >= 1
    assert (await first.referral.delete(MY_CODE, headers=alice.headers)).status == 204
    # Redis pushes the change to the second replica; it answers 404 from then on.
    for _ in range(100):
        response = await lookup(second, alice.email)
        if response.status == 404:
            break
        await asyncio.sleep(0.01)
    await assert_problem(response, 404, "code_not_found")


async def test_a_replica_that_misses_redis_pushes_serves_nothing_from_memory(make_system, cache):
    system = await make_system()
    alice = await system.user("alice@example.com")
    await code_of(system, alice)
    for _ in range(3):
        assert (await lookup(system, alice.email)).status == 200
    near_before = (await lookups_by_result(system)).get("near", 0)
    assert kill_tracking_connections(cache, system.referral_settings.redis_prefix) == 1
    await asyncio.sleep(0.1)
    assert (await lookup(system, alice.email)).status == 200
    assert (await lookups_by_result(system)).get("near", 0) == near_before


async def test_a_lookup_answered_by_the_database_is_kept_in_memory_at_once(system, cache):
    alice = await system.user("alice@example.com")
    await code_of(system, alice)
    clear_cache(cache, system)
    await asyncio.sleep(0.1)  # Redis pushes the deletions: the near cache drops its entries
    before = await lookups_by_result(system)
    assert (await lookup(system, alice.email)).status == 200  # the database
    assert (await lookup(system, alice.email)).status == 200  # process memory
    after = await lookups_by_result(system)
    assert after.get("miss", 0) == before.get("miss", 0) + 1
    assert after.get("near", 0) == before.get("near", 0) + 1
    assert after.get("hit", 0) == before.get("hit", 0)
