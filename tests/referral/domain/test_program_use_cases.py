"""The referral program's use cases on fakes: who sees statistics, their levels, the leaderboard's ranks."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from services.referral.domain.errors import Forbidden, SelfReferral
from services.referral.domain.models import CONFIRMED
from tests.referral.domain.fakes import World

ALICE, BOB, CAROL, DAN = (uuid.UUID(int=n) for n in (1, 2, 3, 4))


async def test_stats_are_the_referrers_alone(world: World) -> None:
    with pytest.raises(Forbidden):
        await world.use_cases.stats(ALICE, viewer_id=BOB)


async def test_stats_show_every_level_up_to_the_depth(world: World) -> None:
    world.store.link(BOB, ALICE, "bob@example.com", "C", verified=True)
    world.store.link(CAROL, BOB, "carol@example.com", "C", verified=False)
    stats = await world.use_cases.stats(ALICE, viewer_id=ALICE)
    assert [(level.level, level.total, level.confirmed) for level in stats.levels] == [
        (1, 1, 1),
        (2, 1, 0),
        (3, 0, 0),
    ]
    assert (stats.total, stats.confirmed, stats.pending) == (2, 1, 1)
    assert stats.code is None


async def test_the_leaderboard_ranks_and_masks(world: World) -> None:
    world.store.link(BOB, ALICE, "bob@example.com", "C", verified=True)
    world.store.link(CAROL, ALICE, "carol@example.com", "C", verified=True)
    world.store.link(DAN, BOB, "dan@example.com", "C", verified=True)
    await world.use_cases.create_code(
        BOB, "bob@example.com", world.clock() + timedelta(days=1), None, email_verified=True
    )
    board = await world.use_cases.leaderboard("month", 10)
    assert [(item.rank, item.referrer_id, item.email, item.confirmed) for item in board.items] == [
        (1, ALICE, None, 2),
        (2, BOB, "b***@example.com", 1),
    ]
    assert all(link.status == CONFIRMED for link in world.store.links.values())


async def test_activation_by_the_owners_alias_is_self_referral(world: World) -> None:
    code = await world.use_cases.create_code(
        ALICE, "Jane.Doe@gmail.com", world.clock() + timedelta(days=1), None, email_verified=True
    )
    with pytest.raises(SelfReferral):
        await world.use_cases.activate(BOB, "janedoe+x@googlemail.com", code.code, email_verified=True)
    assert BOB not in world.store.links
