"""The auth migrations: up, down, up again (stairway) on a database of their own; schema == tables.py."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from services.auth.db.tables import SCHEMA, metadata
from shared.migrations import apply_migrations, rollback_migrations

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "auth" / "migrations"
COUNT = len([p for p in MIGRATIONS.glob("*.sql") if not p.name.endswith(".rollback.sql")])
TYPE_FAMILIES = (
    sqltypes.Uuid,
    sqltypes.String,  # Text is a String
    sqltypes.DateTime,
    sqltypes.LargeBinary,
    sqltypes.JSON,
    sqltypes.Integer,
    sqltypes.Boolean,
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """An empty database of its own on the test server, dropped afterwards."""
    name = f"test_stairway_{secrets.token_hex(4)}"
    admin = psycopg2.connect(server_url, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(server_url, name)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def fresh_database_url(server_database_url: str) -> Iterator[str]:
    with fresh_database(server_database_url) as url:
        yield url


@pytest.fixture(scope="module")
def migrated_url(server_database_url: str) -> Iterator[str]:
    """A database of its own taken up, down and up again, then left migrated for the comparisons."""
    with fresh_database(server_database_url) as url:
        assert apply_migrations(url, SCHEMA, MIGRATIONS) == COUNT
        assert rollback_migrations(url, SCHEMA, MIGRATIONS) == COUNT
        assert apply_migrations(url, SCHEMA, MIGRATIONS) == COUNT
        yield url


@contextlib.contextmanager
def inspector(url: str) -> Iterator[Any]:
    engine = sa.create_engine(
        url.replace("postgresql://", "postgresql+psycopg2://", 1), poolclass=sa.NullPool
    )
    try:
        with engine.connect() as conn:
            yield sa.inspect(conn)
    finally:
        engine.dispose()


def tables_in(url: str, schema: str) -> set[str]:
    with inspector(url) as insp:
        return set(insp.get_table_names(schema=schema))


def is_yoyo_table(name: str) -> bool:
    return name.startswith(("_yoyo", "yoyo"))


def family(type_: Any) -> type:
    for cls in TYPE_FAMILIES:
        if isinstance(type_, cls):
            return cls
    raise AssertionError(f"unexpected column type {type_!r}")


def index_name(index: sa.Index) -> str:
    """The name the index gets in DDL (naming conventions applied)."""
    ddl = str(CreateIndex(index).compile(dialect=postgresql.dialect()))
    return ddl.split(" INDEX ", 1)[1].split(" ON ", 1)[0].strip().strip('"')


# --- the stairway --------------------------------------------------------------------------------


def test_stairway_up_down_up(fresh_database_url):
    url = fresh_database_url
    assert apply_migrations(url, SCHEMA, MIGRATIONS) == COUNT
    first = tables_in(url, SCHEMA)
    assert {"users", "refresh_tokens", "referral_outbox"} <= first
    assert apply_migrations(url, SCHEMA, MIGRATIONS) == 0, "applying twice is a no-op"

    assert rollback_migrations(url, SCHEMA, MIGRATIONS) == COUNT
    left = tables_in(url, SCHEMA)
    assert left, "yoyo keeps its bookkeeping tables"
    assert all(is_yoyo_table(name) for name in left), left
    assert rollback_migrations(url, SCHEMA, MIGRATIONS) == 0, "nothing left to roll back"

    assert apply_migrations(url, SCHEMA, MIGRATIONS) == COUNT
    assert tables_in(url, SCHEMA) == first
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO auth.users (email) VALUES ('stair@example.com') RETURNING id")
        (user_id,) = cursor.fetchone()
        cursor.execute(
            "INSERT INTO auth.refresh_tokens (token_hash, user_id, family_id, expires_at)"
            " VALUES (%s, %s, gen_random_uuid(), now() + interval '1 day')",
            (b"\x00" * 32, str(user_id)),
        )
        cursor.execute(
            "INSERT INTO auth.referral_outbox (referral_id, referrer_id, referral_email, code)"
            " VALUES (%s, gen_random_uuid(), 'stair@example.com', 'ABCD1234')",
            (str(user_id),),
        )
        conn.commit()
    # Down again with rows in the tables: the rollback drops them too.
    assert rollback_migrations(url, SCHEMA, MIGRATIONS) == COUNT
    assert all(is_yoyo_table(name) for name in tables_in(url, SCHEMA))


def test_migrations_live_only_in_their_schema(migrated_url):
    assert not (tables_in(migrated_url, "public") & {"users", "refresh_tokens"})
    assert not any(is_yoyo_table(t) for t in tables_in(migrated_url, "public"))


# --- the live schema matches tables.py -----------------------------------------------------------


def test_same_tables(migrated_url):
    live = {t for t in tables_in(migrated_url, SCHEMA) if not is_yoyo_table(t)}
    declared = {t.name for t in metadata.sorted_tables}
    assert live == declared


@pytest.mark.parametrize("table", [t.name for t in metadata.sorted_tables])
def test_same_columns_nullability_and_types(migrated_url, table):
    declared = metadata.tables[f"{SCHEMA}.{table}"]
    with inspector(migrated_url) as insp:
        live = {c["name"]: c for c in insp.get_columns(table, schema=SCHEMA)}
        primary = insp.get_pk_constraint(table, schema=SCHEMA)
    assert set(live) == {c.name for c in declared.columns}
    for column in declared.columns:
        reflected = live[column.name]
        assert reflected["nullable"] == column.nullable, column.name
        assert family(reflected["type"]) is family(column.type), (column.name, reflected["type"], column.type)
        if isinstance(column.type, sqltypes.DateTime):
            assert bool(reflected["type"].timezone) == bool(column.type.timezone), column.name
        if isinstance(column.type, sqltypes.JSON):
            assert isinstance(reflected["type"], type(column.type)), (column.name, reflected["type"])
        assert (reflected.get("default") is not None) == (column.server_default is not None), column.name
    assert set(primary["constrained_columns"]) == {c.name for c in declared.primary_key.columns}


@pytest.mark.parametrize("table", [t.name for t in metadata.sorted_tables])
def test_same_constraints(migrated_url, table):
    declared = metadata.tables[f"{SCHEMA}.{table}"]
    with inspector(migrated_url) as insp:
        checks = {c["name"] for c in insp.get_check_constraints(table, schema=SCHEMA)}
        foreign = {
            (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
            for fk in insp.get_foreign_keys(table, schema=SCHEMA)
        }
        unique = {tuple(u["column_names"]) for u in insp.get_unique_constraints(table, schema=SCHEMA)}
    declared_checks = {c.name for c in declared.constraints if isinstance(c, sa.CheckConstraint)}
    assert checks == declared_checks
    declared_foreign = {
        (
            tuple(fk.parent.name for fk in constraint.elements),
            constraint.elements[0].column.table.name,
            tuple(fk.column.name for fk in constraint.elements),
        )
        for constraint in declared.foreign_key_constraints
    }
    assert foreign == declared_foreign
    declared_unique = {
        tuple(c.name for c in constraint.columns)
        for constraint in declared.constraints
        if isinstance(constraint, sa.UniqueConstraint)
    }
    assert unique == declared_unique


@pytest.mark.parametrize("table", [t.name for t in metadata.sorted_tables])
def test_same_index_shapes(migrated_url, table):
    """Whatever the names, the same columns/expressions, uniqueness and partiality."""
    declared = metadata.tables[f"{SCHEMA}.{table}"]
    with inspector(migrated_url) as insp:
        live = [i for i in insp.get_indexes(table, schema=SCHEMA) if not i.get("duplicates_constraint")]

    def live_shape(index: dict[str, Any]) -> tuple[Any, ...]:
        columns = tuple(
            name if name is not None else (index.get("expressions") or [None])[position]
            for position, name in enumerate(index["column_names"])
        )
        where = index.get("dialect_options", {}).get("postgresql_where")
        return (columns, bool(index["unique"]), where is not None)

    def declared_shape(index: sa.Index) -> tuple[Any, ...]:
        columns = tuple(
            expression.name
            if isinstance(expression, sa.Column)
            else str(expression.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
            .replace("auth.users.", "")
            .replace("users.", "")
            for expression in index.expressions
        )
        return (columns, bool(index.unique), index.dialect_options["postgresql"]["where"] is not None)

    assert sorted(map(live_shape, live), key=repr) == sorted(map(declared_shape, declared.indexes), key=repr)


@pytest.mark.parametrize("table", [t.name for t in metadata.sorted_tables])
def test_same_index_names(migrated_url, table):
    declared = metadata.tables[f"{SCHEMA}.{table}"]
    with inspector(migrated_url) as insp:
        live = {
            i["name"] for i in insp.get_indexes(table, schema=SCHEMA) if not i.get("duplicates_constraint")
        }
    names = {index_name(index) for index in declared.indexes}
    assert live == names


def test_the_indexes_the_code_relies_on_exist(migrated_url):
    with inspector(migrated_url) as insp:
        users = {i["name"]: i for i in insp.get_indexes("users", schema=SCHEMA)}
        tokens = {i["name"]: i for i in insp.get_indexes("refresh_tokens", schema=SCHEMA)}
    assert users["users_email_lower_key"]["unique"]
    assert "lower" in str(users["users_email_lower_key"].get("expressions", ""))
    partial = tokens["refresh_tokens_one_live_per_family"]
    assert partial["unique"]
    assert partial["column_names"] == ["family_id"]
    where = str(partial["dialect_options"]["postgresql_where"])
    assert "rotated_at IS NULL" in where and "revoked_at IS NULL" in where


def test_the_outbox_claim_index_and_cascade_exist(migrated_url):
    with inspector(migrated_url) as insp:
        indexes = {i["name"]: i for i in insp.get_indexes("referral_outbox", schema=SCHEMA)}
        foreign = insp.get_foreign_keys("referral_outbox", schema=SCHEMA)
    pending = indexes["referral_outbox_pending_idx"]
    assert pending["column_names"] == ["next_attempt_at"]
    where = str(pending["dialect_options"]["postgresql_where"])
    assert "delivered_at IS NULL" in where and "failed_at IS NULL" in where
    assert [(fk["referred_table"], fk["options"].get("ondelete")) for fk in foreign] == [("users", "CASCADE")]
