"""Sessions and the data export on fakes: what a login records, the current session, ending one,
the export's parts and its refusal when the referral service cannot answer."""

from __future__ import annotations

import uuid

import pytest

from services.auth.domain.errors import ReferralDataUnavailable, SessionNotFound
from services.auth.domain.models import USER_AGENT_MAX, Client
from tests.auth.domain.fakes import World

ADDRESS = "203.0.113.7"


def refresh(token: str) -> dict[str, str]:
    return {"grant_type": "refresh_token", "refresh_token": token}


def password(username: str) -> dict[str, str]:
    return {"grant_type": "password", "username": username, "password": "correct horse"}


async def test_a_login_records_its_client_and_a_refresh_moves_it(world: World) -> None:
    signup = await world.auth.signup("ivy@example.com", "correct horse", None, Client.of("Signup/1", ADDRESS))
    user = signup.user
    [only] = await world.auth.sessions(user.id, None)
    assert (only.user_agent, only.address, only.current) == ("Signup/1", ADDRESS, False)
    assert only.created_at == only.last_used_at == world.store.now
    login_at = world.store.now

    world.store.advance(minutes=5)
    await world.auth.token(refresh(signup.tokens.refresh_token), "198.51.100.9", user_agent="Phone/2")
    [moved] = await world.auth.sessions(user.id, only.id)
    assert moved.id == only.id and moved.current
    assert (moved.created_at, moved.last_used_at) == (login_at, world.store.now)
    assert (moved.user_agent, moved.address) == ("Phone/2", "198.51.100.9")


def test_a_client_keeps_printable_text_cut_short() -> None:
    client = Client.of("A\x00B\r\nC\ud800" + "x" * 400, " 203.0.113.7 ")
    assert client.user_agent is not None
    assert client.user_agent.startswith("ABC") and len(client.user_agent) == USER_AGENT_MAX
    assert client.address == "203.0.113.7"
    assert Client.of("\x01\x02", "") == Client(None, None)


async def test_ending_a_session_ends_only_that_one_and_only_for_its_owner(world: World) -> None:
    user = (await world.auth.signup("ivy@example.com", "correct horse", None)).user
    await world.auth.token(password("ivy@example.com"), ADDRESS)
    other = await world.auth.signup("eve@example.com", "correct horse", None)
    victim, survivor = sorted(s.id for s in await world.auth.sessions(user.id, None))

    with pytest.raises(SessionNotFound):
        await world.auth.end_session(other.user.id, victim)
    await world.auth.end_session(user.id, victim)
    assert world.refresh_tokens.live_families(user.id) == {survivor}
    with pytest.raises(SessionNotFound):
        await world.auth.end_session(user.id, victim)
    with pytest.raises(SessionNotFound):
        await world.auth.end_session(user.id, uuid.uuid4())


async def test_the_export_holds_both_services_parts_and_refuses_without_the_referral_service(
    world: World,
) -> None:
    user = (await world.auth.signup("ivy@example.com", "correct horse", None)).user
    export = await world.auth.export(user.id, None)
    assert export.user == user and export.has_password
    assert [s.id for s in export.sessions] == [s.id for s in await world.auth.sessions(user.id, None)]
    assert export.identities == [] and export.referral.codes == []

    world.exports.down = True
    with pytest.raises(ReferralDataUnavailable) as refused:
        await world.auth.export(user.id, None)
    assert refused.value.code == "referral_service_unavailable" and refused.value.status == 503
    assert refused.value.headers["Retry-After"]
