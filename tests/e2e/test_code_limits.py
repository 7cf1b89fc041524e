"""A code's `max_uses` through the gateway, against the real processes (two instances of each service):
activations and signups racing for a limited code make exactly `max_uses` links."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from tests.e2e.api import CODES, activate, new_account, rfc3339, signup, unique_email
from tests.helpers import assert_problem, query

LINK_DEADLINE = 10.0
LINKS = "SELECT count(*) FROM referral.referrals WHERE code = %s"


async def test_50_activations_and_signups_at_once_make_exactly_max_uses_links(stack, gateway):
    owner = await new_account(gateway, "limited-owner")
    body = {"expires_at": rfc3339(datetime.now(UTC) + timedelta(days=1)), "max_uses": 10}
    created = await gateway.post(CODES, json=body, headers=owner.headers)
    assert created.status == 201, await created.text()
    code = (await created.json())["code"]
    assert (await created.json())["max_uses"] == 10
    activators = await asyncio.gather(
        *(new_account(gateway, "limited-act", verified=False) for _ in range(25))
    )
    emails = [unique_email("limited-sig") for _ in range(25)]

    results = await asyncio.gather(
        *(activate(gateway, account, code) for account in activators),
        *(signup(gateway, email, referral_code=code) for email in emails),
    )
    statuses = [response.status for response in results]
    assert statuses.count(201) == 10, statuses
    for response in results:
        if response.status != 201:
            await assert_problem(response, 409, "code_exhausted")
    # A signup's link is delivered by the auth service's outbox, maybe just after the 201.
    deadline = time.monotonic() + LINK_DEADLINE
    while (links := query(stack.database_url, LINKS, (code,))) != [(10,)]:
        assert time.monotonic() < deadline, links
        await asyncio.sleep(0.1)
    assert query(stack.database_url, "SELECT uses FROM referral.codes WHERE code = %s", (code,)) == [(10,)]
    signed_up = statuses[25:].count(201)
    placeholders = ",".join(["%s"] * len(emails))
    users = query(
        stack.database_url, f"SELECT count(*) FROM auth.users WHERE email IN ({placeholders})", emails
    )
    assert users == [(signed_up,)]  # a refused signup created nothing
    mine = await gateway.get(f"{CODES}/me", headers=owner.headers)
    assert (await mine.json())["uses"] == 10
