"""shared.db against the real test database, in a schema of this module's own."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import bindparam

from shared.db import (
    CheckViolation,
    Connection,
    Database,
    DatabaseUnavailable,
    ForeignKeyViolation,
    UniqueViolation,
    create_database,
    prepare,
    prepare_sql,
)

SCHEMA = f"test_db_{secrets.token_hex(4)}"

meta = sa.MetaData(schema=SCHEMA)
parents = sa.Table(
    "parents",
    meta,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("score", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("data", sa.dialects.postgresql.JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("name", name="parents_name_key"),
    sa.CheckConstraint("score >= 0", name="parents_score_positive"),
)
children = sa.Table(
    "children",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("parent_id", sa.Uuid, sa.ForeignKey(parents.c.id, name="children_parent_fk"), nullable=False),
)

INSERT_PARENT = prepare(
    sa.insert(parents)
    .values(id=bindparam("id"), name=bindparam("name"), score=bindparam("score", 0))
    .returning(parents.c.id, parents.c.name, parents.c.score)
)
PARENT_BY_NAME = prepare(sa.select(parents.c.id, parents.c.score).where(parents.c.name == bindparam("name")))
# `name` twice (one $1 when prepared), `bonus` with a default.
PARENTS_LIKE = prepare(
    sa.select(parents.c.name, (parents.c.score + bindparam("bonus", 10)).label("boosted"))
    .where(sa.or_(parents.c.name == bindparam("name"), parents.c.name == sa.func.upper(bindparam("name"))))
    .order_by(parents.c.name)
)


@pytest.fixture(scope="module")
def schema(database_url: str) -> Iterator[str]:
    engine = sa.create_engine(
        database_url.replace("postgresql://", "postgresql+psycopg2://", 1), poolclass=sa.NullPool
    )
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{SCHEMA}"'))
            meta.create_all(conn)
        yield SCHEMA
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))
        engine.dispose()


@pytest.fixture
def empty_tables(database_url: str, schema: str) -> str:
    # Emptied over a plain connection that may wait for locks: a statement an earlier test gave up on
    # can still hold some for a moment.
    with contextlib.closing(psycopg2.connect(database_url)) as admin, admin.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")
        cursor.execute(f'TRUNCATE "{schema}".children, "{schema}".parents')
        admin.commit()
    return schema


@pytest.fixture
async def database(database_url: str, empty_tables: str) -> AsyncIterator[Database]:
    db = await create_database(database_url, minsize=1, maxsize=3, timeout=0.5)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def unprepared_database(database_url: str, empty_tables: str) -> AsyncIterator[Database]:
    """A pool that runs `Prepared` statements as plain SQL (as behind a transaction-mode pooler)."""
    db = await create_database(database_url, minsize=1, maxsize=3, timeout=0.5, server_prepare=False)
    try:
        yield db
    finally:
        await db.close()


async def add_parent(db: Database, name: str, score: int = 0) -> uuid.UUID:
    row = await db.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": name, "score": score})
    assert row is not None
    return row["id"]  # type: ignore[no-any-return]


async def names(db: Database) -> list[str]:
    rows = await db.fetch_all(sa.select(parents.c.name).order_by(parents.c.name))
    return [row["name"] for row in rows]


# --- statements ----------------------------------------------------------------------------------


async def test_fetch_one_fetch_all_execute_with_plain_sql(database):
    touched = await database.execute(
        f'INSERT INTO "{SCHEMA}".parents (id, name, score) VALUES (%(a)s, %(n1)s, 1), (%(b)s, %(n2)s, 2)',
        {"a": uuid.uuid4(), "b": uuid.uuid4(), "n1": "ann", "n2": "bob"},
    )
    assert touched == 2
    row = await database.fetch_one(
        f'SELECT name, score FROM "{SCHEMA}".parents WHERE name = %(n)s', {"n": "bob"}
    )
    assert row is not None
    assert dict(row) == {"name": "bob", "score": 2}
    rows = await database.fetch_all(f'SELECT name FROM "{SCHEMA}".parents ORDER BY score DESC')
    assert [r["name"] for r in rows] == ["bob", "ann"]
    assert (
        await database.fetch_one(f'SELECT 1 FROM "{SCHEMA}".parents WHERE name = %(n)s', {"n": "zed"}) is None
    )
    assert await database.fetch_all(f'SELECT 1 FROM "{SCHEMA}".parents WHERE false') == []
    assert await database.execute(f'UPDATE "{SCHEMA}".parents SET score = score + 1') == 2
    assert await database.execute(f"DELETE FROM \"{SCHEMA}\".parents WHERE name = 'nobody'") == 0


async def test_core_statements_and_value_types(database):
    parent_id = uuid.uuid4()
    await database.execute(sa.insert(parents).values(id=parent_id, name="core", data={"k": [1, "two", None]}))
    row = await database.fetch_one(sa.select(parents).where(parents.c.id == parent_id))
    assert row is not None
    assert row["id"] == parent_id
    assert isinstance(row["id"], uuid.UUID)
    assert row["score"] == 0
    assert row["data"] == {"k": [1, "two", None]}
    created = row["created_at"]
    assert isinstance(created, datetime)
    assert created.utcoffset() == timedelta(0)
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 60
    # Extra params override the compiled ones.
    statement = sa.select(parents.c.name).where(parents.c.id == bindparam("id"))
    assert (await database.fetch_one(statement, {"id": parent_id}))["name"] == "core"


async def test_prepared_statements_are_reusable(database):
    first = await add_parent(database, "p1", 3)
    second = await add_parent(database, "p2")
    assert first != second
    assert (await database.fetch_one(PARENT_BY_NAME, {"name": "p1"}))["score"] == 3
    assert (await database.fetch_one(PARENT_BY_NAME, {"name": "p2"}))["score"] == 0  # the default
    assert await database.fetch_one(PARENT_BY_NAME, {"name": "p3"}) is None
    assert isinstance(INSERT_PARENT.sql, str) and "INSERT" in INSERT_PARENT.sql
    # Values are bound, never spliced into the SQL.
    evil = "x'); DROP TABLE parents; --"
    await add_parent(database, evil)
    assert (await database.fetch_one(PARENT_BY_NAME, {"name": evil})) is not None
    assert sorted(await names(database)) == sorted(["p1", "p2", evil])


# --- transactions --------------------------------------------------------------------------------


async def test_a_transaction_commits(database):
    async with database.transaction() as conn:
        row = await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "t1", "score": 1})
        assert row is not None
        await conn.execute(sa.insert(children).values(parent_id=row["id"]))
        assert len(await conn.fetch_all(sa.select(children))) == 1
    assert await names(database) == ["t1"]
    assert len(await database.fetch_all(sa.select(children))) == 1


async def test_a_transaction_that_raises_rolls_back(database):
    class Boom(Exception):
        pass

    async def insert_then_raise() -> None:
        async with database.transaction() as conn:
            await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "ghost", "score": 1})
            assert len(await conn.fetch_all(sa.select(parents))) == 1  # visible inside
            raise Boom

    with pytest.raises(Boom):
        await insert_then_raise()
    assert await names(database) == []


async def test_a_failing_statement_rolls_back_the_whole_transaction(database):
    await add_parent(database, "taken")

    async def insert_two() -> None:
        async with database.transaction() as conn:
            await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "fresh", "score": 1})
            await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "taken", "score": 1})

    with pytest.raises(UniqueViolation):
        await insert_two()
    assert await names(database) == ["taken"]
    # The connection went back to the pool in a usable state.
    for _ in range(4):
        assert (await database.fetch_one("SELECT 1 AS one"))["one"] == 1


async def test_uncommitted_rows_are_invisible_to_others(database):
    async with database.transaction() as conn:
        await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "pending", "score": 1})
        assert await database.fetch_one(PARENT_BY_NAME, {"name": "pending"}) is None
    assert await database.fetch_one(PARENT_BY_NAME, {"name": "pending"}) is not None


# --- constraint errors ---------------------------------------------------------------------------


async def test_unique_violation_names_the_constraint(database):
    await add_parent(database, "dup")
    with pytest.raises(UniqueViolation) as error:
        await add_parent(database, "dup")
    assert error.value.constraint == "parents_name_key"
    parent_id = await add_parent(database, "pk")
    with pytest.raises(UniqueViolation) as error:
        await database.execute(sa.insert(parents).values(id=parent_id, name="other"))
    assert error.value.constraint == "parents_pkey"


async def test_foreign_key_and_check_violations_name_the_constraint(database):
    with pytest.raises(ForeignKeyViolation) as fk:
        await database.execute(sa.insert(children).values(parent_id=uuid.uuid4()))
    assert fk.value.constraint == "children_parent_fk"
    with pytest.raises(CheckViolation) as check:
        await add_parent(database, "negative", -1)
    assert check.value.constraint == "parents_score_positive"


async def test_a_programming_error_is_not_disguised(database):
    with pytest.raises(psycopg2.errors.UndefinedTable):
        await database.fetch_one(f'SELECT * FROM "{SCHEMA}".no_such_table')
    assert (await database.fetch_one("SELECT 1 AS one"))["one"] == 1


# --- timeouts and unreachable servers ------------------------------------------------------------


async def test_a_slow_statement_times_out_and_the_pool_recovers(database):
    for _ in range(4):  # more than the pool's size: no connection leaks
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await database.fetch_one("SELECT pg_sleep(2)")
        assert time.monotonic() - started < 1.5
    assert (await database.fetch_one("SELECT 1 AS one"))["one"] == 1
    results = await asyncio.gather(*(database.fetch_one("SELECT 2 AS two") for _ in range(6)))
    assert [r["two"] for r in results] == [2] * 6


async def test_a_slow_statement_in_a_transaction_times_out_and_rolls_back(database):
    async def insert_then_sleep() -> None:
        async with database.transaction() as conn:
            await conn.fetch_one(INSERT_PARENT, {"id": uuid.uuid4(), "name": "slow", "score": 1})
            await conn.fetch_one("SELECT pg_sleep(1)")

    with pytest.raises(DatabaseUnavailable):
        await insert_then_sleep()
    assert await names(database) == []
    assert (await database.fetch_one("SELECT 1 AS one"))["one"] == 1


async def test_a_timed_out_statement_does_not_keep_running_on_the_server(database, database_url):
    marker = f"marker_{secrets.token_hex(4)}"
    with pytest.raises(DatabaseUnavailable):
        await database.fetch_one(f"SELECT pg_sleep(3) AS {marker}")
    # pg_sleep(3) would still be running for about 2 s more had the client only walked away.
    deadline = time.monotonic() + 1.5
    while (running := _active_with(database_url, marker)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert running == 0, "the statement is still running on the server after the client gave up"


def _active_with(database_url: str, marker: str) -> int:
    """How many other sessions are running a statement holding `marker` right now."""
    with contextlib.closing(psycopg2.connect(database_url)) as admin, admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
            " AND pid <> pg_backend_pid()",
            (f"%{marker}%",),
        )
        return int(cursor.fetchone()[0])


async def test_any_statement_after_a_timeout_in_a_transaction_is_database_unavailable(database):
    """Only DatabaseUnavailable (never a raw psycopg2 error) escapes for a lost connection."""

    async def carry_on_after_a_timeout() -> None:
        async with database.transaction() as conn:
            with contextlib.suppress(DatabaseUnavailable):
                await conn.fetch_one("SELECT pg_sleep(1)")
            await conn.fetch_one("SELECT 1")

    with pytest.raises(DatabaseUnavailable):
        await carry_on_after_a_timeout()
    assert (await database.fetch_one("SELECT 1 AS one"))["one"] == 1


def _refusing_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on loopback that accepts connections and never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def _unavailable(url: str, *, minsize: int) -> float:
    """Open a pool on `url` and use it; DatabaseUnavailable must come from one step or the other."""
    opened: list[Database] = []

    async def open_and_use() -> None:
        opened.append(await create_database(url, minsize=minsize, maxsize=2, timeout=0.5))
        await opened[0].fetch_one("SELECT 1")

    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable):
            await open_and_use()
    finally:
        for db in opened:
            await db.close()
    return time.monotonic() - started


async def test_an_unreachable_server_is_database_unavailable_on_use():
    elapsed = await _unavailable(f"postgresql://postgres@127.0.0.1:{_refusing_port()}/x", minsize=0)
    assert elapsed < 1.5


async def test_a_silent_server_is_database_unavailable_within_the_timeout():
    with silent_server() as port:
        elapsed = await _unavailable(f"postgresql://postgres@127.0.0.1:{port}/x", minsize=0)
    assert elapsed < 1.5


async def test_an_unreachable_server_is_database_unavailable_at_pool_creation():
    elapsed = await _unavailable(f"postgresql://postgres@127.0.0.1:{_refusing_port()}/x", minsize=1)
    assert elapsed < 1.5


async def test_a_silent_server_is_database_unavailable_at_pool_creation():
    with silent_server() as port:
        elapsed = await _unavailable(f"postgresql://postgres@127.0.0.1:{port}/x", minsize=1)
    assert elapsed < 1.5


async def test_ping(database):
    await database.ping()
    assert database.size >= 1


# --- the pool ------------------------------------------------------------------------------------


async def test_a_full_pool_makes_callers_wait_and_serves_them_in_order(database):
    # `database` holds at most 3 connections.
    held = [database.connection() for _ in range(3)]
    conns = [await cm.__aenter__() for cm in held]
    served: list[int] = []

    async def wait_then_query(index: int) -> None:
        async with database.connection() as conn:
            served.append(index)
            await conn.fetch_one("SELECT 1")

    waiting = [asyncio.create_task(wait_then_query(i)) for i in range(4)]
    await asyncio.sleep(0.05)
    assert served == [] and database.size == 3
    for cm in held:
        await cm.__aexit__(None, None, None)
    await asyncio.gather(*waiting)
    assert served == [0, 1, 2, 3]
    assert database.size == 3
    del conns


async def test_a_caller_that_gives_up_waiting_leaks_no_connection(database):
    held = [database.connection() for _ in range(3)]
    for cm in held:
        await cm.__aenter__()
    with pytest.raises(DatabaseUnavailable):
        await database.fetch_one("SELECT 1")  # waits the pool timeout (0.5 s), then gives up
    for cm in held:
        await cm.__aexit__(None, None, None)
    results = await asyncio.gather(*(database.fetch_one("SELECT 1 AS one") for _ in range(6)))
    assert [row["one"] for row in results] == [1] * 6
    assert database.size <= 3


async def test_a_connection_the_server_closed_is_replaced(database, database_url):
    row = await database.fetch_one("SELECT pg_backend_pid() AS pid")
    assert row is not None
    with psycopg2.connect(database_url) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s", (row["pid"],))
    admin.close()
    outcomes = []
    for _ in range(3):  # the dead connection fails one statement at most, then is dropped
        try:
            outcomes.append((await database.fetch_one("SELECT 1 AS one")) is not None)
        except DatabaseUnavailable:
            outcomes.append(False)
    assert outcomes[-1] is True
    assert database.size <= 3


# --- statements prepared on the server -------------------------------------------------------------


def test_a_prepared_statement_numbers_its_parameters_and_keeps_literal_percents():
    statement = prepare_sql("SELECT %(b)s::int + %(a)s::int + %(b)s::int AS n, 'x%%' AS t")
    assert statement.server_sql.endswith("AS SELECT $1::int + $2::int + $1::int AS n, 'x%' AS t")
    assert statement.execute_sql == f"EXECUTE {statement.name}(%(b)s, %(a)s)"


async def prepared_on_the_server(conn: Connection) -> int:
    """How many statements the server holds prepared for this connection's session."""
    row = await conn.fetch_one("SELECT count(*) AS n FROM pg_prepared_statements")
    assert row is not None
    return int(row["n"])


async def test_a_prepared_statement_is_prepared_once_per_connection(database):
    statement = prepare_sql("SELECT %(a)s::int * 2 AS n, 'x%%' AS t")
    async with database.connection() as conn:
        for value in (1, 2, 3):
            row = await conn.fetch_one(statement, {"a": value})
            assert row == {"n": value * 2, "t": "x%"}
        rows = await conn.fetch_all(
            "SELECT name FROM pg_prepared_statements WHERE name = %(name)s", {"name": statement.name}
        )
        assert len(rows) == 1
        assert await prepared_on_the_server(conn) == 1


async def use_parents(conn: Connection) -> list[object]:
    """Prepared statements of every shape, run twice each: a default, a repeated parameter, a
    literal percent sign without parameters, tuples and row counts; what each gave back."""
    results: list[object] = []
    for _ in range(2):
        await conn.execute(f'DELETE FROM "{SCHEMA}".parents')
        for name, score in (("ann", None), ("ANN", 3), ("bob", 5)):
            values = {"id": uuid.uuid4(), "name": name} | ({} if score is None else {"score": score})
            row = await conn.fetch_one(INSERT_PARENT, values)
            assert row is not None
            results.append((row["name"], row["score"]))
        results.append(await conn.fetch_all(PARENTS_LIKE, {"name": "ann"}))
        results.append(await conn.fetch_tuples(PARENTS_LIKE, {"name": "bob", "bonus": 1}))
        results.append(await conn.fetch_one(prepare_sql("SELECT 'x%%' AS t")))
        results.append(await conn.execute(PARENT_BY_NAME, {"name": "ann"}))
    return results


EXPECTED_USE = [
    ("ann", 0),
    ("ANN", 3),
    ("bob", 5),
    [{"name": "ANN", "boosted": 13}, {"name": "ann", "boosted": 10}],
    [("bob", 6)],
    {"t": "x%"},
    1,
] * 2


@pytest.mark.parametrize("transaction", [False, True])
async def test_without_server_prepare_statements_run_as_plain_sql(unprepared_database, transaction):
    scope = unprepared_database.transaction() if transaction else unprepared_database.connection()
    async with scope as conn:
        assert await use_parents(conn) == EXPECTED_USE
        assert await prepared_on_the_server(conn) == 0


async def test_with_server_prepare_the_same_statements_are_prepared_once_each(database):
    async with database.connection() as conn:
        assert await use_parents(conn) == EXPECTED_USE
        assert await prepared_on_the_server(conn) == 4  # the DELETE and count are plain SQL


async def test_a_prepared_statement_works_inside_a_transaction_that_rolls_back(database):
    statement = prepare_sql("SELECT %(a)s::int AS n")

    async def use_then_fail() -> None:
        async with database.transaction() as conn:
            assert (await conn.fetch_one(statement, {"a": 5})) == {"n": 5}
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await use_then_fail()
    for _ in range(3):  # the pool's connections, whichever: prepared or not, it answers
        assert (await database.fetch_one(statement, {"a": 6})) == {"n": 6}


async def test_no_statement_is_jit_compiled_whatever_its_estimated_cost(database: Database) -> None:
    """A generic plan's estimate grows with the tables; past jit_above_cost every execution compiled
    its expressions (7 ms for a 0.05 ms leaderboard read at 1,000,000 users): never on the services'
    connections, even with the threshold at zero."""
    async with database.transaction() as tx:
        await tx.execute("SET LOCAL jit_above_cost = 0")
        (plan,) = (
            await tx.fetch_one("EXPLAIN (ANALYZE, FORMAT JSON) SELECT sum(x) FROM generate_series(1, 100) x")
        )["QUERY PLAN"]
    assert "JIT" not in plan
