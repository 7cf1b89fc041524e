"""Idempotent writes through the gateway, across instances: a keyed request retried (here: sent many
times at once, spread over two instances of each service) runs once; the replay header passes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.api import (
    CODES,
    PASSWORD,
    REFERRALS,
    SIGNUP,
    record_issued_tokens,
    rfc3339,
    unique_email,
)
from tests.helpers import assert_problem, query

KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


async def sent_at_once(session: Any, path: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    async def one() -> tuple[int, bytes, dict[str, str]]:
        async with session.post(path, json=body, headers=headers) as response:
            await record_issued_tokens(response)
            return response.status, await response.read(), dict(response.headers)

    return await asyncio.gather(*(one() for _ in range(10)))


def ran_once(answers: list[tuple[int, bytes, dict[str, str]]]) -> tuple[int, bytes]:
    """One answer executed; the others are it replayed (with the header) or 409 in use."""
    executed = [(s, b) for s, b, h in answers if REPLAYED not in h and s != 409]
    assert len(executed) == 1, [(s, h.get(REPLAYED)) for s, _, h in answers]
    for status, body, headers in answers:
        if REPLAYED in headers:
            assert headers[REPLAYED] == "true" and (status, body) == executed[0]
        elif status == 409:
            assert json.loads(body)["code"] == "idempotency_key_in_use"
    return executed[0]


async def test_a_keyed_signup_sent_ten_times_at_once_creates_one_user(stack, gateway):
    email = unique_email("keyed")
    body = {"email": email, "password": PASSWORD}
    status, first = ran_once(await sent_at_once(gateway, SIGNUP, body, {KEY: f"signup-{email}"}))
    assert status == 201
    assert query(stack.database_url, "SELECT count(*) FROM auth.users WHERE email = %s", (email,)) == [(1,)]
    # Later, the same: the first answer, byte for byte, from whichever instance answers.
    async with gateway.post(SIGNUP, json=body, headers={KEY: f"signup-{email}"}) as again:
        assert again.status == 201 and again.headers[REPLAYED] == "true"
        assert await again.read() == first
        assert "no-store" in again.headers["Cache-Control"]
    async with gateway.post(
        SIGNUP, json={**body, "password": PASSWORD + "!"}, headers={KEY: f"signup-{email}"}
    ) as other:
        await assert_problem(other, 422, "idempotency_key_reused")


async def test_keyed_code_creation_and_activation_run_once_across_instances(stack, gateway, make_account):
    owner = await make_account("keyed-owner")
    joiner = await make_account("keyed-joiner")
    body = {"expires_at": rfc3339(datetime.now(UTC) + timedelta(days=1))}
    status, created = ran_once(await sent_at_once(gateway, CODES, body, {**owner.headers, KEY: "code-1"}))
    assert status == 201
    code = json.loads(created)["code"]
    assert query(
        stack.database_url, "SELECT count(*) FROM referral.codes WHERE owner_id = %s", (owner.id,)
    ) == [(1,)]

    status, _ = ran_once(
        await sent_at_once(gateway, REFERRALS, {"code": code}, {**joiner.headers, KEY: "link-1"})
    )
    assert status == 201
    rows = query(
        stack.database_url,
        "SELECT referrer_id::text FROM referral.referrals WHERE referral_id = %s",
        (joiner.id,),
    )
    assert rows == [(owner.id,)]
    # The same key, another caller: a request of its own, executed.
    async with gateway.post(CODES, json=body, headers={**joiner.headers, KEY: "code-1"}) as response:
        assert REPLAYED not in response.headers
        assert response.status == 201, await response.text()
