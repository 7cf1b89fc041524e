"""The internal endpoints: only the auth service's service token opens them."""

from __future__ import annotations

import uuid

import pytest

from shared.denylist import DenyList
from tests.referral.conftest import INTERNAL_LINK, auth_header, service_token, verified_path


async def test_code_check(system, signing_pem, db):
    ann = await system.user("ann@example.com")
    code = (await (await system.create_code(ann, "Ann-Code")).json())["code"]
    headers = auth_header(service_token(system, signing_pem))
    response = await system.referral.get("/internal/v1/codes/ann-code", headers=headers)
    assert response.status == 200
    body = await response.json()
    assert body["code"] == code
    assert body["owner_id"] == ann.id
    assert "expires_at" in body
    missing = await system.referral.get("/internal/v1/codes/nope-nope", headers=headers)
    assert missing.status == 404
    assert (await missing.json())["code"] == "code_not_found"
    assert (await system.referral.delete("/api/v1/referral/codes/me", headers=ann.headers)).status == 204
    gone = await system.referral.get("/internal/v1/codes/ANN-CODE", headers=headers)
    assert gone.status == 410
    assert (await gone.json())["code"] == "code_expired"


async def test_link_is_idempotent_by_referral_id(system, signing_pem, db):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    headers = auth_header(service_token(system, signing_pem))
    link = {"referral_id": bob.id, "referrer_id": ann.id, "referral_email": bob.email, "code": "OLD-CODE"}
    first = await system.referral.post(INTERNAL_LINK, json=link, headers=headers)
    assert first.status == 201, await first.text()
    again = await system.referral.post(INTERNAL_LINK, json=link, headers=headers)
    assert again.status == 200
    assert await again.json() == await first.json()
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.referrals")
        assert cursor.fetchone()[0] == 1
    # The same user linked to somebody else: a permanent conflict.
    cat = await system.user("cat@example.com")
    other = {**link, "referrer_id": cat.id}
    conflict = await system.referral.post(INTERNAL_LINK, json=other, headers=headers)
    assert conflict.status == 409
    assert (await conflict.json())["code"] == "already_referred"


async def test_link_refuses_self_and_cycles(system, signing_pem):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    headers = auth_header(service_token(system, signing_pem))

    def link(referral, referrer):
        return {
            "referral_id": referral.id,
            "referrer_id": referrer.id,
            "referral_email": referral.email,
            "code": "C0DE",
        }

    own = await system.referral.post(INTERNAL_LINK, json=link(ann, ann), headers=headers)
    assert own.status == 422
    assert (await own.json())["code"] == "self_referral"
    assert (await system.referral.post(INTERNAL_LINK, json=link(bob, ann), headers=headers)).status == 201
    cycle = await system.referral.post(INTERNAL_LINK, json=link(ann, bob), headers=headers)
    assert cycle.status == 422
    assert (await cycle.json())["code"] == "referral_cycle"


async def test_link_does_not_need_the_code_to_be_active_any_more(system, signing_pem, db):
    """The code was checked when the signup was accepted; its later expiry must not lose the link."""
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    code = (await (await system.create_code(ann)).json())["code"]
    assert (await system.referral.delete("/api/v1/referral/codes/me", headers=ann.headers)).status == 204
    headers = auth_header(service_token(system, signing_pem))
    link = {"referral_id": bob.id, "referrer_id": ann.id, "referral_email": bob.email, "code": code}
    assert (await system.referral.post(INTERNAL_LINK, json=link, headers=headers)).status == 201


@pytest.mark.parametrize(
    "body",
    [
        {},
        {
            "referral_id": "x",
            "referrer_id": str(uuid.uuid4()),
            "referral_email": "a@example.com",
            "code": "C",
        },
        {
            "referral_id": str(uuid.uuid4()),
            "referrer_id": str(uuid.uuid4()),
            "referral_email": "nope",
            "code": "C",
        },
    ],
)
async def test_link_validation(system, signing_pem, body):
    headers = auth_header(service_token(system, signing_pem))
    assert (await system.referral.post(INTERNAL_LINK, json=body, headers=headers)).status == 422


async def test_user_tokens_are_refused_on_internal_endpoints(system, db):
    ann, bob = await system.user("ann@example.com"), await system.user("bob@example.com")
    link = {"referral_id": bob.id, "referrer_id": ann.id, "referral_email": bob.email, "code": "C0DE"}
    for response in (
        await system.referral.post(INTERNAL_LINK, json=link, headers=ann.headers),
        await system.referral.get("/internal/v1/codes/whatever", headers=ann.headers),
        await system.referral.get("/internal/v1/codes/whatever"),
        await system.referral.post(verified_path(str(uuid.uuid4())), headers=ann.headers),
        await system.referral.post(verified_path(str(uuid.uuid4()))),
    ):
        assert response.status == 401
        assert response.content_type == "application/problem+json"


async def test_service_token_without_the_scope_is_forbidden(system, signing_pem, db):
    token = service_token(system, signing_pem, scope=("something:else",))
    user_id = str(uuid.uuid4())
    for response in (
        await system.referral.get("/internal/v1/codes/whatever", headers=auth_header(token)),
        await system.referral.post(verified_path(user_id), headers=auth_header(token)),
    ):
        assert response.status == 403
        assert (await response.json())["code"] == "insufficient_scope"
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM referral.verified_users WHERE user_id = %s", (user_id,))
        assert cursor.fetchone()[0] == 0


async def test_service_tokens_are_refused_on_user_endpoints(system, signing_pem):
    headers = auth_header(service_token(system, signing_pem))
    assert (await system.referral.get("/api/v1/referral/codes/me", headers=headers)).status == 401
    # Even with the user audience, a subject that is not a user id is no user.
    user_audience = service_token(system, signing_pem, audience=system.referral_settings.token_audience)
    response = await system.referral.get("/api/v1/referral/codes/me", headers=auth_header(user_audience))
    assert response.status == 401


async def test_service_tokens_never_consult_the_deny_list(make_system, signing_pem, monkeypatch):
    """A service is never erased: its tokens pass without the deny-list (no lookup, and no 503 when a
    lapsed mirror could not ask), while a user's token is looked up on every request."""
    consulted: list[str] = []
    is_denied = DenyList.is_denied

    async def counted(self: DenyList, subject: str) -> bool:
        consulted.append(subject)
        return await is_denied(self, subject)

    monkeypatch.setattr(DenyList, "is_denied", counted)  # before the services bind it to a verifier
    system = await make_system()
    ann = await system.user("ann@example.com")
    headers = auth_header(service_token(system, signing_pem))
    consulted.clear()
    assert (await system.referral.get(f"/internal/v1/users/{ann.id}/export", headers=headers)).status == 200
    assert (await system.referral.get("/api/v1/referral/codes/me", headers=ann.headers)).status == 404
    assert consulted == [ann.id]
    # Erased as the auth service's erasure reaches this service: her token is refused from then on.
    assert (await system.referral.delete(f"/internal/v1/users/{ann.id}", headers=headers)).status == 204
    refused = await system.referral.get("/api/v1/referral/codes/me", headers=ann.headers)
    assert refused.status == 401
    assert (await refused.json())["code"] == "invalid_token"
    assert consulted == [ann.id, ann.id]


async def test_user_export_answers_a_service_token_only(system, signing_pem, db):
    ann = await system.user("ann@example.com")
    headers = auth_header(service_token(system, signing_pem))
    code = (await (await system.create_code(ann, "Ann-Export")).json())["code"]
    response = await system.referral.get(f"/internal/v1/users/{ann.id}/export", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["user_id"] == ann.id and body["referrer"] is None and body["referrals"] == []
    assert [(c["code"], c["status"], c["deleted_at"], c["uses"]) for c in body["codes"]] == [
        (code, "active", None, 0)
    ]
    # Nobody this service has heard of: the same document, empty.
    stranger = str(uuid.uuid4())
    empty = await (await system.referral.get(f"/internal/v1/users/{stranger}/export", headers=headers)).json()
    assert empty == {
        "user_id": stranger,
        "email_verified_at": None,
        "codes": [],
        "referrer": None,
        "referrals": [],
    }
    bad = await system.referral.get("/internal/v1/users/not-a-uuid/export", headers=headers)
    assert bad.status == 422
    refused = await system.referral.get(f"/internal/v1/users/{ann.id}/export", headers=ann.headers)
    assert refused.status in (401, 403)
