"""Proving an address and recovering an account on fakes: verification and reset tokens are single use,
expire, and die when the password changes; the mail limits; password change; what a proof unlocks."""

from __future__ import annotations

import pytest

from services.auth.domain.errors import (
    EmailAlreadyVerified,
    MailThrottled,
    PasswordChangeThrottled,
    ResetExpired,
    ResetInvalid,
    VerificationExpired,
    VerificationInvalid,
    WrongPassword,
)
from services.auth.domain.models import RESET_PASSWORD, VERIFY_EMAIL, User
from shared.problems import OAuthError
from tests.auth.domain.fakes import World

ADDRESS = "203.0.113.9"


async def signed_up(world: World, email: str = "pia@example.com") -> User:
    return (await world.auth.signup(email, "correct horse", None)).user


def last_token(world: World, kind: str) -> str:
    return world.mails(kind)[-1].token


# --- verification ------------------------------------------------------------------------------------


async def test_the_mailed_token_proves_the_address_once(world: World) -> None:
    user = await signed_up(world)
    token = last_token(world, VERIFY_EMAIL)
    assert len(token) >= 43, "256 bits"
    assert token.encode() not in str(world.tables.mail_tokens).encode(), "only its digest is stored"
    proven = await world.auth.verify_email(token)
    assert proven.email_verified and proven.id == user.id
    assert world.tables.verified_outbox == [user.id], "the referral service will be told"
    assert world.enrichment.scheduled == [(user.id, user.email)], "a proven address may be enriched"
    with pytest.raises(VerificationInvalid):
        await world.auth.verify_email(token)
    assert world.tables.verified_outbox == [user.id]


async def test_an_expired_verification_token_is_410(world: World) -> None:
    await signed_up(world)
    token = last_token(world, VERIFY_EMAIL)
    world.store.advance(hours=24)
    with pytest.raises(VerificationExpired):
        await world.auth.verify_email(token)


async def test_unknown_tokens_and_reset_tokens_prove_nothing(world: World) -> None:
    await signed_up(world)
    await world.auth.forgot_password("pia@example.com")
    with pytest.raises(VerificationInvalid):
        await world.auth.verify_email("made-up")
    with pytest.raises(VerificationInvalid):
        await world.auth.verify_email(last_token(world, RESET_PASSWORD))


async def test_a_token_proves_only_the_address_it_was_mailed_to(world: World) -> None:
    user = await signed_up(world)
    token = last_token(world, VERIFY_EMAIL)
    row = world.tables.users[user.id]
    row.user = User(**{**{f: getattr(row.user, f) for f in User.__slots__}, "email": "new@example.com"})  # type: ignore[attr-defined]
    with pytest.raises(VerificationInvalid):
        await world.auth.verify_email(token)
    assert world.tables.verified_outbox == [], "rolled back"


async def test_asking_again_sends_a_new_mail_within_the_limit(world: World) -> None:
    user = await signed_up(world)
    await world.auth.request_verification(user.id)
    assert len(world.mails(VERIFY_EMAIL)) == 2
    world.mail_limiter.per_address = 2
    with pytest.raises(MailThrottled) as throttled:
        await world.auth.request_verification(user.id)
    assert throttled.value.headers == {"Retry-After": "60"}
    assert len(world.mails(VERIFY_EMAIL)) == 2
    await world.auth.verify_email(last_token(world, VERIFY_EMAIL))
    with pytest.raises(EmailAlreadyVerified):
        await world.auth.request_verification(user.id)


# --- password reset ----------------------------------------------------------------------------------


async def test_a_reset_sets_the_password_proves_the_address_and_ends_other_logins(world: World) -> None:
    user = await signed_up(world)
    other = await world.auth.password_grant("pia@example.com", "correct horse", ADDRESS)
    for _ in range(3):
        with pytest.raises(OAuthError):
            await world.auth.password_grant("pia@example.com", "bad guess", ADDRESS)
    await world.auth.forgot_password("PIA@example.com")
    session = await world.auth.reset_password(last_token(world, RESET_PASSWORD), "new horse")
    assert session.user.email_verified
    assert world.password_hash(user.id) == "hashed:new horse"
    assert world.refresh_tokens.live_families(user.id) == {world.issuer.issued[-1]["sid"]}, (
        "only the new login"
    )
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant(other.refresh_token)
    assert ("pia@example.com", ADDRESS) not in world.throttle.pairs, "its login throttles are cleared"
    assert world.tables.verified_outbox == [user.id]
    assert world.enrichment.scheduled == [(user.id, user.email)]


async def test_a_reset_token_works_once(world: World) -> None:
    await signed_up(world)
    await world.auth.forgot_password("pia@example.com")
    token = last_token(world, RESET_PASSWORD)
    await world.auth.reset_password(token, "new horse")
    with pytest.raises(ResetInvalid):
        await world.auth.reset_password(token, "third horse")


async def test_a_reset_token_expires(world: World) -> None:
    await signed_up(world)
    await world.auth.forgot_password("pia@example.com")
    world.store.advance(minutes=30)
    with pytest.raises(ResetExpired):
        await world.auth.reset_password(last_token(world, RESET_PASSWORD), "new horse")


async def test_a_garbage_reset_token_costs_no_hash(world: World) -> None:
    hashes = []
    original = world.hasher.hash

    async def counting(password: str) -> str:
        hashes.append(password)
        return await original(password)

    world.hasher.hash = counting  # type: ignore[method-assign]
    with pytest.raises(ResetInvalid):
        await world.auth.reset_password("garbage", "new horse")
    assert hashes == []


async def test_a_new_reset_link_kills_the_older_ones(world: World) -> None:
    await signed_up(world)
    await world.auth.forgot_password("pia@example.com")
    first = last_token(world, RESET_PASSWORD)
    await world.auth.forgot_password("pia@example.com")
    with pytest.raises(ResetInvalid):
        await world.auth.reset_password(first, "new horse")
    await world.auth.reset_password(last_token(world, RESET_PASSWORD), "new horse")


async def test_changing_the_password_kills_every_reset_link(world: World) -> None:
    user = await signed_up(world)
    await world.auth.forgot_password("pia@example.com")
    token = last_token(world, RESET_PASSWORD)
    await world.auth.change_password(user.id, None, "correct horse", "new horse", ADDRESS)
    with pytest.raises(ResetInvalid):
        await world.auth.reset_password(token, "attacker horse")
    assert world.password_hash(user.id) == "hashed:new horse"


async def test_forgot_password_for_an_unknown_address_is_the_same_answer(world: World) -> None:
    await world.auth.forgot_password("nobody@example.com")
    assert world.tables.mail_outbox == [] and world.tables.mail_tokens == {}
    assert world.mail_limiter.counts == {(RESET_PASSWORD, "nobody@example.com"): 1}, "counted all the same"
    world.mail_limiter.per_address = 1
    with pytest.raises(MailThrottled):
        await world.auth.forgot_password("nobody@example.com")


# --- password change ---------------------------------------------------------------------------------


async def test_a_change_keeps_the_callers_login_and_ends_the_others(world: World) -> None:
    session = await world.auth.signup("quinn@example.com", "correct horse", None)
    mine = world.issuer.issued[-1]["sid"]
    await world.auth.password_grant("quinn@example.com", "correct horse", ADDRESS)
    await world.auth.change_password(session.user.id, mine, "correct horse", "new horse", ADDRESS)
    assert world.refresh_tokens.live_families(session.user.id) == {mine}


async def test_a_wrong_current_password_counts_as_a_failed_login(world: World) -> None:
    user = (await world.auth.signup("rae@example.com", "correct horse", None)).user
    for _ in range(world.throttle.per_pair):
        with pytest.raises(WrongPassword):
            await world.auth.change_password(user.id, None, "bad guess", "new horse", ADDRESS)
    with pytest.raises(PasswordChangeThrottled):
        await world.auth.change_password(user.id, None, "correct horse", "new horse", ADDRESS)
    with pytest.raises(OAuthError) as locked:
        await world.auth.password_grant("rae@example.com", "correct horse", ADDRESS)
    assert locked.value.status == 429
    assert world.password_hash(user.id) == "hashed:correct horse"
