"""The token endpoint's use cases on fakes: the password grant and its throttle decision, refresh
rotation and reuse detection, revocation, signing out everywhere."""

from __future__ import annotations

import pytest

from services.auth.domain.errors import UserGone
from services.auth.domain.models import User
from services.auth.domain.use_cases import BAD_CREDENTIALS, hash_refresh_token
from shared.problems import OAuthError
from tests.auth.domain.fakes import World

ADDRESS = "203.0.113.7"


async def signed_up(world: World, email: str = "ivy@example.com", password: str = "correct horse") -> User:
    return (await world.auth.signup(email, password, None)).user


def password(username: str, secret: str) -> dict[str, str]:
    return {"grant_type": "password", "username": username, "password": secret}


# --- the password grant ------------------------------------------------------------------------------


async def test_the_right_password_signs_in_a_new_login(world: World) -> None:
    user = await signed_up(world)
    tokens = await world.auth.token(password("IVY@example.com", "correct horse"), ADDRESS)
    assert tokens.token_type == "Bearer" and tokens.refresh_token
    assert len(world.refresh_tokens.live_families(user.id)) == 2, "a family of its own"
    assert world.throttle.calls == [("reserve", ADDRESS), ("succeeded", ADDRESS)]


async def test_wrong_and_unknown_answer_the_same(world: World) -> None:
    await signed_up(world)
    with pytest.raises(OAuthError) as wrong:
        await world.auth.token(password("ivy@example.com", "bad guess"), ADDRESS)
    with pytest.raises(OAuthError) as unknown:
        await world.auth.token(password("nobody@example.com", "bad guess"), ADDRESS)
    for refused in (wrong.value, unknown.value):
        assert (refused.error, refused.description, refused.status) == ("invalid_grant", BAD_CREDENTIALS, 400)
    assert world.hasher.dummy_checks == 1, "an unknown email costs a hash check all the same"


async def test_a_wrong_password_keeps_its_place_in_the_throttle(world: World) -> None:
    await signed_up(world)
    for _ in range(world.throttle.per_pair):
        with pytest.raises(OAuthError):
            await world.auth.password_grant("ivy@example.com", "bad guess", ADDRESS)
    world.hasher.verified.clear()
    with pytest.raises(OAuthError) as locked:
        await world.auth.password_grant("ivy@example.com", "correct horse", ADDRESS)
    assert (locked.value.error, locked.value.status) == ("temporarily_unavailable", 429)
    assert locked.value.headers == {"Retry-After": str(world.throttle.retry_after)}
    assert world.hasher.verified == [], "a refused attempt checks no password"
    # Another address, the owner's own, is not affected.
    assert await world.auth.password_grant("ivy@example.com", "correct horse", "198.51.100.1")


async def test_an_attempt_without_a_verdict_gives_its_places_back(world: World) -> None:
    await signed_up(world)
    world.hasher.fail_with = RuntimeError("the hashing pool is gone")
    with pytest.raises(RuntimeError):
        await world.auth.password_grant("ivy@example.com", "correct horse", ADDRESS)
    assert world.throttle.calls[-2:] == [("reserve", ADDRESS), ("undecided", ADDRESS)]
    assert world.throttle.pairs[("ivy@example.com", ADDRESS)] == 0


async def test_a_nul_in_the_username_is_refused_before_anything(world: World) -> None:
    with pytest.raises(OAuthError) as refused:
        await world.auth.token(password("ivy\x00@example.com", "x"), ADDRESS)
    assert refused.value.error == "invalid_grant"
    assert world.throttle.calls == []


async def test_an_outdated_hash_is_replaced_at_login(world: World) -> None:
    user = await signed_up(world)
    world.tables.users[user.id].password_hash = "old:correct horse"
    await world.auth.password_grant("ivy@example.com", "correct horse", ADDRESS)
    assert world.password_hash(user.id) == "hashed:correct horse"


async def test_a_provider_only_account_has_no_password_to_guess(world: World) -> None:
    user = await signed_up(world)
    world.tables.users[user.id].password_hash = None
    with pytest.raises(OAuthError):
        await world.auth.password_grant("ivy@example.com", "", ADDRESS)
    assert world.hasher.dummy_checks == 1


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "password", "username": "a@example.com"}, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": ""}, "invalid_request"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
    ],
)
async def test_the_token_endpoint_names_what_is_wrong(
    world: World, params: dict[str, str], error: str
) -> None:
    with pytest.raises(OAuthError) as refused:
        await world.auth.token(params, ADDRESS)
    assert refused.value.error == error


# --- refresh tokens ----------------------------------------------------------------------------------


async def test_a_refresh_rotates_within_the_login(world: World) -> None:
    session = await world.auth.signup("jo@example.com", "correct horse", None)
    family = world.issuer.issued[-1]["sid"]
    rotated = await world.auth.token(
        {"grant_type": "refresh_token", "refresh_token": session.tokens.refresh_token}, ADDRESS
    )
    assert rotated.refresh_token != session.tokens.refresh_token
    assert world.issuer.issued[-1]["sid"] == family, "the same login"
    row = world.tables.refresh_tokens[hash_refresh_token(rotated.refresh_token)]
    assert row.parent_id == world.tables.refresh_tokens[hash_refresh_token(session.tokens.refresh_token)].id
    assert world.refresh_tokens.live_families(session.user.id) == {family}


async def test_a_rotated_token_presented_again_revokes_its_whole_login(world: World) -> None:
    session = await world.auth.signup("kim@example.com", "correct horse", None)
    other = await world.auth.password_grant("kim@example.com", "correct horse", ADDRESS)
    rotated = await world.auth.refresh_grant(session.tokens.refresh_token)
    with pytest.raises(OAuthError) as reused:
        await world.auth.refresh_grant(session.tokens.refresh_token)
    assert reused.value.error == "invalid_grant" and "already used" in reused.value.description
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant(rotated.refresh_token)  # the thief's (or the owner's) copy died too
    assert await world.auth.refresh_grant(other.refresh_token), "another login is not touched"


async def test_unknown_and_expired_refresh_tokens_are_invalid(world: World) -> None:
    session = await world.auth.signup("lee@example.com", "correct horse", None)
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant("not-a-token")
    world.store.advance(days=31)
    with pytest.raises(OAuthError) as expired:
        await world.auth.refresh_grant(session.tokens.refresh_token)
    assert "invalid, expired or revoked" in expired.value.description


async def test_revoking_a_token_ends_its_login_only(world: World) -> None:
    session = await world.auth.signup("max@example.com", "correct horse", None)
    other = await world.auth.password_grant("max@example.com", "correct horse", ADDRESS)
    await world.auth.revoke(session.tokens.refresh_token)
    await world.auth.revoke("unknown tokens are accepted silently")
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant(session.tokens.refresh_token)
    assert await world.auth.refresh_grant(other.refresh_token)


async def test_signing_out_everywhere_ends_every_login(world: World) -> None:
    session = await world.auth.signup("ned@example.com", "correct horse", None)
    logins = [await world.auth.password_grant("ned@example.com", "correct horse", ADDRESS) for _ in range(2)]
    await world.auth.sign_out_everywhere(session.user.id)
    assert world.refresh_tokens.live_families(session.user.id) == set()
    for tokens in (session.tokens, *logins):
        with pytest.raises(OAuthError):
            await world.auth.refresh_grant(tokens.refresh_token)


async def test_a_deleted_users_tokens_are_gone(world: World) -> None:
    session = await world.auth.signup("ola@example.com", "correct horse", None)
    del world.tables.users[session.user.id]
    with pytest.raises(UserGone):
        await world.auth.current_user(session.user.id)
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant(session.tokens.refresh_token)
