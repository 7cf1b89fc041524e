"""The benchmark's dataset: users, their open codes and a million referrals, loaded with COPY.

`build` fills a database both services' migrations were applied to (and that holds no users, codes
or referrals yet) and returns what the load scripts need: which emails have a code, which do not,
the big referrers and a deep cursor into each one's list, users for tokens, logins and activations.

Layout (scale 1.0; every number scales):

- 100,000 users ``bench.user{n}@example.com``, all with the same password (one argon2id hash made
  with the auth service's default parameters), every address proven: verified in auth.users and
  recorded in referral.verified_users, as the auth service's notices leave them (so a code creation or
  an activation takes the usual path, whatever its token says). Users ``0 .. n/2-1`` are the
  "targets", the rest the "activators".
- one open code per user, expiring 3 to 6 months ahead, text generated like the service's own.
- 1,000,000 referrals whose ``referral_id`` is a synthetic uuid (not a user): 5 big referrers hold
  30k, 25k, 20k, 15k and 10k of them, the rest is spread unevenly (Pareto) over the other targets.
  Rows go in in ``created_at`` order (referrals arrive over the past year), so each referrer's rows
  are scattered over the table as in real life. Every link is confirmed (its referral stands for a
  user who proved the address long ago; such referrals are not rows of verified_users, which the
  service reads only when a link or a code is made for the user).

Activators are nobody's referral and nobody's referrer; activation codes are targets' codes. So an
activation (an activator links itself to a target's code) never closes a cycle nor meets a user who
already has a referrer, however the scenario combines them.

The load runs in one transaction: the tables are checked empty and locked, then TRUNCATEd so COPY
can FREEZE the rows (no hint-bit rewrite later, and an all-visible visibility map, as after
autovacuum: index-only scans work at once). Around each COPY the table's indexes are dropped and
rebuilt in bulk from the catalog's own definitions (pg_indexes, and pg_get_constraintdef for primary
keys and unique constraints, but those a foreign key points at), so the migrations stay their only
source. Triggers fire as they would for any COPY (referral.referrer_totals, total and confirmed, is
kept by a statement trigger). Then VACUUM (ANALYZE) of every table of both schemas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any

import psycopg2
from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type

from services.auth.settings import AuthSettings
from services.referral.api.cursor import encode_cursor
from services.referral.domain.codes import ALPHABET, LENGTH
from services.referral.domain.models import Cursor

USERS = 100_000  # at scale 1.0
REFERRALS = 1_000_000
BIG_REFERRER_SIZES = (30_000, 25_000, 20_000, 15_000, 10_000)
DEEP_REFERRER_MIN = 200  # the biggest referrer holds at least this many at any scale (S4's deep page)
DEEP_FRACTION = 0.9  # where the deep cursor points, in the newest-first list
CODE_EMAILS_MAX = 20_000
UNKNOWN_EMAILS_MAX = 10_000
TOKEN_USERS_MAX = 1_000
LOGIN_EMAILS_MAX = 1_000
ACTIVATION_CODES_MAX = 20_000
MIN_USERS = 100
PASSWORD = "bench correct horse battery"

_CHUNK_ROWS = 20_000
_COPY_READ = 1 << 18
_PROGRESS_ROWS = 1_000_000
_DAY_US = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CODE_CHARACTERS = re.compile(r"[A-Za-z0-9_-]+")  # codes_code_format: ^[A-Za-z0-9_-]{4,32}$
# uuid version 4, RFC 4122 variant, on a random 128-bit integer.
_UUID_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)
# The tables build() fills, in load order.
_USERS_TABLE = ("auth", "users")
_CODES_TABLE = ("referral", "codes")
_REFERRALS_TABLE = ("referral", "referrals")
_VERIFIED_TABLE = ("referral", "verified_users")
_TABLES = (_USERS_TABLE, _CODES_TABLE, _REFERRALS_TABLE, _VERIFIED_TABLE)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Names of the synthetic referrals and unknown emails (first.last123@example.org).
_FIRST = _words(
    "alice bob carol dave erin frank grace heidi ivan judy mallory nina oscar peggy quinn rupert "
    "sybil trent ursula victor wendy xavier yvonne zach amir bella chen dario elena farid gita hana "
    "ingrid jonas kofi lena mateo noor olga pavel rosa sven tariq"
)
_LAST = _words(
    "smith jones brown taylor wilson davies evans thomas johnson roberts walker wright robinson "
    "thompson white hughes edwards green hall wood harris martin jackson clarke lewis young allen "
    "king baker lee garcia silva novak kowalski mueller rossi dubois jensen tanaka kim nguyen"
)


@dataclass(frozen=True)
class Dataset:
    scale: float
    users: int  # rows in auth.users
    codes: int  # active codes in referral.codes (one per user)
    referrals: int  # rows in referral.referrals
    load_seconds: float  # wall time of the whole load incl. ANALYZE
    password: str  # every benchmark user's password (one argon2id hash, shared by all users)
    code_emails: list[str]  # emails (as stored) of users with an active code: a random sample (S1)
    unknown_emails: list[str]  # syntactically valid emails that no user has (S2)
    big_referrers: list[uuid.UUID]  # biggest first: 30k..10k referrals each at scale 1 (S3/S4)
    deep_cursors: dict[uuid.UUID, str]  # big referrer -> cursor of its row ~90% deep, newest first (S4)
    token_users: list[tuple[uuid.UUID, str]]  # (id, email) for access tokens (S3, S5)
    activators: list[tuple[uuid.UUID, str]]  # nobody's referral, codes never activated; use each once (S7)
    activation_codes: list[str]  # codes owned by users who are never activators (S7)
    login_emails: list[str]  # emails for password logins (S6, S8); may overlap token_users


@dataclass(frozen=True)
class _Plan:
    """The numbers of a load, decided before any row is written."""

    users: int
    referrals: int
    big_sizes: tuple[int, ...]
    spread_limit: int  # most referrals of a referrer that is not big

    @property
    def targets(self) -> int:
        return self.users // 2


def _plan(scale: float) -> _Plan:
    """Row counts at `scale`; ValueError when the scale is too small for the dataset's shape."""
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    users, referrals = round(USERS * scale), round(REFERRALS * scale)
    if users < MIN_USERS:
        raise ValueError(f"scale {scale} gives {users} users; at least {MIN_USERS} are needed")
    sizes = [max(1, round(size * scale)) for size in BIG_REFERRER_SIZES]
    sizes[0] = max(sizes[0], min(DEEP_REFERRER_MIN, referrals // 4))
    rest, others = referrals - sum(sizes), users // 2 - len(sizes)
    # Nobody else comes near the big referrers, unless the scale is too small for that to fit.
    limit = max(min(sizes) // 2, math.ceil(2 * rest / others))
    if rest < 0 or limit >= sizes[0]:
        raise ValueError(f"scale {scale} is too small for the big referrers to stand out")
    return _Plan(users, referrals, tuple(sizes), limit)


def build(
    database_url: str, *, scale: float = 1.0, seed: int = 7, log: Callable[[str], None] = print
) -> Dataset:
    """Fill a migrated, empty database with the benchmark's dataset: COPY in one transaction, then
    VACUUM (ANALYZE); what the load scripts need comes back (see the module's docstring)."""
    numbers = _plan(scale)
    rng = random.Random(seed)
    started = time.perf_counter()
    now_us = (datetime.now(UTC) - _EPOCH) // timedelta(microseconds=1)
    log(
        f"dataset: scale {scale}: {numbers.users:,} users and codes, {numbers.referrals:,} referrals"
        f" (big referrers: {', '.join(f'{size:,}' for size in numbers.big_sizes)})"
    )

    with contextlib.closing(psycopg2.connect(database_url, options="-c timezone=UTC")) as conn:
        with conn, conn.cursor() as cursor:
            tables = ", ".join(f"{schema}.{table}" for schema, table in _TABLES)
            present = _lock_empty(cursor, tables)  # before the work of making the rows
            password_hash = _password_hash(PASSWORD)
            user_ids = [_uuid_int(rng) for _ in range(numbers.users)]
            user_hex = [f"{value:032x}" for value in user_ids]
            emails = [user_email(n) for n in range(numbers.users)]
            codes = _codes(rng, numbers.users)
            targets = list(range(numbers.targets))
            big = rng.sample(targets, len(numbers.big_sizes))  # biggest first, like numbers.big_sizes
            referrer_of_row = _referrer_sequence(rng, numbers, big)
            log(f"dataset: rows planned in {time.perf_counter() - started:.1f}s")

            cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")  # the index rebuilds
            # The statement triggers of referral.referrals (counters, levels, leaderboard) join and
            # group the COPY's whole transition table, 10,000,000 rows at --scale 10, with the table
            # itself, unindexed while it loads: memory for those hashes and sorts (about 150 of the
            # 270 s a --scale 10 load takes here are those triggers).
            cursor.execute("SET LOCAL work_mem = '1GB'")
            # The tables are empty (checked above); truncated in this transaction, COPY can FREEZE.
            cursor.execute(f"TRUNCATE {tables} CASCADE")
            _load(
                cursor,
                _USERS_TABLE,
                ("id", "email", "password_hash", "created_at", "email_verified"),
                _user_rows(rng, user_hex, emails, password_hash, now_us),
                numbers.users,
                log,
            )
            _load(
                cursor,
                _CODES_TABLE,
                ("id", "code", "owner_id", "owner_email", "expires_at", "created_at"),
                _code_rows(rng, user_hex, emails, codes, now_us),
                numbers.users,
                log,
            )
            _load(
                cursor,
                _REFERRALS_TABLE,
                ("referral_id", "referrer_id", "referral_email", "code", "created_at", "status"),
                _referral_rows(rng, user_hex, codes, referrer_of_row, now_us, log),
                numbers.referrals,
                log,
            )
            _load(cursor, _VERIFIED_TABLE, ("user_id",), _verified_rows(user_hex), numbers.users, log)
            del user_hex, referrer_of_row
        conn.autocommit = True
        with conn.cursor() as cursor:
            analyzed = time.perf_counter()
            # Every table of both schemas: what triggers filled too (referral.referrer_totals).
            cursor.execute(f"VACUUM (ANALYZE) {', '.join(present)}")
            log(f"dataset: VACUUM (ANALYZE) in {time.perf_counter() - analyzed:.1f}s")
            big_ids = [uuid.UUID(int=user_ids[n]) for n in big]
            deep = {
                referrer: _deep_cursor(cursor, referrer, size)
                for referrer, size in zip(big_ids, numbers.big_sizes, strict=True)
            }

    load_seconds = time.perf_counter() - started
    log(f"dataset: loaded in {load_seconds:.1f}s")
    others = sorted(set(targets) - set(big))
    second_half = list(range(numbers.targets, numbers.users))
    activators = rng.sample(second_half, len(second_half))
    return Dataset(
        scale=scale,
        users=numbers.users,
        codes=numbers.users,
        referrals=numbers.referrals,
        load_seconds=load_seconds,
        password=PASSWORD,
        code_emails=[emails[n] for n in rng.sample(targets, min(CODE_EMAILS_MAX, len(targets)))],
        unknown_emails=_unknown_emails(min(UNKNOWN_EMAILS_MAX, numbers.users)),
        big_referrers=big_ids,
        deep_cursors=deep,
        token_users=[
            (uuid.UUID(int=user_ids[n]), emails[n])
            for n in rng.sample(targets, min(TOKEN_USERS_MAX, len(targets)))
        ],
        activators=[(uuid.UUID(int=user_ids[n]), emails[n]) for n in activators],
        activation_codes=[codes[n] for n in rng.sample(others, min(ACTIVATION_CODES_MAX, len(others)))],
        login_emails=[emails[n] for n in rng.sample(targets, min(LOGIN_EMAILS_MAX, len(targets)))],
    )


def user_email(n: int) -> str:
    """The email of the dataset's user number n (0 <= n < users); every user has an active code."""
    return f"bench.user{n}@example.com"


def _password_hash(password: str) -> str:
    """One argon2id hash with the auth service's default parameters (so logins never rehash)."""
    defaults: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(AuthSettings)}
    hasher = Argon2Hasher(
        time_cost=defaults["argon2_time_cost"],
        memory_cost=defaults["argon2_memory_kib"],
        parallelism=defaults["argon2_parallelism"],
        type=Type.ID,
    )
    return hasher.hash(password)


def _uuid_int(rng: random.Random) -> int:
    """A random version-4 uuid as an integer (uuid4() per row would be the load's bottleneck)."""
    return (rng.getrandbits(128) & _UUID_KEEP) | _UUID_SET


def _codes(rng: random.Random, count: int) -> list[str]:
    """`count` code texts like the service's (its alphabet and length), unique case-insensitively."""
    if not (_CODE_CHARACTERS.fullmatch(ALPHABET) and 4 <= LENGTH <= 32):
        raise ValueError("the service's code alphabet or length no longer fits codes_code_format")
    seen: set[str] = set()
    codes: list[str] = []
    choices, alphabet = rng.choices, ALPHABET
    while len(codes) < count:
        code = "".join(choices(alphabet, k=LENGTH))
        key = code.lower()
        if key not in seen:
            seen.add(key)
            codes.append(code)
    return codes


def _referrer_sequence(rng: random.Random, numbers: _Plan, big: list[int]) -> array[int]:
    """The referrer (a user index) of each referral row, in row order: exact counts, shuffled."""
    others = sorted(set(range(numbers.targets)) - set(big))
    rest = numbers.referrals - sum(numbers.big_sizes)
    weights = [rng.paretovariate(1.2) for _ in others]
    unit = rest / sum(weights)
    counts = [min(numbers.spread_limit, int(weight * unit)) for weight in weights]
    missing = rest - sum(counts)
    while missing > 0:  # hand the rounding (and what the limit cut) out one by one
        i = rng.randrange(len(counts))
        if counts[i] < numbers.spread_limit:
            counts[i] += 1
            missing -= 1
    sequence: array[int] = array("I")
    for user, count in [*zip(big, numbers.big_sizes, strict=True), *zip(others, counts, strict=True)]:
        sequence.extend(repeat(user, count))
    assert len(sequence) == numbers.referrals
    rng.shuffle(sequence)
    return sequence


def _timestamps() -> Callable[[int], str]:
    """A formatter of microseconds since the epoch as timestamptz text (UTC), faster than datetime."""
    days: dict[int, str] = {}

    def text(micros: int) -> str:
        day, rest = divmod(micros, _DAY_US)
        prefix = days.get(day)
        if prefix is None:
            prefix = days[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%d ")
        seconds, fraction = divmod(rest, 1_000_000)
        hours, seconds = divmod(seconds, 3600)
        minutes, seconds = divmod(seconds, 60)
        return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{fraction:06d}+00"

    return text


def _signup_times(now_us: int, users: int) -> tuple[int, int]:
    """(start, step): user n signed up in [start + n * step, start + (n + 1) * step), over two years."""
    return now_us - 730 * _DAY_US, 728 * _DAY_US // users


def _user_rows(
    rng: random.Random, ids: list[str], emails: list[str], password_hash: str, now_us: int
) -> Iterator[str]:
    """auth.users: signed up over the past two years, oldest first, each address verified."""
    stamp, rand = _timestamps(), rng.random
    start, step = _signup_times(now_us, len(ids))
    for begin in range(0, len(ids), _CHUNK_ROWS):
        yield "".join(
            f"{ids[n]}\t{emails[n]}\t{password_hash}\t{stamp(start + n * step + int(rand() * step))}\tt\n"
            for n in range(begin, min(begin + _CHUNK_ROWS, len(ids)))
        )


def _verified_rows(ids: list[str]) -> Iterator[str]:
    """referral.verified_users: every user (verified_at: the load's time)."""
    for begin in range(0, len(ids), _CHUNK_ROWS):
        yield "".join(f"{user}\n" for user in ids[begin : begin + _CHUNK_ROWS])


def _code_rows(
    rng: random.Random, ids: list[str], emails: list[str], codes: list[str], now_us: int
) -> Iterator[str]:
    """referral.codes: one open code per user, made after its owner signed up (up to a day ago),
    expiring in 3 to 6 months."""
    stamp, rand, getrandbits = _timestamps(), rng.random, rng.getrandbits
    start, step = _signup_times(now_us, len(ids))
    latest, expiry_span = now_us - _DAY_US, 90 * _DAY_US
    for begin in range(0, len(ids), _CHUNK_ROWS):
        yield "".join(
            f"{(getrandbits(128) & _UUID_KEEP) | _UUID_SET:032x}\t{codes[n]}\t{ids[n]}\t{emails[n]}"
            f"\t{stamp(now_us + expiry_span + int(rand() * expiry_span))}"
            f"\t{stamp(latest - int(rand() * (latest - start - (n + 1) * step)))}\n"
            for n in range(begin, min(begin + _CHUNK_ROWS, len(ids)))
        )


def _referral_rows(
    rng: random.Random,
    ids: list[str],
    codes: list[str],
    referrer_of_row: array[int],
    now_us: int,
    log: Callable[[str], None],
) -> Iterator[str]:
    """referral.referrals: synthetic referral users, in arrival order over the past year, confirmed."""
    stamp, rand, getrandbits = _timestamps(), rng.random, rng.getrandbits
    first, last = _FIRST, _LAST
    total = len(referrer_of_row)
    start, step = now_us - 365 * _DAY_US, (365 * _DAY_US - 60_000_000) // total
    started = time.perf_counter()
    for begin in range(0, total, _CHUNK_ROWS):
        end = min(begin + _CHUNK_ROWS, total)
        yield "".join(
            f"{(getrandbits(128) & _UUID_KEEP) | _UUID_SET:032x}\t{ids[r]}"
            f"\t{first[n % len(first)]}.{last[n // len(first) % len(last)]}{n}@example.org"
            f"\t{codes[r]}\t{stamp(start + n * step + int(rand() * step))}\tconfirmed\n"
            for n, r in zip(range(begin, end), referrer_of_row[begin:end], strict=True)
        )
        if end % _PROGRESS_ROWS < _CHUNK_ROWS and end < total:
            log(
                f"dataset:   referral.referrals {end:,}/{total:,} rows ({time.perf_counter() - started:.1f}s)"
            )


class _Stream:
    """A file whose read() hands COPY the text chunks of an iterator, encoded, as they are made."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        while self._offset >= len(self._buffer):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._buffer, self._offset = chunk.encode(), 0
        end = len(self._buffer) if size < 0 else self._offset + size
        data = self._buffer[self._offset : end]
        self._offset += len(data)
        return data


def _lock_empty(cursor: Any, to_load: str) -> list[str]:
    """Lock the tables to load (nobody writes any, nor a row pointing at a user, until the commit)
    and refuse a database with data: every table of schemas auth and referral (but yoyo's) is empty.
    Return those tables' names."""
    cursor.execute(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('auth', 'referral')"
        " AND tablename NOT LIKE '%%yoyo%%' ORDER BY 1, 2"
    )
    present = [(str(schema), str(table)) for schema, table in cursor.fetchall()]
    missing = [f"{schema}.{table}" for schema, table in _TABLES if (schema, table) not in present]
    if missing:
        raise RuntimeError(f"not migrated: {', '.join(missing)} missing; run both services' migrate first")
    cursor.execute(f"LOCK TABLE {to_load} IN ACCESS EXCLUSIVE MODE")
    for schema, table in present:
        cursor.execute(f'SELECT EXISTS (SELECT 1 FROM "{schema}"."{table}")')
        if cursor.fetchone()[0]:
            raise RuntimeError(f"{schema}.{table} is not empty; the dataset loads into an empty database")
    return [f'"{schema}"."{table}"' for schema, table in present]


def _drop_indexes(cursor: Any, schema: str, table: str) -> list[str]:
    """Drop the table's indexes; return the statements that make them again, read from the catalog:
    primary-key and unique constraints as pg_constraint defines them, other indexes as pg_indexes
    does. A constraint a foreign key points at (auth.users' primary key) stays."""
    qualified = f'"{schema}"."{table}"'
    cursor.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %s::regclass AND c.contype IN ('p', 'u') AND NOT EXISTS"
        " (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = c.conindid)"
        " ORDER BY c.conname",
        (qualified,),
    )
    constraints = [(str(name), str(definition)) for name, definition in cursor.fetchall()]
    cursor.execute(
        "SELECT indexname, indexdef FROM pg_indexes i WHERE schemaname = %s AND tablename = %s"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c"
        " WHERE c.conindid = format('%%I.%%I', i.schemaname, i.indexname)::regclass)"
        " ORDER BY indexname",
        (schema, table),
    )
    indexes = [(str(name), str(definition)) for name, definition in cursor.fetchall()]
    for name, _ in constraints:
        cursor.execute(f'ALTER TABLE {qualified} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        cursor.execute(f'DROP INDEX "{schema}"."{name}"')
    return [
        f'ALTER TABLE {qualified} ADD CONSTRAINT "{name}" {definition}' for name, definition in constraints
    ] + [definition for _, definition in indexes]


def _load(
    cursor: Any,
    table: tuple[str, str],
    columns: tuple[str, ...],
    rows: Iterator[str],
    expected: int,
    log: Callable[[str], None],
) -> None:
    """COPY the rows in (FREEZE: the table was truncated in this transaction), indexes built after."""
    schema, name = table
    started = time.perf_counter()
    rebuilds = _drop_indexes(cursor, schema, name)
    cursor.copy_expert(
        f'COPY "{schema}"."{name}" ({", ".join(columns)}) FROM STDIN WITH (FREEZE)',
        _Stream(rows),
        size=_COPY_READ,
    )
    if cursor.rowcount != expected:
        raise RuntimeError(f"{schema}.{name}: COPY wrote {cursor.rowcount} rows, {expected} expected")
    copied = time.perf_counter()
    for statement in rebuilds:
        cursor.execute(statement)
    log(
        f"dataset: {schema}.{name}: {expected:,} rows in {copied - started:.1f}s"
        f" + {len(rebuilds)} indexes rebuilt in {time.perf_counter() - copied:.1f}s"
    )


def _deep_cursor(cursor: Any, referrer: uuid.UUID, size: int) -> str:
    """The cursor of the referrer's row ~90% down its newest-first list (the service's order)."""
    cursor.execute(
        "SELECT created_at, referral_id FROM referral.referrals WHERE referrer_id = %s"
        " ORDER BY created_at DESC, referral_id DESC OFFSET %s LIMIT 1",
        (str(referrer), int(size * DEEP_FRACTION)),
    )
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError(f"referrer {referrer} has fewer referrals than loaded")
    created_at, referral_id = row
    return encode_cursor(Cursor(created_at, uuid.UUID(str(referral_id))))


def _unknown_emails(count: int) -> list[str]:
    """Realistic emails at a domain no benchmark user has (users are bench.user{n}@example.com)."""
    return [
        f"{_FIRST[n % len(_FIRST)]}.{_LAST[n // len(_FIRST) % len(_LAST)]}{n}@example.net"
        for n in range(count)
    ]
