"""Sign-in through a provider on fakes: the flow's state, new users, returning ones, and the linking
rules (an identity links into an account only when the provider vouches for the email; a proof
from the provider takes an unproven account from whoever squatted it)."""

from __future__ import annotations

import uuid

import pytest

from services.auth.domain.errors import (
    EmailTaken,
    InvalidState,
    OAuthFailed,
    ReferralCodeNotFound,
    ResetInvalid,
    SignInUnavailable,
    UnknownProvider,
    VerificationInvalid,
)
from services.auth.domain.models import RESET_PASSWORD, VERIFY_EMAIL, ProviderIdentity
from services.auth.domain.oauth import ProviderSignIn
from shared.problems import OAuthError
from tests.auth.domain.fakes import World

ADDRESS = "203.0.113.11"


async def callback(
    world: World, identity: ProviderIdentity, *, referral_code: str | None = None
) -> ProviderSignIn:
    """Run the whole flow for `identity`: begin, the provider's redirect back, finish."""
    url = await world.oauth.begin("acme", referral_code)
    state = url.split("state=")[1].split("&")[0]
    code = uuid.uuid4().hex
    world.provider.identities[code] = identity
    return await world.oauth.finish("acme", code=code, state=state, error=None)


async def test_a_new_identity_creates_a_proven_user_without_a_password(world: World) -> None:
    result = await callback(world, ProviderIdentity("sub-1", "sam@example.com", True))
    assert result.created and result.session.user.email_verified
    assert world.password_hash(result.session.user.id) is None
    assert world.tables.identities == {("acme", "sub-1"): result.session.user.id}
    assert world.mails(VERIFY_EMAIL) == [], "the provider vouched: no verification mail"
    assert world.tables.verified_outbox == [result.session.user.id]
    assert world.enrichment.scheduled == [(result.session.user.id, "sam@example.com")]


async def test_an_unvouched_email_makes_an_unproven_user(world: World) -> None:
    result = await callback(world, ProviderIdentity("sub-2", "tia@example.com", False))
    assert result.created and not result.session.user.email_verified
    assert len(world.mails(VERIFY_EMAIL, "tia@example.com")) == 1


async def test_a_returning_identity_signs_in(world: World) -> None:
    first = await callback(world, ProviderIdentity("sub-3", "uma@example.com", True))
    again = await callback(world, ProviderIdentity("sub-3", "uma@example.com", True))
    assert not again.created and again.session.user.id == first.session.user.id


async def test_the_referral_code_carried_in_the_state_is_applied(world: World) -> None:
    owner = uuid.uuid4()
    world.referrals.add("ABCD1234", owner)
    result = await callback(
        world, ProviderIdentity("sub-4", "vic@example.com", True), referral_code="ABCD1234"
    )
    assert result.session.user.referrer_id == owner and len(world.delivery.delivered) == 1
    with pytest.raises(ReferralCodeNotFound):
        await callback(world, ProviderIdentity("sub-5", "wes@example.com", True), referral_code="NOPE1234")
    assert ("acme", "sub-5") not in world.tables.identities


# --- linking into an existing account ----------------------------------------------------------------


async def test_a_vouched_email_links_into_a_proven_account(world: World) -> None:
    owner = (await world.auth.signup("xia@example.com", "correct horse", None)).user
    await world.auth.verify_email(world.mails(VERIFY_EMAIL)[-1].token)
    result = await callback(world, ProviderIdentity("sub-6", "XIA@example.com", True))
    assert not result.created and result.session.user.id == owner.id
    assert world.tables.identities[("acme", "sub-6")] == owner.id
    assert world.password_hash(owner.id) == "hashed:correct horse", "the owner keeps their password"


async def test_an_unvouched_email_never_links_into_an_account(world: World) -> None:
    owner = (await world.auth.signup("yan@example.com", "correct horse", None)).user
    await world.auth.verify_email(world.mails(VERIFY_EMAIL)[-1].token)
    with pytest.raises(EmailTaken):
        await callback(world, ProviderIdentity("sub-7", "yan@example.com", False))
    assert world.tables.identities == {}
    assert world.refresh_tokens.live_families(owner.id) == {world.issuer.issued[0]["sid"]}


async def test_a_verified_identity_never_links_into_an_unproven_account_the_squatter_loses_it(
    world: World,
) -> None:
    """Someone signed up first with another's address (never proven); the provider proves the address
    is the newcomer's: the account is theirs, and nothing of the squatter's stays."""
    squatter = await world.auth.signup("zoe@example.com", "squatter pass", None)
    squatted_id = squatter.user.id
    await world.identities.add("other", "squatter-sub", squatted_id, "zoe@example.com")
    await world.auth.forgot_password("zoe@example.com")
    reset_token = world.mails(RESET_PASSWORD)[-1].token
    verify_token = world.mails(VERIFY_EMAIL)[-1].token

    result = await callback(world, ProviderIdentity("sub-8", "zoe@example.com", True))

    assert not result.created and result.session.user.id == squatted_id
    assert result.session.user.email_verified
    assert world.password_hash(squatted_id) is None, "the squatter's password is gone"
    assert world.tables.identities == {("acme", "sub-8"): squatted_id}, "their other identities too"
    assert world.refresh_tokens.live_families(squatted_id) == {world.issuer.issued[-1]["sid"]}
    with pytest.raises(OAuthError):
        await world.auth.refresh_grant(squatter.tokens.refresh_token)
    with pytest.raises(OAuthError):
        await world.auth.password_grant("zoe@example.com", "squatter pass", ADDRESS)
    with pytest.raises(VerificationInvalid):
        await world.auth.verify_email(verify_token)
    with pytest.raises(ResetInvalid):
        await world.auth.reset_password(reset_token, "squatter again")
    assert world.tables.verified_outbox == [squatted_id]
    assert ("clear", "zoe@example.com") in world.throttle.calls


async def test_an_identity_linked_at_the_same_moment_is_oauth_failed(world: World) -> None:
    world.store.linked_meanwhile.add(("acme", "sub-9"))
    with pytest.raises(OAuthFailed, match="at the same moment"):
        await callback(world, ProviderIdentity("sub-9", "amy@example.com", True))
    assert world.tables.users == {}, "the signup rolled back"
    owner = (await world.auth.signup("ben@example.com", "correct horse", None)).user
    await world.auth.verify_email(world.mails(VERIFY_EMAIL)[-1].token)
    world.store.linked_meanwhile.add(("acme", "sub-11"))
    with pytest.raises(OAuthFailed, match="at the same moment"):
        await callback(world, ProviderIdentity("sub-11", "ben@example.com", True))
    assert world.refresh_tokens.live_families(owner.id) == {world.issuer.issued[0]["sid"]}


# --- the flow ----------------------------------------------------------------------------------------


async def test_a_state_is_good_once_and_for_its_provider_only(world: World) -> None:
    url = await world.oauth.begin("acme", None)
    state = url.split("state=")[1].split("&")[0]
    world.provider.identities["code"] = ProviderIdentity("sub-10", "bo@example.com", True)
    await world.oauth.finish("acme", code="code", state=state, error=None)
    with pytest.raises(InvalidState):
        await world.oauth.finish("acme", code="code", state=state, error=None)
    with pytest.raises(InvalidState):
        await world.oauth.finish("acme", code="code", state=None, error=None)
    stolen = await world.states.create("elsewhere", referral_code=None)
    with pytest.raises(InvalidState):
        await world.oauth.finish("acme", code="code", state=stolen.state, error=None)


async def test_provider_failures_create_nothing(world: World) -> None:
    url = await world.oauth.begin("acme", None)
    state = url.split("state=")[1].split("&")[0]
    with pytest.raises(OAuthFailed, match="failed"):
        await world.oauth.finish("acme", code="unknown-code", state=state, error=None)
    denied = (await world.states.create("acme", referral_code=None)).state
    with pytest.raises(OAuthFailed, match="access_denied"):
        await world.oauth.finish("acme", code=None, state=denied, error="access_denied")
    assert denied not in world.states.flows, "a denied flow is spent"
    assert world.tables.users == {}


async def test_unknown_providers_and_a_down_state_store(world: World) -> None:
    with pytest.raises(UnknownProvider):
        await world.oauth.begin("nope", None)
    world.states.down = True
    with pytest.raises(SignInUnavailable):
        await world.oauth.begin("acme", None)
