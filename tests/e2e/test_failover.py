"""One referral instance down: the gateway sends everything to the other, and no request fails.

`referral-1` is stopped (the auth service's internal calls go to `referral-0`, so signups with a code
keep working and what this tests is the gateway's failover alone), then started again on its port.
"""

from __future__ import annotations

import asyncio

from tests.e2e.api import MY_CODE, activate, client, create_code, lookup

ROUNDS = 20


async def test_a_stopped_referral_instance_fails_no_request(stack, gateway, make_account):
    owner = await make_account("owner")
    code = (await create_code(gateway, owner))["code"]
    joiners = await asyncio.gather(*(make_account(f"joiner{i}") for i in range(ROUNDS)))

    stack.stop_referral(1)
    try:
        for i in range(ROUNDS):
            found = await lookup(gateway, owner.email)
            assert found.status == 200, (i, await found.text())
            assert (await found.json())["code"] == code
            activated = await activate(gateway, joiners[i], code)
            assert activated.status == 201, (i, await activated.text())
            body = await activated.json()
            assert body["referrer_id"] == owner.id and body["referral_id"] == joiners[i].id, body
        # A signup with the code still works too (auth checks it on referral-0).
        late = await make_account("late", referral_code=code)
        assert late.referrer_id == owner.id
        mine = await gateway.get(MY_CODE, headers=owner.headers)
        assert mine.status == 200, await mine.text()
    finally:
        stack.start_referral(1)

    # Back on its port and serving, directly and through the gateway.
    async with client() as direct:
        response = await direct.get(stack.referral_urls[1] + MY_CODE, headers=owner.headers)
        assert response.status == 200, await response.text()
        assert (await response.json())["code"] == code
    for _ in range(4):
        found = await lookup(gateway, owner.email)
        assert found.status == 200, await found.text()
