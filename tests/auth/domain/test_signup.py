"""Signup on fakes: the new user, their first login and verification mail; duplicate emails; referral
codes accepted or refused before anything is written; the email verifier's veto."""

from __future__ import annotations

import uuid

import pytest

from services.auth.domain.errors import (
    EmailAlreadyUsed,
    EmailTaken,
    EmailUndeliverable,
    InactiveCode,
    ReferralCodeExpired,
    ReferralCodeNotFound,
    ReferralServiceError,
    ReferralServiceUnavailable,
)
from services.auth.domain.models import VERIFY_EMAIL, ReferralLink
from tests.auth.domain.fakes import World


async def test_signup_creates_the_user_signed_in_with_a_verification_mail(world: World) -> None:
    session = await world.auth.signup("Ada@example.com", "correct horse", None)
    user = session.user
    assert (user.email, user.email_verified, user.referrer_id) == ("Ada@example.com", False, None)
    assert world.password_hash(user.id) == "hashed:correct horse"
    assert world.refresh_tokens.live_families(user.id) == {world.issuer.issued[-1]["sid"]}
    assert session.tokens.access_token == "access-1" and session.tokens.expires_in == 900
    assert world.issuer.issued[-1]["email_verified"] is False
    [mail] = world.mails(VERIFY_EMAIL)
    assert mail.recipient == "Ada@example.com"
    assert mail.link.startswith("https://app.example/verify-email#token=")
    assert world.relay.wakes == 1, "the relays are woken after the commit"
    assert world.mail_limiter.counts == {(VERIFY_EMAIL, "ada@example.com"): 1}
    assert world.enrichment.scheduled == [], "an unproven address is never enriched"
    assert user.email_check["status"] == "valid"


async def test_a_duplicate_email_is_refused_whatever_its_case(world: World) -> None:
    await world.auth.signup("bob@example.com", "correct horse", None)
    before = len(world.tables.users), len(world.tables.refresh_tokens), len(world.tables.mail_outbox)
    with pytest.raises(EmailTaken):
        await world.auth.signup("BOB@example.com", "another pass", None)
    assert (
        len(world.tables.users),
        len(world.tables.refresh_tokens),
        len(world.tables.mail_outbox),
    ) == before


async def test_losing_the_race_for_an_email_is_email_taken_and_leaves_nothing(world: World) -> None:
    """Two signups pass the existence check together; the store's unique index refuses the second."""
    await world.auth.signup("race@example.com", "correct horse", None)

    async def nobody_has_it(email: str) -> bool:
        return False

    world.users.email_exists = nobody_has_it  # type: ignore[method-assign]
    tables = (len(world.tables.users), len(world.tables.refresh_tokens), len(world.tables.mail_tokens))
    with pytest.raises(EmailTaken):
        await world.auth.signup("race@example.com", "correct horse", None)
    assert (
        len(world.tables.users),
        len(world.tables.refresh_tokens),
        len(world.tables.mail_tokens),
    ) == tables
    assert world.store.rollbacks == 1
    with pytest.raises(EmailAlreadyUsed):  # the fake enforces the index too
        await world.users.add("RACE@example.com", None)


async def test_a_referral_code_links_the_new_user_to_its_owner(world: World) -> None:
    owner = uuid.uuid4()
    world.referrals.add("ABCD1234", owner)
    session = await world.auth.signup("carol@example.com", "correct horse", "ABCD1234")
    assert session.user.referrer_id == owner
    link = ReferralLink(session.user.id, owner, "carol@example.com", "ABCD1234")
    assert world.tables.referral_outbox == [link], "written in the signup's transaction"
    assert world.delivery.delivered == [link], "then delivered at once, after the commit"


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (None, ReferralCodeNotFound),
        (InactiveCode(), ReferralCodeExpired),
        (ReferralServiceError("code check: TimeoutError"), ReferralServiceUnavailable),
    ],
)
async def test_a_refused_code_creates_nothing(world: World, failure: Exception | None, error: type) -> None:
    if failure is not None:
        world.referrals.failures["NOPE1234"] = failure
    with pytest.raises(error):
        await world.auth.signup("dave@example.com", "correct horse", "NOPE1234")
    assert world.tables.users == {} and world.tables.mail_outbox == [] and world.delivery.delivered == []
    assert world.verifier.asked == [], "the code is checked before the (paid) email check"
    assert world.mail_limiter.counts == {}


async def test_the_503_says_when_to_retry(world: World) -> None:
    world.referrals.failures["DOWN1234"] = ReferralServiceError("HTTP 503")
    with pytest.raises(ReferralServiceUnavailable) as refused:
        await world.auth.signup("erin@example.com", "correct horse", "DOWN1234")
    assert refused.value.headers == {"Retry-After": "5"}


@pytest.mark.parametrize("status", ["invalid", "disposable"])
async def test_an_undeliverable_address_creates_nothing(world: World, status: str) -> None:
    world.verifier.statuses["gone@example.com"] = status
    with pytest.raises(EmailUndeliverable):
        await world.auth.signup("gone@example.com", "correct horse", None)
    assert world.tables.users == {}


async def test_a_taken_email_is_refused_before_the_code_and_the_verifier_are_asked(world: World) -> None:
    await world.auth.signup("fay@example.com", "correct horse", None)
    world.verifier.asked.clear()
    with pytest.raises(EmailTaken):
        await world.auth.signup("fay@example.com", "correct horse", "ABCD1234")
    assert world.referrals.asked == [] and world.verifier.asked == []
