"""The verifier remembers tokens that passed, and still refuses them once expired or their key is gone."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from services.auth.adapters.signing import AccessTokenIssuer, KeyRing, generate_pem, parse_key_ring
from shared import tokens
from shared.problems import InvalidToken
from shared.tokens import TokenVerifier

ISSUER = "http://127.0.0.1:8080/api/v1/auth"
AUDIENCE = "referral-system"


class Keys:
    """A key source whose published keys a test changes, as a JWKS refresh would."""

    def __init__(self, *rings: KeyRing) -> None:
        self.keys: dict[str, RSAKey] = {}
        self.publish(*rings)

    def publish(self, *rings: KeyRing) -> None:
        self.keys = {key.kid: key for ring in rings for key in ring.public_keys if key.kid}

    async def key_for(self, kid: str) -> RSAKey | None:
        return self.keys.get(kid)


@pytest.fixture(scope="module")
def ring() -> KeyRing:
    return parse_key_ring(generate_pem())


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full signature check the verifier makes."""
    seen: list[str] = []
    real = tokens.jwt.decode

    def counting(token: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting)
    return seen


def token(ring: KeyRing, *, ttl: int = 900) -> str:
    issuer = AccessTokenIssuer(ring, issuer=ISSUER, audience=AUDIENCE, ttl=ttl)
    return issuer.issue(uuid.uuid4(), email="jane@example.com").token


def verifier(keys: Keys, **options: Any) -> TokenVerifier:
    return TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE, **options)


async def test_a_repeated_token_is_checked_in_full_once(ring, decodes):
    check = verifier(Keys(ring))
    value = token(ring)
    first = await check.verify(value)
    for _ in range(5):
        assert await check.verify(value) == first
    assert decodes == [value]


async def test_an_expired_token_is_refused_although_it_passed_before(ring, decodes, monkeypatch):
    check = verifier(Keys(ring), leeway=0)
    value = token(ring, ttl=60)
    await check.verify(value)
    now = time.time()
    monkeypatch.setattr(tokens.time, "time", lambda: now + 61)
    with pytest.raises(InvalidToken, match="expired"):
        await check.verify(value)
    with pytest.raises(InvalidToken, match="expired"):
        await check.verify(value)  # and it stays refused


async def test_a_withdrawn_key_refuses_its_tokens_at_once(ring, decodes):
    keys = Keys(ring)
    check = verifier(keys)
    value = token(ring)
    await check.verify(value)
    keys.publish()  # the JWKS no longer has the key
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await check.verify(value)


async def test_a_key_replaced_under_the_same_kid_refuses_old_tokens(ring, decodes):
    keys = Keys(ring)
    check = verifier(keys)
    value = token(ring)
    await check.verify(value)
    other = parse_key_ring(generate_pem()).public_keys[0]
    replacement = RSAKey.import_key(other.as_dict(private=False), {"kid": ring.public_keys[0].kid})
    keys.keys = {replacement.kid: replacement}
    with pytest.raises(InvalidToken, match="bad signature"):
        await check.verify(value)


async def test_refused_tokens_are_not_remembered(ring, decodes):
    check = verifier(Keys(ring))
    bad = token(ring)[:-4] + "AAAA"
    for _ in range(2):
        with pytest.raises(InvalidToken):
            await check.verify(bad)
    assert decodes == [bad, bad]


async def test_the_cache_is_bounded_and_drops_the_oldest(ring, decodes):
    check = verifier(Keys(ring), cache_size=2)
    first, second, third = token(ring), token(ring), token(ring)
    for value in (first, second, third, third, second):
        await check.verify(value)
    assert decodes == [first, second, third]
    await check.verify(first)  # dropped when the third came
    assert decodes == [first, second, third, first]


async def test_a_cache_size_of_zero_checks_every_time(ring, decodes):
    check = verifier(Keys(ring), cache_size=0)
    value = token(ring)
    await check.verify(value)
    await check.verify(value)
    assert decodes == [value, value]


class SlowKeys(Keys):
    """Keys looked up over the network, as RemoteJWKS does: each lookup lets other requests run."""

    async def key_for(self, kid: str) -> RSAKey | None:
        await asyncio.sleep(0)
        return self.keys.get(kid)


async def test_requests_in_flight_when_a_key_is_withdrawn_are_all_refused(ring):
    """Several requests with one remembered token find its key gone at the same moment: each is
    refused (401), none trips over another forgetting the token first (a 500 before)."""
    keys = SlowKeys(ring)
    check = verifier(keys)
    value = token(ring)
    await check.verify(value)
    keys.publish()  # the key is withdrawn
    outcomes = await asyncio.gather(*(check.verify(value) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(outcome, InvalidToken) for outcome in outcomes), outcomes
