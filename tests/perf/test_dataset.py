"""The benchmark's dataset loader and query plans, on a tiny dataset in a database of its own."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from services.auth.adapters.passwords import PasswordHasher
from services.auth.settings import AuthSettings
from services.referral.adapters import repositories
from services.referral.api.cursor import decode_cursor
from shared.db import Prepared
from shared.schemas import TrimmedEmail
from tests import harness
from tests.helpers import fresh_database
from tests.perf.dataset import DEEP_REFERRER_MIN, Dataset, build
from tests.perf.plans import QUERIES, explain, plan_warnings

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.002  # 200 users, 2,000 referrals
CODE_FORMAT = re.compile(r"[A-Za-z0-9_-]{4,32}")


@dataclass(frozen=True)
class Loaded:
    url: str
    dataset: Dataset
    log: list[str]
    indexes_before: list[tuple[str, ...]]  # as the migrations made them, before the load


INDEXES = (
    "SELECT i.schemaname, i.tablename, i.indexname, i.indexdef, coalesce(pg_get_constraintdef(c.oid), '')"
    " FROM pg_indexes i LEFT JOIN pg_constraint c"
    " ON c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass AND c.contype IN ('p', 'u')"
    " WHERE i.schemaname IN ('auth', 'referral') ORDER BY 1, 2, 3"
)


ARTIFACTS = ROOT / ".artifacts" / "perf-tests"


def indexes(url: str) -> list[tuple[str, ...]]:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cursor:
        cursor.execute(INDEXES)
        return [tuple(str(value) for value in row) for row in cursor.fetchall()]


def migrate(url: str) -> None:
    """Both services' migrations, through their own CLI (as `make migrate` does)."""
    harness.migrate(url, os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), ARTIFACTS)


@pytest.fixture(scope="module")
def loaded(server_database_url: str) -> Iterator[Loaded]:
    with fresh_database(server_database_url, f"perf_{os.getpid()}") as url:
        migrate(url)
        before = indexes(url)
        lines: list[str] = []
        yield Loaded(url, build(url, scale=SCALE, log=lines.append), lines, before)


@pytest.fixture
def cur(loaded: Loaded) -> Iterator[Any]:
    """A cursor on the loaded database (autocommit)."""
    with contextlib.closing(psycopg2.connect(loaded.url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            yield cursor


def scalar(cursor: Any, sql: str, params: Any = None) -> Any:
    cursor.execute(sql, params)
    return cursor.fetchone()[0]


def test_counts_are_as_reported(loaded: Loaded, cur: Any) -> None:
    dataset = loaded.dataset
    assert (dataset.scale, dataset.users, dataset.codes, dataset.referrals) == (SCALE, 200, 200, 2000)
    assert scalar(cur, "SELECT count(*) FROM auth.users") == dataset.users
    active = "SELECT count(*) FROM referral.codes WHERE deleted_at IS NULL AND expires_at > now() + '80 days'"
    assert scalar(cur, active) == dataset.codes
    assert scalar(cur, "SELECT count(*) FROM referral.codes") == dataset.codes
    assert scalar(cur, "SELECT count(*) FROM referral.referrals") == dataset.referrals
    assert scalar(cur, "SELECT count(*) FROM referral.verified_users") == dataset.users
    assert scalar(cur, "SELECT count(*) FROM auth.refresh_tokens") == 0
    assert dataset.load_seconds > 0
    assert any("referral.referrals: 2,000 rows" in line for line in loaded.log), loaded.log


def test_the_indexes_are_rebuilt_exactly_as_the_migrations_made_them(loaded: Loaded) -> None:
    after = indexes(loaded.url)
    assert after == loaded.indexes_before
    names = {row[2] for row in after}
    assert {"referrals_pkey", "referrals_by_referrer", "codes_pkey", "codes_open_by_email"} <= names
    assert {
        "users_pkey",
        "users_email_lower_key",
        "codes_code_lower_key",
        "codes_one_open_per_owner",
    } <= names


def test_every_user_has_exactly_one_open_code_under_their_email(cur: Any) -> None:
    assert (
        scalar(
            cur,
            "SELECT count(*) FROM auth.users u WHERE (SELECT count(*) FROM referral.codes c"
            " WHERE c.owner_id = u.id AND c.owner_email = u.email AND c.deleted_at IS NULL) <> 1",
        )
        == 0
    )
    assert (
        scalar(cur, "SELECT count(*) FROM referral.codes WHERE created_at >= now() - '1 day'::interval") == 0
    )
    # Each code was made after its owner signed up.
    assert (
        scalar(
            cur,
            "SELECT count(*) FROM referral.codes c JOIN auth.users u ON u.id = c.owner_id"
            " WHERE c.created_at < u.created_at",
        )
        == 0
    )


def test_code_texts_are_unique_case_insensitively_and_well_formed(cur: Any) -> None:
    cur.execute("SELECT code FROM referral.codes")
    codes = [row[0] for row in cur.fetchall()]
    assert len({code.lower() for code in codes}) == len(codes) == 200
    assert all(CODE_FORMAT.fullmatch(code) for code in codes)


async def test_users_share_one_hash_of_the_password_with_the_services_default_parameters(
    loaded: Loaded, cur: Any
) -> None:
    cur.execute("SELECT DISTINCT password_hash FROM auth.users")
    (password_hash,) = (row[0] for row in cur.fetchall())
    assert password_hash.startswith("$argon2id$")
    defaults: dict[str, Any] = {field.name: field.default for field in fields(AuthSettings)}
    with ThreadPoolExecutor(1) as executor:
        hasher = PasswordHasher(
            executor,
            time_cost=defaults["argon2_time_cost"],
            memory_kib=defaults["argon2_memory_kib"],
            parallelism=defaults["argon2_parallelism"],
        )
        assert not hasher.needs_rehash(password_hash)
        assert await hasher.verify(password_hash, loaded.dataset.password)


def test_the_biggest_referrer_has_the_most_referrals(loaded: Loaded, cur: Any) -> None:
    dataset = loaded.dataset
    cur.execute(
        "SELECT referrer_id, count(*) FROM referral.referrals GROUP BY referrer_id ORDER BY 2 DESC LIMIT 2"
    )
    (top, most), (_, second) = cur.fetchall()
    assert str(top) == str(dataset.big_referrers[0])
    assert most >= DEEP_REFERRER_MIN and most > second
    assert len(set(dataset.big_referrers)) == len(dataset.big_referrers) == 5
    # Referrals are not users, and every referral carries its referrer's code.
    assert (
        scalar(cur, "SELECT count(*) FROM referral.referrals r JOIN auth.users u ON u.id = r.referral_id")
        == 0
    )
    assert (
        scalar(
            cur,
            "SELECT count(*) FROM referral.referrals r JOIN referral.codes c ON c.owner_id = r.referrer_id"
            " WHERE c.code <> r.code",
        )
        == 0
    )


def test_the_referrers_totals_kept_by_the_database_match(cur: Any) -> None:
    cur.execute(
        "SELECT count(*) FILTER (WHERE (t.total, t.confirmed) IS DISTINCT FROM (r.total, r.confirmed)),"
        " count(*)"
        " FROM (SELECT referrer_id, count(*) AS total, count(*) FILTER (WHERE status = 'confirmed')"
        "       AS confirmed FROM referral.referrals GROUP BY referrer_id) r"
        " FULL JOIN referral.referrer_totals t USING (referrer_id)"
    )
    wrong, referrers = cur.fetchone()
    assert wrong == 0 and referrers > 5


def test_the_levels_and_the_leaderboard_kept_by_the_database_match(cur: Any) -> None:
    """What the statement triggers made of the COPY (one statement, every row)."""
    cur.execute(
        "SELECT count(*) FILTER (WHERE (l.total, l.confirmed) IS DISTINCT FROM (r.total, r.confirmed)),"
        " count(*)"
        " FROM (SELECT referrer_id, count(*) AS total, count(*) FILTER (WHERE status = 'confirmed')"
        "       AS confirmed FROM referral.referrals GROUP BY referrer_id) r"
        " FULL JOIN (SELECT * FROM referral.referrer_levels WHERE level = 1) l USING (referrer_id)"
    )
    wrong, referrers = cur.fetchone()
    assert wrong == 0 and referrers > 5
    cur.execute("SELECT count(*) FROM referral.referrer_levels WHERE level > 1")
    assert cur.fetchone()[0] == 0  # the referrals are nobody's referrers: no deeper level
    cur.execute(
        "SELECT count(*) FILTER (WHERE (b.confirmed, b.first_at) IS DISTINCT FROM (r.confirmed, r.first_at)),"
        " count(*)"
        " FROM (SELECT referrer_id, count(*) AS confirmed, min(confirmed_at) AS first_at"
        "       FROM referral.referrals WHERE status = 'confirmed' GROUP BY referrer_id) r"
        " FULL JOIN (SELECT * FROM referral.leaderboard_counts WHERE period = 'all') b USING (referrer_id)"
    )
    wrong, referrers = cur.fetchone()
    assert wrong == 0 and referrers > 5


def test_every_user_is_proven_and_every_link_confirmed(cur: Any) -> None:
    """The benchmark measures the usual path: proven users (auth says so, and so do the notices the
    referral service keeps), confirmed links."""
    assert scalar(cur, "SELECT count(*) FROM auth.users WHERE NOT email_verified") == 0
    assert (
        scalar(
            cur,
            "SELECT count(*) FROM auth.users u FULL JOIN referral.verified_users v ON v.user_id = u.id"
            " WHERE u.id IS NULL OR v.user_id IS NULL",
        )
        == 0
    )
    assert scalar(cur, "SELECT count(*) FROM referral.referrals WHERE status <> 'confirmed'") == 0
    assert scalar(cur, "SELECT count(*) FROM referral.referrer_totals WHERE confirmed <> total") == 0


def test_deep_cursors_decode_and_their_next_page_is_not_empty(loaded: Loaded, cur: Any) -> None:
    dataset = loaded.dataset
    assert set(dataset.deep_cursors) == set(dataset.big_referrers)
    for referrer, encoded in dataset.deep_cursors.items():
        after = decode_cursor(encoded)
        cur.execute(
            "SELECT count(*) FILTER (WHERE (created_at, referral_id) < (%s, %s::uuid)), count(*)"
            " FROM referral.referrals WHERE referrer_id = %s::uuid",
            (after.created_at, str(after.referral_id), str(referrer)),
        )
        later, total = cur.fetchone()
        assert later > 0
        assert abs((total - later) - 0.9 * total) <= 2, (referrer, later, total)
        row = "SELECT referrer_id FROM referral.referrals WHERE referral_id = %s::uuid"
        assert str(scalar(cur, row, (str(after.referral_id),))) == str(referrer)


def test_activators_are_nobodys_referral_and_their_codes_are_never_activation_codes(
    loaded: Loaded, cur: Any
) -> None:
    dataset = loaded.dataset
    ids = [str(user_id) for user_id, _ in dataset.activators]
    assert dataset.activators and len(set(ids)) == len(ids)
    cur.execute("SELECT count(*) FROM auth.users WHERE id = ANY(%s::uuid[]) AND referrer_id IS NULL", (ids,))
    assert cur.fetchone()[0] == len(ids)
    linked = "SELECT count(*) FROM referral.referrals WHERE referral_id = ANY(%s::uuid[])"
    assert scalar(cur, linked, (ids,)) == 0
    cur.execute("SELECT code FROM referral.codes WHERE owner_id = ANY(%s::uuid[])", (ids,))
    activator_codes = {row[0] for row in cur.fetchall()}
    assert len(activator_codes) == len(ids)
    assert not activator_codes & set(dataset.activation_codes)
    assert dataset.activation_codes
    # Activation codes are active codes of users who are nobody's referral either: no cycle possible.
    cur.execute(
        "SELECT count(*) FROM referral.codes c WHERE lower(c.code) = ANY(%s) AND c.deleted_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM referral.referrals r WHERE r.referral_id = c.owner_id)",
        ([code.lower() for code in dataset.activation_codes],),
    )
    assert cur.fetchone()[0] == len(set(dataset.activation_codes)) == len(dataset.activation_codes)


def test_emails_for_the_scenarios(loaded: Loaded, cur: Any) -> None:
    dataset = loaded.dataset
    email = TrimmedEmail()
    assert dataset.unknown_emails and len(set(dataset.unknown_emails)) == len(dataset.unknown_emails)
    assert all(email.deserialize(address) == address for address in dataset.unknown_emails)
    unknown = [address.lower() for address in dataset.unknown_emails]
    assert scalar(cur, "SELECT count(*) FROM auth.users WHERE lower(email) = ANY(%s)", (unknown,)) == 0
    assert (
        scalar(cur, "SELECT count(*) FROM referral.codes WHERE lower(owner_email) = ANY(%s)", (unknown,)) == 0
    )
    for known in (dataset.code_emails, dataset.login_emails, [e for _, e in dataset.token_users]):
        assert known and len(set(known)) == len(known)
        cur.execute(
            "SELECT count(*) FROM auth.users u JOIN referral.codes c ON c.owner_id = u.id"
            " WHERE u.email = ANY(%s) AND c.deleted_at IS NULL",
            (known,),
        )
        assert cur.fetchone()[0] == len(known)
    cur.execute("SELECT id::text, email FROM auth.users")
    users = dict(cur.fetchall())
    assert all(users[str(user_id)] == address for user_id, address in dataset.token_users)


def test_the_plans_use_the_referrals_index(loaded: Loaded) -> None:
    plans = explain(loaded.url, loaded.dataset)
    assert list(plans) == [query.key for query in QUERIES]
    assert list(plans) == ["S1", "S2", "S3", "S4", "S-STATS", "S-LEADERBOARD"]
    for key, text in plans.items():
        assert "actual time=" in text and "Buffers:" in text, (key, text)
    for key in ("S3", "S4"):
        assert re.search(r"Index (Only )?Scan (using|on) referrals_by_referrer", plans[key]), plans[key]
    assert not [warning for warning in plan_warnings(plans) if "Seq Scan on referrals" in warning], plans
    assert "rows=1 loops=1" in plans["S1"].splitlines()[0]  # a known email has a code
    assert "rows=0 loops=1" in plans["S2"].splitlines()[0]  # an unknown one has none


def test_plan_warnings_name_sequential_scans_and_unordered_pages() -> None:
    plans = {
        "S1": "Limit\n  ->  Seq Scan on codes  (cost=0.00..7.00 rows=1 width=93)",
        "S2": "Limit\n  ->  Sort  (cost=1..2 rows=1)\n        Sort Method: top-N heapsort  Memory: 25kB",
        "S3": "\n".join(
            [
                "Sort  (cost=1..2 rows=21)",
                "  Sort Key: created_at DESC",
                "  Sort Method: quicksort  Memory: 27kB",
                "  ->  Limit",
                "        ->  Parallel Seq Scan on referrals  (cost=0.00..9.00 rows=9)",
            ]
        ),
        "S4": "\n".join(
            [
                "Limit",
                "  ->  Sort  (cost=1..2 rows=21)",
                "        Sort Method: top-N heapsort  Memory: 27kB",
                "        ->  Bitmap Heap Scan on referrals  (cost=4.48..31.90 rows=20 width=79)",
            ]
        ),
    }
    warnings = plan_warnings(plans)
    assert len(warnings) == 4, warnings
    assert warnings[0].startswith("S1: sequential scan of referral.codes")
    assert warnings[1].startswith("S3: sequential scan of referral.referrals")
    assert (
        warnings[2]
        == "S4: the page is not read in the index's order: Sort Method: top-N heapsort  Memory: 27kB"
    )
    assert warnings[3].startswith("S4: the page is not read in the index's order")
    assert "Bitmap Heap Scan on referrals" in warnings[3]
    # A page read in index order, then sorted (its own 21 rows, by the outer ORDER BY): no warning.
    fine = "Sort  (cost=1..2 rows=21)\n  Sort Method: quicksort  Memory: 27kB\n  ->  Limit\n" + (
        "        ->  Index Scan using referrals_by_referrer on referrals"
    )
    assert plan_warnings({"S3": fine, "S4": fine}) == []


def test_a_missing_statement_or_parameter_fails_loudly(
    loaded: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = QUERIES[-1].statement
    monkeypatch.delattr(repositories, last)
    with pytest.raises(LookupError, match=last):
        explain(loaded.url, loaded.dataset)
    monkeypatch.undo()
    unbound = Prepared("SELECT %(page_size)s", {"page_size": None})
    monkeypatch.setattr(repositories, QUERIES[0].statement, unbound)
    with pytest.raises(LookupError, match="page_size"):
        explain(loaded.url, loaded.dataset)


def test_the_loader_refuses_a_loaded_database_or_a_tiny_scale(loaded: Loaded) -> None:
    with pytest.raises(RuntimeError, match="not empty"):
        build(loaded.url, scale=SCALE, log=lambda _: None)
    with pytest.raises(ValueError, match="at least"):
        build(loaded.url, scale=0.0005, log=lambda _: None)
