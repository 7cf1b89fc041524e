"""Account erasure through the gateway (issue 14): erased while both referral instances are down, then
back; and erased while they are up, the tokens refused at once by both services.

Everything the person does goes through the gateway: signups with codes, the mailed verification links
(the e2e mailbox), the codes, the erasure. Both auth instances call `referral-0` for their internal
calls, so "the referral service is down" is both referral instances stopped (the gateway has none
either). What must hold (API.md, "Data rights"):

- the old access token is refused (401) by every auth instance from the 204 on, and by every referral
  instance as soon as it is up again, and at once when it was up at the erasure;
- the referral service's part completes over the outbox once it is back (`auth.erasure_outbox`);
- nothing of the person is left in any column of either schema that can hold personal data (the
  classification of tests/integration/test_erasure.py, which fails on an unclassified column);
- the referrer's statistics still equal the recursive count of the trees, the leaderboard shows no
  address of the person, and the code's text is never issued again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg2
import pytest

from tests.e2e.api import (
    CODES,
    ME,
    MY_CODE,
    REFERRAL,
    Account,
    client,
    create_code,
    new_account,
    rfc3339,
)
from tests.e2e.conftest import Stack
from tests.e2e.faults import eventually
from tests.integration.test_erasure import columns_holding, counted_and_kept_levels, unclassified

LEADERBOARD = f"{REFERRAL}/leaderboard"
HITS = 6  # requests per check through the gateway: round-robin reaches both instances several times
OUTBOX_DELIVERED = 90.0  # seconds: the relay's backoff after an outage of some seconds, with margin


def stats_of(referrer_id: str) -> str:
    return f"{REFERRAL}/referrers/{referrer_id}/stats"


@pytest.fixture
def db(stack: Stack) -> Iterator[Any]:
    """A plain connection to the stack's database, for inspecting rows (autocommit: every read fresh)."""
    conn = psycopg2.connect(stack.database_url)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def _one(db: Any, sql: str, *params: Any) -> Any:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


async def _levels_of(gateway: aiohttp.ClientSession, account: Account) -> list[tuple[int, int, int]]:
    response = await gateway.get(stats_of(account.id), headers=account.headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    return [(level["level"], level["total"], level["confirmed"]) for level in body["levels"]]


async def _erase(gateway: aiohttp.ClientSession, account: Account) -> None:
    response = await gateway.delete(ME, json={"password": account.password}, headers=account.headers)
    assert response.status == 204, await response.text()


async def _statuses(session: aiohttp.ClientSession, urls: list[str], headers: dict[str, str]) -> list[int]:
    """The statuses of GETs of every URL, sent together (they reach different instances at once)."""
    responses = await asyncio.gather(*(session.get(url, headers=headers) for url in urls))
    return [response.status for response in responses]


async def _refused_everywhere(
    stack: Stack,
    gateway: aiohttp.ClientSession,
    account: Account,
    *,
    services: tuple[str, ...],
    control: Account,
) -> None:
    """The account's access token answers 401 on every instance of these services, directly and
    through the gateway (several times, so the round-robin reaches each instance), while the token of
    `control` (a live account with a code) is served there at the same moments: the instances are up
    and verify tokens, and refuse this subject's."""
    paths = {"auth": ME, "referral": MY_CODE}
    async with client() as direct:
        for service in services:
            instances = stack.auth_urls if service == "auth" else stack.referral_urls
            urls = [url + paths[service] for url in instances]
            refused, served = await asyncio.gather(
                _statuses(direct, urls, account.headers), _statuses(direct, urls, control.headers)
            )
            assert (refused, served) == ([401] * len(urls), [200] * len(urls)), service
            refused, served = await asyncio.gather(
                _statuses(gateway, [paths[service]] * HITS, account.headers),
                _statuses(gateway, [paths[service]] * HITS, control.headers),
            )
            assert (refused, served) == ([401] * HITS, [200] * HITS), service


def _start_stopped_referral_instances(stack: Stack) -> None:
    for index, process in enumerate(stack.referral):
        if not process.running:
            stack.start_referral(index)


@pytest.mark.timeout(240)
async def test_erasure_while_the_referral_service_is_down_completes_when_it_is_back(stack, gateway, db):
    # The tree, all through the gateway: top -> erased -> {below (confirmed) -> deep, pending}.
    top = await new_account(gateway, "top")
    top_code = (await create_code(gateway, top))["code"]
    erased = await new_account(gateway, "erased", referral_code=top_code)
    assert erased.referrer_id == top.id
    erased_code = (await create_code(gateway, erased, code=f"Gone{erased.id[:8]}"))["code"]
    below = await new_account(gateway, "below", referral_code=erased_code)
    pending = await new_account(gateway, "pending", referral_code=erased_code, verified=False)
    deep = await new_account(gateway, "deep", referral_code=(await create_code(gateway, below))["code"])
    assert below.referrer_id == pending.referrer_id == erased.id and deep.referrer_id == below.id
    expected = [(1, 1, 1), (2, 2, 1), (3, 1, 1)]  # (level, total, confirmed) as the top referrer sees it
    await eventually(
        lambda: _levels_matching(gateway, top, expected),
        seconds=30,
        what="every link delivered and confirmed",
    )
    assert await _levels_of(gateway, erased) == [(1, 2, 1), (2, 1, 1), (3, 0, 0)]

    for index in range(len(stack.referral)):
        stack.stop_referral(index)
    try:
        wrong = await gateway.delete(ME, json={"password": "not the password"}, headers=erased.headers)
        assert wrong.status == 403 and (await wrong.json())["code"] == "wrong_password"
        await _erase(gateway, erased)
        # The auth instances refuse the token from the 204 on; a repeat of the erasure too.
        await _refused_everywhere(stack, gateway, erased, services=("auth",), control=top)
        again = await gateway.delete(ME, json={"password": erased.password}, headers=erased.headers)
        assert again.status == 401, await again.text()
        # The referral service's part waits in the outbox (its instances are down).
        queued = _one(db, "SELECT id, delivered_at FROM auth.erasure_outbox WHERE user_id = %s", erased.id)
        assert queued is not None and queued[1] is None, queued
    finally:
        _start_stopped_referral_instances(stack)

    # Up again: both referral instances refuse the token at once (their mirror may still be loading:
    # then they ask Redis and their table).
    await _refused_everywhere(stack, gateway, erased, services=("referral", "auth"), control=top)

    def delivered() -> bool:
        row = _one(db, "SELECT delivered_at, failed_at FROM auth.erasure_outbox WHERE id = %s", queued[0])
        assert row is not None and row[1] is None, row
        return row[0] is not None

    await eventually(delivered, seconds=OUTBOX_DELIVERED, poll=0.2, what="the erasure delivered")

    # Nothing of the person in either schema, in any column that can hold personal data (the
    # classification is the integration test's: every column of both schemas is in it).
    assert unclassified(db) == {}
    assert columns_holding(db, [erased.id, erased.email]) == []

    # Statistics exact: the counters equal the recursive count of the trees, and the top referrer
    # keeps every level (the erased person's place stays, under a random id).
    counted, kept = counted_and_kept_levels(db)
    assert counted == kept
    assert await _levels_of(gateway, top) == expected
    top_counted = sorted(
        (level, total, confirmed) for who, level, total, confirmed in counted if who == top.id
    )
    assert top_counted == expected
    # The referrals below keep their referrer: the random id, which the referral service uses too.
    below_me = await gateway.get(ME, headers=below.headers)
    assert below_me.status == 200, await below_me.text()
    replacement = (await below_me.json())["referrer_id"]
    assert replacement not in (None, erased.id)
    assert _one(db, "SELECT count(*) FROM referral.referrals WHERE referrer_id = %s", replacement)[0] == 2

    # The leaderboard: the person's place is there (one confirmed referral), without an address.
    board = await gateway.get(LEADERBOARD, params={"period": "all", "limit": "100"})
    assert board.status == 200, await board.text()
    items = (await board.json())["items"]
    assert erased.id not in {item["referrer_id"] for item in items}
    place = [item for item in items if item["referrer_id"] == replacement]
    assert len(place) == 1 and place[0]["email"] is None and place[0]["confirmed"] == 1, place
    assert [item["email"] for item in items if item["referrer_id"] == top.id] == [
        f"{top.email[0]}***@example.com"
    ]

    # The code's text is never issued again, whatever its case.
    other = await new_account(gateway, "other")
    for text in (erased_code, erased_code.upper(), erased_code.lower()):
        taken = await gateway.post(
            CODES, json={"expires_at": rfc3339_in_a_day(), "code": text}, headers=other.headers
        )
        assert taken.status == 409, await taken.text()
        assert (await taken.json())["code"] == "code_taken"
    # The code is gone for the public lookup too.
    assert (await gateway.get(CODES, params={"email": erased.email})).status == 404


async def _levels_matching(
    gateway: aiohttp.ClientSession, account: Account, expected: list[tuple[int, int, int]]
) -> bool:
    return await _levels_of(gateway, account) == expected


def rfc3339_in_a_day() -> str:
    return rfc3339(datetime.now(UTC) + timedelta(days=1))


async def test_tokens_are_refused_at_once_by_both_services_when_the_referral_service_is_up(
    stack, gateway, db
):
    erased, control = await asyncio.gather(
        new_account(gateway, "gone-at-once"), new_account(gateway, "stays")
    )
    await create_code(gateway, erased)
    await create_code(gateway, control)
    # Served until the erasure, on every instance.
    async with client() as direct:
        assert await _statuses(direct, [url + MY_CODE for url in stack.referral_urls], erased.headers) == [
            200
        ] * len(stack.referral_urls)
    await _erase(gateway, erased)
    # Right after the 204, no waiting: every instance of both services refuses the token.
    await _refused_everywhere(stack, gateway, erased, services=("referral", "auth"), control=control)
    # The referral service's part was delivered by the erasure itself.
    # (a delivered row keeps no user id: none is left that names the person)
    assert _one(db, "SELECT count(*) FROM auth.erasure_outbox WHERE user_id = %s", erased.id)[0] == 0
    assert (await gateway.get(CODES, params={"email": erased.email})).status == 404
