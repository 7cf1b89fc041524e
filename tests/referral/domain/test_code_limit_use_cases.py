"""Usage limits on fakes: activations and signups take uses of a code, never more than `max_uses`; a
signup's reservation is idempotent, consumed by its link, released, or swept when it expires."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

import pytest

from services.referral.domain.errors import AlreadyReferred, CodeExhausted, CodeExpired, CodeNotFound
from services.referral.domain.models import ReferralCode
from services.referral.domain.use_cases import RESERVATION_TTL
from tests.referral.domain.fakes import World


def user(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_DNS, name)


OWNER = user("owner")


async def limited(world: World, max_uses: int | None, text: str = "Limited") -> ReferralCode:
    expires_at = world.clock() + timedelta(hours=1)
    return await world.use_cases.create_code(
        OWNER, "owner@example.com", expires_at, text, email_verified=True, max_uses=max_uses
    )


def uses(world: World, text: str = "Limited") -> int:
    return next(c.uses for c in world.store.codes if c.code == text)


async def activate(world: World, who: uuid.UUID, text: str = "Limited") -> None:
    await world.use_cases.activate(who, f"{who}@example.com", text, email_verified=True)


async def test_a_new_code_carries_its_limit_and_no_uses(world: World) -> None:
    code = await limited(world, 5)
    assert (code.max_uses, code.uses) == (5, 0)
    assert (await world.use_cases.my_code(OWNER)).max_uses == 5


async def test_activations_stop_at_max_uses_and_the_refused_one_writes_nothing(world: World) -> None:
    await limited(world, 2)
    await activate(world, user("a"))
    await activate(world, user("b"))
    with pytest.raises(CodeExhausted):
        await activate(world, user("c"))
    assert user("c") not in world.store.links
    assert uses(world) == 2
    assert world.store.rollbacks >= 1  # the link written before the use was refused is rolled back


async def test_no_limit_counts_uses_without_refusing(world: World) -> None:
    await limited(world, None)
    for name in "abcd":
        await activate(world, user(name))
    assert uses(world) == 4


async def test_an_already_referred_caller_takes_no_use(world: World) -> None:
    await limited(world, 3)
    await activate(world, user("a"))
    with pytest.raises(AlreadyReferred):
        await activate(world, user("a"))
    assert uses(world) == 1


async def test_a_reservation_takes_a_use_once_per_referral(world: World) -> None:
    await limited(world, 2)
    new_user = user("new")
    first = await world.use_cases.reserve_use("limited", new_user)
    again = await world.use_cases.reserve_use("LIMITED", new_user)
    assert first == again
    assert (first.code.owner_id, first.expires_at) == (OWNER, world.clock() + RESERVATION_TTL)
    assert uses(world) == 1


async def test_a_reservation_is_refused_when_no_use_is_left_and_for_bad_codes(world: World) -> None:
    await limited(world, 1)
    await activate(world, user("a"))
    with pytest.raises(CodeExhausted):
        await world.use_cases.reserve_use("Limited", user("late"))
    with pytest.raises(CodeNotFound):
        await world.use_cases.reserve_use("Nope-Nope", user("late"))
    world.clock.advance(hours=2)
    with pytest.raises(CodeExpired):
        await world.use_cases.reserve_use("Limited", user("later"))
    assert world.store.reservations == {}


async def test_the_signup_link_consumes_its_reservation_even_when_the_code_is_exhausted(world: World) -> None:
    await limited(world, 2)
    new_user = user("new")
    await world.use_cases.reserve_use("Limited", new_user)
    await activate(world, user("a"))  # the last use
    with pytest.raises(CodeExhausted):
        await activate(world, user("b"))
    linked = await world.use_cases.record_signup_link(new_user, OWNER, "new@example.com", "Limited")
    assert linked.created
    assert uses(world) == 2
    assert world.store.reservations == {}
    again = await world.use_cases.record_signup_link(new_user, OWNER, "new@example.com", "Limited")
    assert not again.created
    assert uses(world) == 2


async def test_a_signup_link_without_a_reservation_takes_a_use_or_is_refused(world: World) -> None:
    await limited(world, 1)
    await world.use_cases.record_signup_link(user("a"), OWNER, "a@example.com", "Limited")
    assert uses(world) == 1
    with pytest.raises(CodeExhausted):
        await world.use_cases.record_signup_link(user("b"), OWNER, "b@example.com", "Limited")
    assert user("b") not in world.store.links


async def test_a_refused_signup_link_gives_its_reservation_back(world: World) -> None:
    await limited(world, 1)
    other = await world.use_cases.create_code(
        user("other"), "other@example.com", world.clock() + timedelta(hours=1), "Other", email_verified=True
    )
    new_user = user("new")
    await activate(world, new_user, other.code)  # the new user became someone else's referral meanwhile
    # Its signup had reserved a use of the owner's code before that.
    world.store.reservations[new_user] = (world.store.codes[0].id, world.clock() + RESERVATION_TTL)
    world.store.codes[0] = replace(world.store.codes[0], uses=1)
    with pytest.raises(AlreadyReferred):
        await world.use_cases.record_signup_link(new_user, OWNER, "new@example.com", "Limited")
    assert uses(world) == 0
    assert world.store.reservations == {}


async def test_release_gives_the_use_back_once(world: World) -> None:
    await limited(world, 1)
    new_user = user("new")
    await world.use_cases.reserve_use("Limited", new_user)
    await world.use_cases.release_use("limited", new_user)
    await world.use_cases.release_use("limited", new_user)
    assert uses(world) == 0
    await activate(world, user("a"))  # the use is free again
    assert uses(world) == 1


async def test_the_sweep_releases_only_expired_reservations(world: World) -> None:
    await limited(world, 3)
    await world.use_cases.reserve_use("Limited", user("early"))
    world.clock.advance(minutes=30)
    await world.use_cases.reserve_use("Limited", user("late"))
    assert await world.use_cases.release_expired_reservations() == 0
    world.clock.advance(seconds=RESERVATION_TTL.total_seconds() - 1800)
    assert await world.use_cases.release_expired_reservations() == 1
    assert set(world.store.reservations) == {user("late")}
    assert uses(world) == 1
