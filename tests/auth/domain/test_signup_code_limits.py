"""Signup with a usage-limited code on fakes: a use is reserved for the new user's id before anything
is written, an exhausted code creates nothing, and every failure after the reservation gives it back."""

from __future__ import annotations

import logging
import uuid

import pytest

from services.auth.domain.errors import (
    EmailTaken,
    EmailUndeliverable,
    ReferralCodeExhausted,
    ReferralServiceError,
)
from services.auth.domain.models import VERIFY_EMAIL, ProviderIdentity
from tests.auth.domain.fakes import World
from tests.auth.domain.test_provider_sign_in import callback

OWNER = uuid.UUID("11111111-2222-4333-8444-555555555555")


async def test_the_use_is_reserved_for_the_id_the_user_gets(world: World) -> None:
    world.referrals.add("LIMIT123", OWNER, max_uses=2)
    session = await world.auth.signup("ada@example.com", "correct horse", "LIMIT123")
    assert world.referrals.reserved == {session.user.id: "LIMIT123"}
    assert session.user.referrer_id == OWNER
    assert [link.referral_id for link in world.delivery.delivered] == [session.user.id]
    assert world.referrals.released == []


async def test_an_exhausted_code_is_409_and_creates_nothing(world: World) -> None:
    world.referrals.add("LIMIT123", OWNER, max_uses=1)
    await world.auth.signup("first@example.com", "correct horse", "LIMIT123")
    users, outbox = len(world.tables.users), len(world.tables.referral_outbox)
    with pytest.raises(ReferralCodeExhausted) as refused:
        await world.auth.signup("second@example.com", "correct horse", "LIMIT123")
    assert (refused.value.status, refused.value.code) == (409, "code_exhausted")
    assert (len(world.tables.users), len(world.tables.referral_outbox)) == (users, outbox)
    assert len(world.delivery.delivered) == 1
    assert world.mail_limiter.counts.get((VERIFY_EMAIL, "second@example.com")) is None


async def test_an_undeliverable_address_gives_the_use_back(world: World) -> None:
    world.referrals.add("LIMIT123", OWNER, max_uses=1)
    world.verifier.statuses["gone@example.com"] = "invalid"
    with pytest.raises(EmailUndeliverable):
        await world.auth.signup("gone@example.com", "correct horse", "LIMIT123")
    assert world.referrals.reserved == {}
    assert len(world.referrals.released) == 1
    # The one use is free for the next signup.
    await world.auth.signup("next@example.com", "correct horse", "LIMIT123")


async def test_a_failed_user_transaction_gives_the_use_back(world: World) -> None:
    """The address is taken between the existence check and the insert: the transaction fails."""
    world.referrals.add("LIMIT123", OWNER, max_uses=1)
    await world.auth.signup("race@example.com", "correct horse", None)

    async def nobody_has_it(email: str) -> bool:
        return False

    world.users.email_exists = nobody_has_it  # type: ignore[method-assign]
    with pytest.raises(EmailTaken):
        await world.auth.signup("race@example.com", "correct horse", "LIMIT123")
    assert world.referrals.reserved == {}
    assert [code for code, _ in world.referrals.released] == ["LIMIT123"]
    assert world.tables.referral_outbox == []


async def test_a_release_that_fails_is_logged_and_the_signup_error_stands(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.referrals.add("LIMIT123", OWNER, max_uses=1)
    world.referrals.release_failure = ReferralServiceError("HTTP 503")
    world.verifier.statuses["gone@example.com"] = "disposable"
    with caplog.at_level(logging.WARNING), pytest.raises(EmailUndeliverable):
        await world.auth.signup("gone@example.com", "correct horse", "LIMIT123")
    assert "not released" in caplog.text
    assert world.tables.users == {}


async def test_a_provider_signup_reserves_and_is_refused_when_exhausted(world: World) -> None:
    world.referrals.add("LIMIT123", OWNER, max_uses=1)
    made = await callback(world, ProviderIdentity("sub-1", "vic@example.com", True), referral_code="LIMIT123")
    assert world.referrals.reserved == {made.session.user.id: "LIMIT123"}
    with pytest.raises(ReferralCodeExhausted):
        await callback(world, ProviderIdentity("sub-2", "wes@example.com", True), referral_code="LIMIT123")
    assert ("acme", "sub-2") not in world.tables.identities
    assert all(row.user.email != "wes@example.com" for row in world.tables.users.values())
