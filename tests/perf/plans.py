"""Query plans of the benchmark's read scenarios, from the SQL the referral service really runs.

The statements are the service's own, imported by name from `services.referral.adapters.repositories`:
a `shared.db.Prepared` (what `prepare` compiled: SQL text and the defaults of its bind parameters)
or a plain SQL string, bound to values from the dataset as psycopg2 binds them for the service.
When the service's statements change (renamed, merged, split), edit `QUERIES` and `_values`: a
statement or a parameter that cannot be found raises, it is never skipped.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extras

from services.referral.adapters import repositories
from services.referral.api.cursor import decode_cursor
from shared.db import Prepared
from tests.perf.dataset import Dataset

PAGE_LIMIT = 21  # the API's default page (20) plus the one row that tells whether there is a next page


@dataclass(frozen=True)
class Query:
    """One plan to show: its key in explain()'s result, the repositories attribute, what it is."""

    key: str
    statement: str
    about: str
    ordered_by_index: bool = False  # a page: a bitmap scan or a bulk sort of referrals is flagged


QUERIES = (
    Query("S1", "_ACTIVE_BY_EMAIL", "the active code of a known email"),
    Query("S2", "_ACTIVE_BY_EMAIL", "the active code of an unknown email"),
    Query(
        "S3", "_FIRST_PAGE", f"the first page (limit {PAGE_LIMIT}) of a big referrer, with its total", True
    ),
    Query(
        "S4", "_NEXT_PAGE", "the page after a cursor ~90% deep in that referrer's list, with the total", True
    ),
    Query("S-STATS", "_STATS", "a big referrer's counts by level and active code (referrer_levels)"),
    Query("S-LEADERBOARD", "_LEADERBOARD", "the month's first 10 referrers (leaderboard_ranked)"),
)

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_SEQ_SCAN = re.compile(r"\bSeq Scan on (?:referral\.)?(codes|referrals)\b")
# In a page's plan: the referrer's rows read unordered, or more rows sorted than the page holds (a
# Sort of the page's own rows, by the outer ORDER BY, is cheap and fine).
_UNORDERED = re.compile(r"\bBitmap Heap Scan on (?:referral\.)?referrals\b|Sort Method: (?:top-N|external)")


def _values(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """The parameters each query may bind, by key (a statement takes the ones its SQL names)."""
    if not (dataset.code_emails and dataset.unknown_emails and dataset.big_referrers):
        raise ValueError("the dataset has no code emails, unknown emails or big referrers")
    referrer = dataset.big_referrers[0]
    after = decode_cursor(dataset.deep_cursors[referrer])
    return {
        # The repository lowercases the email before it binds it.
        "S1": {"email": dataset.code_emails[0].lower()},
        "S2": {"email": dataset.unknown_emails[0].lower()},
        "S3": {"referrer_id": referrer, "limit": PAGE_LIMIT},
        "S-STATS": {"referrer_id": referrer, "depth": 3},
        "S-LEADERBOARD": {"period": "month", "limit": 10},
        "S4": {
            "referrer_id": referrer,
            "limit": PAGE_LIMIT,
            "after_created_at": after.created_at,
            "after_referral_id": after.referral_id,
        },
    }


def statement(name: str) -> tuple[str, Mapping[str, Any]]:
    """(SQL, parameter defaults) of a repositories statement; LookupError when there is none."""
    found = getattr(repositories, name, None)
    if isinstance(found, Prepared):
        return found.sql, found.defaults
    if isinstance(found, str):
        return found, {}
    raise LookupError(
        f"services.referral.adapters.repositories has no statement {name!r} (found {type(found).__name__});"
        " update QUERIES in tests/perf/plans.py"
    )


def bind(name: str, sql: str, defaults: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter the SQL names: from `values`, else its compiled default; LookupError if neither."""
    bound: dict[str, Any] = {}
    for parameter in sorted(set(_PLACEHOLDER.findall(sql))):
        if parameter in values:
            bound[parameter] = values[parameter]
        elif defaults.get(parameter) is not None:
            bound[parameter] = defaults[parameter]
        else:
            raise LookupError(
                f"{name} takes %({parameter})s and nothing gives it a value; update _values in"
                " tests/perf/plans.py"
            )
    return bound


def explain(database_url: str, dataset: Dataset) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of each query in QUERIES, by key; each runs once before, warm."""
    values = _values(dataset)
    prepared = {query.key: (query, *statement(query.statement)) for query in QUERIES}  # all, or raise
    psycopg2.extras.register_uuid()  # uuid.UUID parameters, as the service binds them
    plans: dict[str, str] = {}
    # The services' connection options (shared/db.py): UTC, and no JIT compilation.
    with contextlib.closing(psycopg2.connect(database_url, options="-c timezone=UTC -c jit=off")) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            for key, (query, sql, defaults) in prepared.items():
                params = bind(query.statement, sql, defaults, values[key])
                cursor.execute(sql, params)
                cursor.fetchall()
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plans[key] = "\n".join(str(row[0]) for row in cursor.fetchall())
    return plans


def plan_warnings(plans: Mapping[str, str]) -> list[str]:
    """What in the plans says an index is not used: a Seq Scan on codes or referrals; for a page,
    the referrer's rows read unordered (bitmap) or sorted in bulk instead of read in index order."""
    pages = {query.key for query in QUERIES if query.ordered_by_index}
    warnings: list[str] = []
    for key, text in plans.items():
        for line in text.splitlines():
            node = line.strip()
            scan = _SEQ_SCAN.search(node)
            if scan:
                warnings.append(f"{key}: sequential scan of referral.{scan.group(1)}: {node}")
            elif key in pages and _UNORDERED.search(node):
                warnings.append(f"{key}: the page is not read in the index's order: {node}")
    return warnings
