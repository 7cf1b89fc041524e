"""Each service's migrations: up, down, up again (stairway) in a database of its own; schema == tables.py."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

import services.auth.adapters.db.tables
import services.referral.adapters.tables
from shared.migrations import apply_migrations, rollback_migrations
from tests.helpers import fresh_database

ROOT = Path(__file__).resolve().parents[2]
TYPE_FAMILIES = (
    sqltypes.Uuid,
    sqltypes.String,  # Text is a String
    sqltypes.DateTime,
    sqltypes.Date,
    sqltypes.LargeBinary,
    sqltypes.JSON,
    sqltypes.Integer,
    sqltypes.Boolean,
)


# --- the services --------------------------------------------------------------------------------


def insert_auth_rows(cursor: Any) -> None:
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


def insert_referral_rows(cursor: Any) -> None:
    # expires_at > created_at (codes_expire_after_creation), referrer_id <> referral_id (referrals_not_self).
    cursor.execute(
        "INSERT INTO referral.codes (code, owner_id, owner_email, expires_at)"
        " VALUES ('STAIR123', gen_random_uuid(), 'stair@example.com', now() + interval '30 days')"
        " RETURNING owner_id"
    )
    (owner_id,) = cursor.fetchone()
    cursor.execute(
        "INSERT INTO referral.referrals (referral_id, referrer_id, referral_email, code)"
        " VALUES (gen_random_uuid(), %s, 'stair-referral@example.com', 'STAIR123')",
        (str(owner_id),),
    )


@dataclass(frozen=True)
class Service:
    name: str
    tables: ModuleType  # the service's db/tables.py: SCHEMA, metadata
    expected_tables: frozenset[str]
    insert_rows: Callable[[Any], None]

    @property
    def schema(self) -> str:
        schema: str = self.tables.SCHEMA
        return schema

    @property
    def metadata(self) -> sa.MetaData:
        metadata: sa.MetaData = self.tables.metadata
        return metadata

    @property
    def migrations(self) -> Path:
        return ROOT / "services" / self.name / "migrations"

    @property
    def count(self) -> int:
        return len([p for p in self.migrations.glob("*.sql") if not p.name.endswith(".rollback.sql")])


AUTH = Service(
    "auth",
    services.auth.adapters.db.tables,
    frozenset({"users", "refresh_tokens", "referral_outbox"}),
    insert_auth_rows,
)
REFERRAL = Service(
    "referral",
    services.referral.adapters.tables,
    frozenset({"codes", "referrals", "referrer_totals"}),
    insert_referral_rows,
)
SERVICES = [pytest.param(AUTH, id="auth"), pytest.param(REFERRAL, id="referral")]
TABLE_CASES = [
    pytest.param(service, table.name, id=f"{service.name}-{table.name}")
    for service in (AUTH, REFERRAL)
    for table in service.metadata.sorted_tables
]


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_database_url(server_database_url: str) -> Iterator[str]:
    with fresh_database(server_database_url, "test_stairway") as url:
        yield url


@pytest.fixture(scope="module")
def migrated(server_database_url: str) -> Iterator[Callable[[Service], str]]:
    """Per service, once per module: a database of its own taken up, down and up again, left migrated."""
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:

        def migrated_url_of(service: Service) -> str:
            if service.name not in urls:
                url = stack.enter_context(fresh_database(server_database_url, "test_stairway"))
                assert apply_migrations(url, service.schema, service.migrations) == service.count
                assert rollback_migrations(url, service.schema, service.migrations) == service.count
                assert apply_migrations(url, service.schema, service.migrations) == service.count
                urls[service.name] = url
            return urls[service.name]

        yield migrated_url_of


@pytest.fixture
def migrated_url(migrated: Callable[[Service], str], service: Service) -> str:
    """The migrated database of the test's `service` (a parametrized argument)."""
    return migrated(service)


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


def strip_table(sql_text: str, schema: str, table: str) -> str:
    """`lower(auth.users.email)` -> `lower(email)`: drop the "<schema>.<table>." and "<table>." prefixes."""
    return re.sub(rf"\b(?:{re.escape(schema)}\.)?{re.escape(table)}\.", "", sql_text)


def normalize_predicate(predicate: str | None) -> str | None:
    """PostgreSQL prints `((a IS NULL) AND (b IS NULL))`; compare without parentheses or extra spaces."""
    if predicate is None:
        return None
    return " ".join(predicate.replace("(", " ").replace(")", " ").split())


def live_index_shape(index: dict[str, Any]) -> tuple[Any, ...]:
    """(keys with their sort order, unique, partial predicate) of a reflected index."""
    expressions = index.get("expressions") or []
    sorting = index.get("column_sorting") or {}
    keys = []
    for position, name in enumerate(index["column_names"]):
        key = name if name is not None else expressions[position]
        order = [option.upper().replace("_", " ") for option in sorting.get(key, ())]
        keys.append(" ".join([key, *order]))
    where = index.get("dialect_options", {}).get("postgresql_where")
    return (tuple(keys), bool(index["unique"]), normalize_predicate(where))


def declared_index_shape(index: sa.Index, schema: str) -> tuple[Any, ...]:
    """(keys with their sort order, unique, partial predicate) of an Index in tables.py."""
    table = index.table.name

    def compiled(clause: Any) -> str:
        text = str(clause.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        return strip_table(text, schema, table)

    keys = tuple(
        expression.name if isinstance(expression, sa.Column) else compiled(expression)
        for expression in index.expressions
    )
    where = index.dialect_options["postgresql"]["where"]
    return (keys, bool(index.unique), normalize_predicate(None if where is None else compiled(where)))


# --- the stairway --------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_stairway_up_down_up(fresh_database_url, service):
    url, schema, migrations, count = fresh_database_url, service.schema, service.migrations, service.count
    assert count > 0, migrations
    assert apply_migrations(url, schema, migrations) == count
    first = tables_in(url, schema)
    assert service.expected_tables <= first
    assert {t.name for t in service.metadata.sorted_tables} <= first
    assert apply_migrations(url, schema, migrations) == 0, "applying twice is a no-op"

    assert rollback_migrations(url, schema, migrations) == count
    left = tables_in(url, schema)
    assert left, "yoyo keeps its bookkeeping tables"
    assert all(is_yoyo_table(name) for name in left), left
    assert rollback_migrations(url, schema, migrations) == 0, "nothing left to roll back"

    assert apply_migrations(url, schema, migrations) == count
    assert tables_in(url, schema) == first
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cursor:
        service.insert_rows(cursor)
        conn.commit()
        for table in service.expected_tables:
            cursor.execute(f'SELECT count(*) FROM "{schema}"."{table}"')
            assert cursor.fetchone()[0] > 0, f"no sample row in {schema}.{table}"
    # Down again with rows in the tables: the rollback drops them too.
    assert rollback_migrations(url, schema, migrations) == count
    assert all(is_yoyo_table(name) for name in tables_in(url, schema))


@pytest.mark.parametrize("service", SERVICES)
def test_migrations_live_only_in_their_schema(migrated_url, service):
    declared = {t.name for t in service.metadata.sorted_tables}
    with inspector(migrated_url) as insp:
        schemas = set(insp.get_schema_names())
        assert service.schema in schemas
        elsewhere = {
            schema: set(insp.get_table_names(schema=schema))
            for schema in schemas - {service.schema, "information_schema"}
            if not schema.startswith("pg_")
        }
    assert "public" in elsewhere
    for schema, tables in elsewhere.items():
        assert not (tables & declared), (schema, tables & declared)
        assert not any(is_yoyo_table(t) for t in tables), (schema, tables)


# --- the live schema matches tables.py -----------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_same_tables(migrated_url, service):
    live = {t for t in tables_in(migrated_url, service.schema) if not is_yoyo_table(t)}
    declared = {t.name for t in service.metadata.sorted_tables}
    assert live == declared


@pytest.mark.parametrize(("service", "table"), TABLE_CASES)
def test_same_columns_nullability_and_types(migrated_url, service, table):
    schema = service.schema
    declared = service.metadata.tables[f"{schema}.{table}"]
    with inspector(migrated_url) as insp:
        live = {c["name"]: c for c in insp.get_columns(table, schema=schema)}
        primary = insp.get_pk_constraint(table, schema=schema)
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


@pytest.mark.parametrize(("service", "table"), TABLE_CASES)
def test_same_constraints(migrated_url, service, table):
    schema = service.schema
    declared = service.metadata.tables[f"{schema}.{table}"]
    with inspector(migrated_url) as insp:
        checks = {c["name"] for c in insp.get_check_constraints(table, schema=schema)}
        foreign = {
            (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
            for fk in insp.get_foreign_keys(table, schema=schema)
        }
        unique = {tuple(u["column_names"]) for u in insp.get_unique_constraints(table, schema=schema)}
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


@pytest.mark.parametrize(("service", "table"), TABLE_CASES)
def test_same_index_shapes(migrated_url, service, table):
    """Whatever the names, the same columns/expressions and sort order, uniqueness and partial predicate."""
    schema = service.schema
    declared = service.metadata.tables[f"{schema}.{table}"]
    with inspector(migrated_url) as insp:
        live = [i for i in insp.get_indexes(table, schema=schema) if not i.get("duplicates_constraint")]
    assert sorted(map(live_index_shape, live), key=repr) == sorted(
        (declared_index_shape(index, schema) for index in declared.indexes), key=repr
    )


@pytest.mark.parametrize(("service", "table"), TABLE_CASES)
def test_same_index_names(migrated_url, service, table):
    schema = service.schema
    declared = service.metadata.tables[f"{schema}.{table}"]
    with inspector(migrated_url) as insp:
        live = {
            i["name"] for i in insp.get_indexes(table, schema=schema) if not i.get("duplicates_constraint")
        }
    names = {index_name(index) for index in declared.indexes}
    assert live == names


# --- the indexes the code relies on --------------------------------------------------------------


@pytest.mark.parametrize("service", [pytest.param(AUTH, id="auth")])
def test_the_auth_indexes_the_code_relies_on_exist(migrated_url, service):
    with inspector(migrated_url) as insp:
        users = {i["name"]: i for i in insp.get_indexes("users", schema=service.schema)}
        tokens = {i["name"]: i for i in insp.get_indexes("refresh_tokens", schema=service.schema)}
    assert users["users_email_lower_key"]["unique"]
    assert "lower" in str(users["users_email_lower_key"].get("expressions", ""))
    partial = tokens["refresh_tokens_one_live_per_family"]
    assert partial["unique"]
    assert partial["column_names"] == ["family_id"]
    where = str(partial["dialect_options"]["postgresql_where"])
    assert "rotated_at IS NULL" in where and "revoked_at IS NULL" in where


@pytest.mark.parametrize("service", [pytest.param(AUTH, id="auth")])
def test_the_auth_outbox_claim_index_and_cascade_exist(migrated_url, service):
    with inspector(migrated_url) as insp:
        indexes = {i["name"]: i for i in insp.get_indexes("referral_outbox", schema=service.schema)}
        foreign = insp.get_foreign_keys("referral_outbox", schema=service.schema)
    pending = indexes["referral_outbox_pending_idx"]
    assert pending["column_names"] == ["next_attempt_at"]
    where = str(pending["dialect_options"]["postgresql_where"])
    assert "delivered_at IS NULL" in where and "failed_at IS NULL" in where
    assert [(fk["referred_table"], fk["options"].get("ondelete")) for fk in foreign] == [("users", "CASCADE")]


@pytest.mark.parametrize("service", [pytest.param(REFERRAL, id="referral")])
def test_the_referral_indexes_the_code_relies_on_exist(migrated_url, service):
    with inspector(migrated_url) as insp:
        codes = {i["name"]: i for i in insp.get_indexes("codes", schema=service.schema)}
        referrals = {i["name"]: i for i in insp.get_indexes("referrals", schema=service.schema)}
        primary = insp.get_pk_constraint("referrals", schema=service.schema)
    # A code is unique case-insensitively.
    code_key = codes["codes_code_lower_key"]
    assert code_key["unique"]
    assert code_key["column_names"] == [None]
    assert code_key.get("expressions") == ["lower(code)"]
    # At most one open code per owner.
    one_open = codes["codes_one_open_per_owner"]
    assert one_open["unique"]
    assert one_open["column_names"] == ["owner_id"]
    assert "deleted_at IS NULL" in str(one_open["dialect_options"].get("postgresql_where"))
    # The public lookup of a referrer's open code by email.
    by_email = codes["codes_open_by_email"]
    assert by_email.get("expressions") == ["lower(owner_email)"]
    assert "deleted_at IS NULL" in str(by_email["dialect_options"].get("postgresql_where"))
    # A referrer's referrals, newest first, for keyset pagination.
    by_referrer = referrals["referrals_by_referrer"]
    assert by_referrer["column_names"] == ["referrer_id", "created_at", "referral_id"]
    sorting = by_referrer.get("column_sorting") or {}
    assert "referrer_id" not in sorting
    assert sorting.get("created_at") == ("desc",) and sorting.get("referral_id") == ("desc",)
    # A user is a referral at most once: the referral's id is the key.
    assert primary["name"] == "referrals_pkey"
    assert primary["constrained_columns"] == ["referral_id"]
