"""Codes on fakes: creation (proof of the address, expiry bounds, one active per user), deletion, lookup."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from services.referral.domain.errors import (
    ActiveCodeExists,
    CodeExpired,
    CodeNotFound,
    CodeTaken,
    EmailUnverified,
)
from services.referral.domain.models import ReferralCode
from services.referral.domain.ports import ABSENT
from shared.problems import ServiceUnavailable, ValidationProblem
from tests.referral.domain.fakes import RULES, World

ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
ALICE_EMAIL = "Alice@Example.com"


async def create(
    world: World, vanity: str | None = None, *, verified: bool = True, **lifetime: float
) -> ReferralCode:
    expires_at = world.clock() + timedelta(**(lifetime or {"hours": 1}))
    return await world.use_cases.create_code(ALICE, ALICE_EMAIL, expires_at, vanity, email_verified=verified)


# --- creation --------------------------------------------------------------------------------------


async def test_a_proven_user_gets_a_generated_code_written_through_the_cache(world: World) -> None:
    code = await create(world)
    assert code.owner_id == ALICE and code.owner_email == ALICE_EMAIL
    assert len(code.code) == 11 and code.deleted_at is None
    assert await world.use_cases.my_code(ALICE) == code
    assert world.cache.entries == {f"code:{code.code.lower()}": code, "email:alice@example.com": code}


async def test_a_vanity_code_is_kept_as_given_and_taken_case_insensitively(world: World) -> None:
    assert (await create(world, "Alice_Code")).code == "Alice_Code"
    with pytest.raises(CodeTaken):
        await world.use_cases.create_code(
            uuid.uuid4(),
            "bob@example.com",
            world.clock() + timedelta(hours=1),
            "ALICE_code",
            email_verified=True,
        )


@pytest.mark.parametrize(
    ("lifetime", "accepted"),
    [
        (RULES.min_lifetime - timedelta(seconds=1), False),
        (RULES.min_lifetime, True),
        (RULES.max_lifetime, True),
        (RULES.max_lifetime + timedelta(seconds=1), False),
        (-timedelta(seconds=1), False),
    ],
    ids=["under-min", "min", "max", "over-max", "past"],
)
async def test_the_expiry_must_lie_between_the_bounds(
    world: World, lifetime: timedelta, accepted: bool
) -> None:
    if accepted:
        code = await create(world, seconds=lifetime.total_seconds())
        assert code.expires_at == world.clock() + lifetime
        return
    with pytest.raises(ValidationProblem) as refused:
        await create(world, seconds=lifetime.total_seconds())
    assert refused.value.errors is not None and list(refused.value.errors) == ["expires_at"]
    assert world.store.codes == [] and world.cache.entries == {}


async def test_the_bounds_are_named_in_the_message(world: World) -> None:
    with pytest.raises(ValidationProblem) as short:
        await create(world, seconds=30)
    with pytest.raises(ValidationProblem) as long:
        await create(world, days=366)
    assert short.value.errors == {"expires_at": ["must be at least 60 seconds ahead"]}
    assert long.value.errors == {"expires_at": ["must be at most 365 days ahead"]}


async def test_an_unproven_address_is_refused_before_anything_is_checked_or_written(world: World) -> None:
    with pytest.raises(EmailUnverified):
        await create(world, verified=False)
    with pytest.raises(EmailUnverified):  # before the expiry is checked
        await create(world, verified=False, seconds=1)
    assert world.store.codes == [] and world.cache.entries == {}


async def test_the_auth_services_notice_proves_the_address_too(world: World) -> None:
    await world.use_cases.confirm_user(ALICE)
    code = await create(world, verified=False)
    assert code.owner_id == ALICE


async def test_one_active_code_per_user(world: World) -> None:
    first = await create(world)
    with pytest.raises(ActiveCodeExists):
        await create(world)
    with pytest.raises(ActiveCodeExists):
        await create(world, "Other_Code")
    assert world.store.codes == [first]


async def test_a_new_code_replaces_one_that_expired(world: World) -> None:
    old = await create(world, minutes=2)
    world.clock.advance(minutes=3)
    with pytest.raises(CodeNotFound):
        await world.use_cases.my_code(ALICE)
    new = await create(world)
    assert await world.use_cases.my_code(ALICE) == new
    closed = next(c for c in world.store.codes if c.id == old.id)
    assert closed.deleted_at == old.expires_at  # closed at its expiry
    assert world.cache.entries["email:alice@example.com"] == new


async def test_a_new_code_replaces_a_deleted_one(world: World) -> None:
    await create(world)
    await world.use_cases.delete_my_code(ALICE)
    new = await create(world)
    assert await world.use_cases.my_code(ALICE) == new
    assert await world.use_cases.code_by_email(ALICE_EMAIL) == new


async def test_a_generated_code_that_collides_is_drawn_again(world: World) -> None:
    taken = (await create(world, "TAKEN2345")).code
    drawn = iter([taken, taken.lower(), "FRESH2345"])
    world.use_cases.new_code = lambda: next(drawn)
    code = await world.use_cases.create_code(
        uuid.uuid4(), "bob@example.com", world.clock() + timedelta(hours=1), None, email_verified=True
    )
    assert code.code == "FRESH2345"


async def test_five_collisions_in_a_row_are_a_503(world: World) -> None:
    taken = (await create(world, "TAKEN2345")).code
    world.use_cases.new_code = lambda: taken
    with pytest.raises(ServiceUnavailable):
        await world.use_cases.create_code(
            uuid.uuid4(), "bob@example.com", world.clock() + timedelta(hours=1), None, email_verified=True
        )


# --- my code, deletion -----------------------------------------------------------------------------


async def test_without_a_code_there_is_nothing_to_show_or_delete(world: World) -> None:
    with pytest.raises(CodeNotFound):
        await world.use_cases.my_code(ALICE)
    with pytest.raises(CodeNotFound):
        await world.use_cases.delete_my_code(ALICE)


async def test_a_deleted_code_is_refused_everywhere_at_once(world: World) -> None:
    code = await create(world)
    assert await world.use_cases.code_by_email(ALICE_EMAIL) == code
    await world.use_cases.delete_my_code(ALICE)
    assert world.cache.entries["email:alice@example.com"] is ABSENT
    assert world.cache.entries[f"code:{code.code.lower()}"].deleted_at is not None  # type: ignore[union-attr]
    with pytest.raises(CodeNotFound):
        await world.use_cases.my_code(ALICE)
    with pytest.raises(CodeNotFound):
        await world.use_cases.code_by_email(ALICE_EMAIL)
    with pytest.raises(CodeExpired):
        await world.use_cases.usable_code(code.code)
    with pytest.raises(CodeNotFound):
        await world.use_cases.delete_my_code(ALICE)


# --- lookup by email -------------------------------------------------------------------------------


async def test_a_miss_reads_the_database_and_fills_the_cache_then_it_hits(world: World) -> None:
    code = await create(world)
    world.cache.entries.clear()
    assert await world.use_cases.code_by_email("ALICE@example.com") == code
    assert world.store.reads == ["active_by_email"]
    assert world.cache.entries == {"email:alice@example.com": code}
    assert await world.use_cases.code_by_email(ALICE_EMAIL) == code
    assert world.store.reads == ["active_by_email"]  # the hit did not read the database


async def test_an_unknown_email_is_cached_as_absent(world: World) -> None:
    for _ in range(3):
        with pytest.raises(CodeNotFound):
            await world.use_cases.code_by_email("nobody@example.com")
    assert world.store.reads == ["active_by_email"]
    assert world.cache.entries == {"email:nobody@example.com": ABSENT}


async def test_a_new_code_overwrites_the_absent_entry(world: World) -> None:
    with pytest.raises(CodeNotFound):
        await world.use_cases.code_by_email(ALICE_EMAIL)
    code = await create(world)
    assert await world.use_cases.code_by_email(ALICE_EMAIL) == code


async def test_a_fill_never_replaces_what_a_writer_put_there(world: World) -> None:
    code = await create(world)
    await world.cache.fill_email(ALICE_EMAIL, None)  # a reader that saw the database before the write
    assert await world.use_cases.code_by_email(ALICE_EMAIL) == code


async def test_a_cached_code_that_expired_since_is_not_served(world: World) -> None:
    await create(world, minutes=2)
    world.clock.advance(minutes=2)
    with pytest.raises(CodeNotFound):
        await world.use_cases.code_by_email(ALICE_EMAIL)
    assert world.store.reads == []  # decided from the cached expiry


async def test_without_the_cache_every_lookup_reads_the_database(world: World) -> None:
    code = await create(world)
    world.cache.down = True
    for _ in range(2):
        assert await world.use_cases.code_by_email(ALICE_EMAIL) == code
    assert world.store.reads == ["active_by_email", "active_by_email"]


# --- lookup by text (activation, the auth service's check) -----------------------------------------


async def test_a_code_by_text_unknown_expired_or_usable(world: World) -> None:
    with pytest.raises(CodeNotFound):
        await world.use_cases.usable_code("NOSUCHCODE")
    with pytest.raises(CodeNotFound):  # the absent entry answers
        await world.use_cases.usable_code("nosuchcode")
    assert world.store.reads == ["by_code"]
    code = await create(world, "Alice_Code", minutes=2)
    assert await world.use_cases.usable_code("alice_code") == code
    world.clock.advance(minutes=2)
    with pytest.raises(CodeExpired):
        await world.use_cases.usable_code("ALICE_CODE")
