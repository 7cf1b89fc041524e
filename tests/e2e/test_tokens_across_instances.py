"""Tokens work whichever auth instance issued them, on every instance of both services.

The one place the tests bypass the gateway: each instance is called directly on its own port.
"""

from __future__ import annotations

from services.auth.adapters.signing import AccessTokenIssuer, generate_pem, parse_key_ring
from tests.e2e.api import AUTH, ME, MY_CODE, bearer, client, create_code, jwt_parts, password_grant
from tests.helpers import assert_problem


async def _accepted_everywhere(stack, token: str, user_id: str, code: str | None) -> None:
    """/me on both auth instances and /codes/me on both referral instances accept `token`."""
    async with client() as direct:
        for url in stack.auth_urls:
            response = await direct.get(url + ME, headers=bearer(token))
            assert response.status == 200, (url, await response.text())
            assert (await response.json())["id"] == user_id
        for url in stack.referral_urls:
            response = await direct.get(url + MY_CODE, headers=bearer(token))
            if code is None:
                await assert_problem(response, 404, "code_not_found")
            else:
                assert response.status == 200, (url, await response.text())
                body = await response.json()
                assert body["code"] == code and body["owner_id"] == user_id, body


async def _refused_everywhere(stack, token: str) -> None:
    async with client() as direct:
        for url, path in [*((u, ME) for u in stack.auth_urls), *((u, MY_CODE) for u in stack.referral_urls)]:
            response = await direct.get(url + path, headers=bearer(token))
            await assert_problem(response, 401)
            challenge = response.headers.get("WWW-Authenticate", "")
            assert challenge.startswith("Bearer") and 'error="invalid_token"' in challenge, (url, challenge)


async def test_a_token_from_either_auth_instance_works_on_all_four(stack, gateway, make_account):
    account = await make_account("multi")
    async with client() as direct:
        jwks = []
        for url in stack.auth_urls:
            response = await direct.get(url + f"{AUTH}/.well-known/jwks.json")
            assert response.status == 200, await response.text()
            jwks.append(await response.json())
        assert jwks[0] == jwks[1] and jwks[0]["keys"], jwks
        issued = []
        for url in stack.auth_urls:
            async with client(url) as one:
                issued.append((await password_grant(one, account))["access_token"])
    kids = {jwt_parts(token)[0]["kid"] for token in [account.access_token, *issued]}
    assert len(kids) == 1 and kids <= {key["kid"] for key in jwks[0]["keys"]}, kids
    for token in [account.access_token, *issued]:
        assert jwt_parts(token)[1]["iss"] == stack.issuer
        await _accepted_everywhere(stack, token, account.id, code=None)

    created = await create_code(gateway, account)
    for token in [account.access_token, *issued]:
        await _accepted_everywhere(stack, token, account.id, code=created["code"])


async def test_forged_tokens_are_refused_by_all_four(stack, make_account):
    account = await make_account("forged")
    # Signed by a key the system does not know, otherwise exactly like a real token.
    stranger = AccessTokenIssuer(
        parse_key_ring(generate_pem()), issuer=stack.issuer, audience="referral-system", ttl=900
    )
    await _refused_everywhere(stack, stranger.issue(account.id, email=account.email).token)
    # The system's own key but another issuer: refused.
    ring = parse_key_ring(stack.signing_pem)
    other_issuer = AccessTokenIssuer(
        ring, issuer="http://evil.test/api/v1/auth", audience="referral-system", ttl=900
    )
    await _refused_everywhere(stack, other_issuer.issue(account.id, email=account.email).token)
    # A service token (another audience) is no user token.
    service = AccessTokenIssuer(ring, issuer=stack.issuer, audience="referral-service", ttl=900)
    await _refused_everywhere(
        stack, service.issue("auth-service", email=None, scope=["referrals:internal"]).token
    )
    await _refused_everywhere(stack, "not-a-jwt")
    # The control: the same issuer with the system's key is accepted, so the refusals above are real.
    genuine = AccessTokenIssuer(ring, issuer=stack.issuer, audience="referral-system", ttl=900)
    await _accepted_everywhere(stack, genuine.issue(account.id, email=account.email).token, account.id, None)
