"""Links on fakes: activation, the auth service's signup links and notices, a referrer's pages."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta

import pytest

from services.referral.domain.errors import (
    AlreadyReferred,
    CodeExpired,
    CodeNotFound,
    ReferralCycle,
    SelfReferral,
)
from services.referral.domain.models import CONFIRMED, PENDING, Referral, ReferralCode
from tests.referral.domain.fakes import World


def user(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_DNS, name)


ALICE, BOB, CAROL = user("alice"), user("bob"), user("carol")


async def code_of(world: World, owner: uuid.UUID, text: str, **lifetime: float) -> ReferralCode:
    expires_at = world.clock() + timedelta(**(lifetime or {"hours": 1}))
    return await world.use_cases.create_code(
        owner, f"{text}@example.com", expires_at, text, email_verified=True
    )


async def activate(world: World, who: uuid.UUID, text: str, *, verified: bool = True) -> Referral:
    return await world.use_cases.activate(who, f"{who}@example.com", text, email_verified=verified)


# --- activation ------------------------------------------------------------------------------------


async def test_activation_links_the_caller_to_the_codes_owner(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    referral = await activate(world, BOB, "ALICE_CODE")
    assert (referral.referrer_id, referral.referral_id, referral.code) == (ALICE, BOB, "alice_code")
    assert referral.created_at == world.clock() and referral.status == CONFIRMED
    assert world.store.links == {BOB: referral}
    assert world.store.locks == [sorted([BOB, ALICE])]  # both trees' roots, in a fixed order


async def test_an_unproven_caller_is_linked_pending_and_a_proven_one_confirmed(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    assert (await activate(world, BOB, "alice_code", verified=False)).status == PENDING
    await world.use_cases.confirm_user(CAROL)  # the notice came before the link
    assert (await activate(world, CAROL, "alice_code", verified=False)).status == CONFIRMED


async def test_ones_own_code_is_refused(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    with pytest.raises(SelfReferral):
        await activate(world, ALICE, "alice_code")
    assert world.store.links == {}


async def test_a_second_activation_is_refused(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    await code_of(world, CAROL, "carol_code")
    first = await activate(world, BOB, "alice_code")
    with pytest.raises(AlreadyReferred):
        await activate(world, BOB, "alice_code")  # the same link again
    with pytest.raises(AlreadyReferred):
        await activate(world, BOB, "carol_code")  # another referrer
    assert world.store.links == {BOB: first}


async def test_unknown_expired_and_deleted_codes_are_refused(world: World) -> None:
    with pytest.raises(CodeNotFound):
        await activate(world, BOB, "nosuchcode")
    await code_of(world, ALICE, "alice_code", minutes=2)
    world.clock.advance(minutes=2)
    with pytest.raises(CodeExpired):
        await activate(world, BOB, "alice_code")
    await code_of(world, CAROL, "carol_code")
    await world.use_cases.delete_my_code(CAROL)
    with pytest.raises(CodeExpired):
        await activate(world, BOB, "carol_code")
    assert world.store.links == {}


async def test_a_code_deleted_after_it_was_read_is_refused_by_the_write(world: World) -> None:
    """The cache still holds the code as active; the write re-checks it and nothing is linked."""
    code = await code_of(world, ALICE, "alice_code")
    world.store.codes = [replace(code, deleted_at=world.clock())]  # behind the cache's back
    with pytest.raises(CodeExpired):
        await activate(world, BOB, "alice_code")
    assert world.store.links == {} and world.store.rollbacks == 1


async def test_a_link_that_would_close_a_cycle_is_refused(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    await code_of(world, BOB, "bob_code")
    await code_of(world, CAROL, "carol_code")
    await activate(world, BOB, "alice_code")  # alice <- bob
    await activate(world, CAROL, "bob_code")  # alice <- bob <- carol
    with pytest.raises(ReferralCycle):
        await activate(world, ALICE, "carol_code")
    assert world.store.locks[-1] == [ALICE]  # alice is the root of carol's tree: one lock
    assert ALICE not in world.store.links and world.store.rollbacks == 1


# --- the auth service's signup links ---------------------------------------------------------------


async def test_a_signup_link_is_pending_and_idempotent(world: World) -> None:
    first = await world.use_cases.record_signup_link(BOB, ALICE, "bob@example.com", "C0DE")
    assert first.created and first.referral.status == PENDING and first.referral.referrer_id == ALICE
    again = await world.use_cases.record_signup_link(BOB, ALICE, "bob@example.com", "C0DE")
    assert not again.created and again.referral == first.referral
    with pytest.raises(AlreadyReferred):
        await world.use_cases.record_signup_link(BOB, CAROL, "bob@example.com", "C0DE")
    with pytest.raises(SelfReferral):
        await world.use_cases.record_signup_link(CAROL, CAROL, "carol@example.com", "C0DE")


# --- the auth service's notice: the address is proven ----------------------------------------------


async def test_the_notice_confirms_a_pending_link_once(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    await activate(world, BOB, "alice_code", verified=False)
    await world.use_cases.confirm_user(BOB)
    assert world.store.links[BOB].status == CONFIRMED
    # The lock a link for bob takes too, and his tree's root's (the counters of his ancestors move).
    assert world.store.locks[-1] == sorted([BOB, ALICE])
    await world.use_cases.confirm_user(BOB)  # again: nothing changes
    assert world.store.links[BOB].status == CONFIRMED and BOB in world.store.verified


async def test_a_notice_before_the_link_confirms_the_link_when_it_is_written(world: World) -> None:
    await world.use_cases.confirm_user(BOB)
    linked = await world.use_cases.record_signup_link(BOB, ALICE, "bob@example.com", "C0DE")
    assert linked.referral.status == CONFIRMED


# --- a referrer's list -----------------------------------------------------------------------------


async def test_pages_come_newest_first_with_a_cursor_until_the_last(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    joined = []
    for index in range(5):
        world.clock.advance(seconds=1)
        referral = await activate(world, user(f"referral-{index}"), "alice_code", verified=index % 2 == 0)
        joined.append(referral.referral_id)
    pages, after = [], None
    while True:
        page = await world.use_cases.referrals_of(ALICE, 2, after, viewer_id=ALICE)
        assert (page.referrer_id, page.total, page.confirmed, page.emails_visible) == (ALICE, 5, 3, True)
        pages.append([uuid.UUID(item.referral_id) for item in page.items])
        if page.next_cursor is None:
            break
        assert page.next_cursor.referral_id == pages[-1][-1]
        after = page.next_cursor
    assert pages == [joined[4:2:-1], joined[2:0:-1], joined[:1]]


async def test_a_page_of_exactly_the_limit_has_no_cursor(world: World) -> None:
    await code_of(world, ALICE, "alice_code")
    await activate(world, BOB, "alice_code")
    page = await world.use_cases.referrals_of(ALICE, 1, None, viewer_id=ALICE)
    assert len(page.items) == 1 and page.next_cursor is None


async def test_an_empty_list_and_someone_elses_list(world: World) -> None:
    page = await world.use_cases.referrals_of(ALICE, 20, None, viewer_id=ALICE)
    assert (page.total, page.confirmed, page.items, page.next_cursor) == (0, 0, [], None)
    await code_of(world, ALICE, "alice_code")
    await activate(world, BOB, "alice_code")
    seen_by_bob = await world.use_cases.referrals_of(ALICE, 20, None, viewer_id=BOB)
    assert not seen_by_bob.emails_visible and len(seen_by_bob.items) == 1
