"""Apply and roll back a service's yoyo migrations in its own schema (a one-shot step, not in the loop).

yoyo does not create the schema it is pointed at, so this creates it first; yoyo's own bookkeeping
tables live in the same schema (`?schema=`), so the services' histories never mix.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql
from yoyo import get_backend, read_migrations

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _yoyo_url(database_url: str, schema: str) -> str:
    parts = urlsplit(database_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"] + [("schema", schema)]
    scheme = "postgresql" if parts.scheme in ("postgres", "postgresql") else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def ensure_schema(database_url: str, schema: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS, so yoyo has somewhere to write."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"bad schema name {schema!r}")
    with contextlib.closing(psycopg2.connect(database_url)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def apply_migrations(database_url: str, schema: str, folder: Path) -> int:
    """Apply every pending migration; return how many were applied."""
    ensure_schema(database_url, schema)
    backend = get_backend(_yoyo_url(database_url, schema))
    migrations = read_migrations(str(folder))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return len(pending)


def rollback_migrations(database_url: str, schema: str, folder: Path) -> int:
    """Roll back every applied migration; return how many were rolled back."""
    ensure_schema(database_url, schema)
    backend = get_backend(_yoyo_url(database_url, schema))
    migrations = read_migrations(str(folder))
    with backend.lock():
        applied = backend.to_rollback(migrations)
        backend.rollback_migrations(applied)
    return len(applied)
