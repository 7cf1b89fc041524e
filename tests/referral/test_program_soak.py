"""The program's counters are exact: after concurrent links and confirmations across multi-level trees
(subtrees linked under other trees included), and multi-row deletes and inserts, they equal a recursive
count over the links, and what the endpoints answer equals them."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tests.referral.test_program import LEADERBOARD, stats_path, user_token

USERS = 200
DEPTH = 5

_RECURSIVE_LEVELS = """
WITH RECURSIVE up(status, ancestor, distance) AS (
    SELECT status, referrer_id, 1 FROM referral.referrals
    UNION ALL
    SELECT up.status, r.referrer_id, up.distance + 1
    FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
    WHERE up.distance < 5
)
SELECT ancestor::text, distance, count(*), count(*) FILTER (WHERE status = 'confirmed') FROM up GROUP BY 1, 2
"""


def _forest(rng: random.Random, ids: list[str]) -> dict[str, str]:
    """referral -> referrer: each user but the roots picks one among those before it (no cycle), often
    one just before it (deep chains), else anyone (wide trees)."""
    parent: dict[str, str] = {}
    for i in range(1, len(ids)):
        if rng.random() < 0.1:
            continue  # a root
        j = rng.randrange(max(0, i - 4), i) if rng.random() < 0.6 else rng.randrange(i)
        parent[ids[i]] = ids[j]
    return parent


async def _retrying(call: Any) -> Any:
    """A link refused with 503 (its tree kept changing under it) is tried again, as a client would."""
    for _ in range(50):
        response = await call()
        if response.status != 503:
            return response
        await asyncio.sleep(0.01)
    raise AssertionError("still 503 after 50 attempts")


def _period_starts(at: datetime) -> list[tuple[str, date]]:
    day = at.astimezone(UTC).date()
    return [
        ("week", day - timedelta(days=day.weekday())),
        ("month", day.replace(day=1)),
        ("all", date(1970, 1, 1)),
    ]


def _expected_counts(
    db: Any,
) -> tuple[set[tuple[str, int, int, int]], set[tuple[str, date, str, int, datetime]]]:
    with db.cursor() as cursor:
        cursor.execute(_RECURSIVE_LEVELS)
        levels = {
            (a, int(level), int(total), int(confirmed)) for a, level, total, confirmed in cursor.fetchall()
        }
        cursor.execute(
            "SELECT referrer_id::text, confirmed_at FROM referral.referrals WHERE status = 'confirmed'"
        )
        board: dict[tuple[str, date, str], list[datetime]] = {}
        for referrer, at in cursor.fetchall():
            for period, start in _period_starts(at):
                board.setdefault((period, start, referrer), []).append(at)
    return levels, {(*key, len(times), min(times)) for key, times in board.items()}


def _kept_counts(db: Any) -> tuple[set[tuple[str, int, int, int]], set[tuple[str, date, str, int, datetime]]]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT referrer_id::text, level, total, confirmed FROM referral.referrer_levels WHERE total > 0"
        )
        levels = {
            (a, int(level), int(total), int(confirmed)) for a, level, total, confirmed in cursor.fetchall()
        }
        cursor.execute(
            "SELECT period, period_start, referrer_id::text, confirmed, first_at"
            " FROM referral.leaderboard_counts"
        )
        board = {(p, s, r, int(n), at) for p, s, r, n, at in cursor.fetchall()}
    return levels, board


async def test_counters_equal_a_recursive_count_after_a_concurrent_soak(make_system, db):
    system = await make_system(stats_depth=DEPTH)
    rng = random.Random(13)
    ids = [str(uuid.uuid4()) for _ in range(USERS)]
    parent = _forest(rng, ids)
    verified = {user for user in ids if rng.random() < 0.6}

    def link(referral: str) -> Any:
        return lambda: system.signup_link(referral, parent[referral], f"{referral[:8]}@example.org")

    def confirm(user: str) -> Any:
        return lambda: system.notify_verified(user)

    calls = [link(referral) for referral in parent] + [confirm(user) for user in verified]
    rng.shuffle(calls)  # children before parents, notices before and after links: every order
    gate = asyncio.Semaphore(16)

    async def run(call: Any) -> None:
        async with gate:
            response = await _retrying(call)
            assert response.status in (201, 204), await response.text()

    await asyncio.gather(*(run(call) for call in calls))

    expected = _expected_counts(db)
    assert expected[0], "the soak made no links"
    assert max(level for _, level, _, _ in expected[0]) == DEPTH, "the trees are not deep enough"
    kept = _kept_counts(db)
    assert kept[0] - expected[0] == set(), expected[0] - kept[0]
    assert kept[1] - expected[1] == set(), expected[1] - kept[1]

    # What the endpoints answer: every referrer's stats, and the whole leaderboard of each period.
    by_referrer: dict[str, dict[int, tuple[int, int]]] = {}
    for referrer, level, total, confirmed in expected[0]:
        by_referrer.setdefault(referrer, {})[level] = (total, confirmed)
    for referrer, levels in by_referrer.items():
        response = await system.referral.get(stats_path(referrer), headers=user_token(system, referrer))
        body = await response.json()
        assert [(item["total"], item["confirmed"]) for item in body["levels"]] == [
            levels.get(level, (0, 0)) for level in range(1, DEPTH + 1)
        ]
    today = _period_starts(datetime.now(UTC))
    for period, start in today:
        ranked = sorted(
            ((-n, first, r) for p, s, r, n, first in expected[1] if (p, s) == (period, start)),
        )[:100]
        body = await (await system.referral.get(LEADERBOARD, params={"period": period, "limit": 100})).json()
        assert [(item["referrer_id"], item["confirmed"]) for item in body["items"]] == [
            (r, -n) for n, _, r in ranked
        ]
        assert [item["rank"] for item in body["items"]] == list(range(1, len(ranked) + 1))

    # Multi-row statements: a quarter of the links deleted in one, then put back in one (in a random
    # row order), and some confirmations moved to other periods in one.
    gone = rng.sample(sorted(parent), len(parent) // 4)
    with db.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE gone AS SELECT * FROM referral.referrals WHERE referral_id::text = ANY(%s)",
            (gone,),
        )
        cursor.execute("DELETE FROM referral.referrals WHERE referral_id::text = ANY(%s)", (gone,))
    assert _kept_counts(db) == _expected_counts(db)
    with db.cursor() as cursor:
        cursor.execute("INSERT INTO referral.referrals SELECT * FROM gone ORDER BY random()")
        cursor.execute(
            "UPDATE referral.referrals SET confirmed_at = confirmed_at - interval '40 days'"
            " WHERE status = 'confirmed' AND referral_id::text = ANY(%s)",
            (gone,),
        )
    assert _kept_counts(db) == _expected_counts(db)
    # Links given other referrers in place, in one statement (new ones: no cycle), and some turned
    # back to pending (the service never does either; the counters follow anyway).
    moved = rng.sample(sorted(parent), len(parent) // 5)
    newcomers = [str(uuid.uuid4()) for _ in range(3)]
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE referral.referrals"
            " SET referrer_id = (%s::uuid[])[1 + abs(hashtext(referral_id::text)) %% 3]"
            " WHERE referral_id::text = ANY(%s)",
            (newcomers, moved),
        )
        cursor.execute(
            "UPDATE referral.referrals SET status = 'pending' WHERE referral_id::text = ANY(%s)",
            (rng.sample(sorted(parent), len(parent) // 5),),
        )
    assert _kept_counts(db) == _expected_counts(db)
    assert Counter(r for _, _, r, _, _ in _kept_counts(db)[1])  # the leaderboard is not empty
