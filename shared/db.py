"""The PostgreSQL layer: aiopg connections, pooled here, running SQLAlchemy 2 Core statements.

This is the only module that imports aiopg (which is in low maintenance): everything else talks to
`Database` and `Connection`. Hot statements are compiled once with `prepare`, so the request path
pays only for binding parameters, and prepared on the server once per connection unless the pool is
told not to (`server_prepare=False`: behind a transaction-mode pooler).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ClauseElement

log = logging.getLogger(__name__)

_DIALECT = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]

# UUIDs in and out as uuid.UUID; dicts out as JSON (hstore is off, see create_pool).
psycopg2.extras.register_uuid()
psycopg2.extensions.register_adapter(dict, psycopg2.extras.Json)

Row = Mapping[str, Any]
_DICT_CURSOR = psycopg2.extras.RealDictCursor

# How much longer than the server-side statement_timeout the client waits on a silent server.
CLIENT_GRACE = 1.0
# Idle connections older than this are closed instead of reused (server-side state, balancers).
POOL_RECYCLE_SECONDS = 600.0


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or did not answer in time."""


class UniqueViolation(Exception):
    """An INSERT or UPDATE broke a unique constraint; `constraint` names it."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class ForeignKeyViolation(Exception):
    """An INSERT or UPDATE referenced a missing row; `constraint` names it."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class CheckViolation(Exception):
    """A CHECK constraint refused a row; `constraint` names it."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(constraint)
        self.constraint = constraint


_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement compiled once (at import time) for the hot path; bind values at each call.

    Each pooled connection also prepares it on the server the first time it runs it (`PREPARE`),
    then runs `EXECUTE name(values)`: PostgreSQL parses and plans it once per connection instead of
    on every request (for the referral page, most of the database's CPU per request). A pool made
    with `server_prepare=False` runs `sql` with the values instead: a prepared statement lives in
    one server session, which a transaction-mode pooler (PgBouncer) does not keep for a connection.
    """

    sql: str
    defaults: Mapping[str, Any]
    name: str = field(init=False)
    server_sql: str = field(init=False)  # the PREPARE statement
    execute_sql: str = field(init=False)  # EXECUTE with psycopg2 placeholders, or "" if not preparable

    def __post_init__(self) -> None:
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(0) == "%%":
                return "%"
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        name = "stmt_" + hashlib.sha1(self.sql.encode(), usedforsecurity=False).hexdigest()[:20]
        body = _PLACEHOLDER.sub(number, self.sql)
        preparable = "POSTCOMPILE" not in self.sql  # IN lists expanded per call cannot be prepared
        arguments = "(" + ", ".join(f"%({param})s" for param in order) + ")" if order else ""
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "server_sql", f"PREPARE {name} AS {body}" if preparable else "")
        object.__setattr__(self, "execute_sql", f"EXECUTE {name}{arguments}" if preparable else "")


def prepare(statement: ClauseElement) -> Prepared:
    """Compile a Core statement built with `bindparam`s once, for reuse on every request."""
    sql, params = _compile(statement)
    return Prepared(sql, params)


def prepare_sql(sql: str) -> Prepared:
    """A hand-written statement (psycopg2 `%(name)s` placeholders), prepared the same way."""
    return Prepared(sql, {})


def _compile(statement: ClauseElement) -> tuple[str, dict[str, Any]]:
    compiled = statement.compile(dialect=_DIALECT)
    return str(compiled), dict(compiled.params)


Statement = ClauseElement | Prepared | str


def _translate(error: psycopg2.Error) -> BaseException:
    if isinstance(error, psycopg2.errors.UniqueViolation):
        return UniqueViolation(error.diag.constraint_name)
    if isinstance(error, psycopg2.errors.ForeignKeyViolation):
        return ForeignKeyViolation(error.diag.constraint_name)
    if isinstance(error, psycopg2.errors.CheckViolation):
        return CheckViolation(error.diag.constraint_name)
    if isinstance(error, psycopg2.errors.InFailedSqlTransaction):
        # An earlier statement of this transaction failed (a statement timeout, say); the caller went on.
        return DatabaseUnavailable("transaction aborted by an earlier failure")
    if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        # QueryCanceled (statement_timeout) is an OperationalError too.
        return DatabaseUnavailable(type(error).__name__)
    return error  # type: ignore[no-any-return]


class Connection:
    """One pooled connection; statements are SQLAlchemy Core or (sql, params) pairs."""

    def __init__(self, pooled: _Pooled, timeout: float, *, server_prepare: bool) -> None:
        self._raw = pooled.raw
        self._prepared = pooled.prepared
        self._timeout = timeout
        self._server_prepare = server_prepare

    async def _run(
        self, statement: Statement, params: Mapping[str, Any] | None, cursor_factory: Any = _DICT_CURSOR
    ) -> Any:
        if isinstance(statement, str):
            sql, bound = statement, dict(params or {})
        elif isinstance(statement, Prepared):
            bound = {**statement.defaults, **(params or {})}
            sql = statement.sql
            if statement.execute_sql and self._server_prepare:
                if statement.name not in self._prepared:
                    await self._prepare(statement)
                sql = statement.execute_sql
        else:
            sql, bound = _compile(statement)
            if params:
                bound.update(params)
        cursor = None
        try:
            cursor = await self._raw.cursor(cursor_factory=cursor_factory)
            async with asyncio.timeout(self._timeout + CLIENT_GRACE):
                await cursor.execute(sql, bound)
        except psycopg2.Error as error:
            if cursor is not None:
                cursor.close()
            raise _translate(error) from error
        except TimeoutError:
            if cursor is not None:
                cursor.close()
            raise DatabaseUnavailable("statement timed out") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a real cancellation of this request
            # aiopg turns the server's statement_timeout (QueryCanceledError) into CancelledError.
            raise DatabaseUnavailable("statement timed out") from None
        return cursor

    async def _prepare(self, statement: Prepared) -> None:
        """PREPARE the statement on this connection unless it already is."""
        names = self._prepared
        if statement.name in names:
            return
        cursor = await self._raw.cursor()
        try:
            async with asyncio.timeout(self._timeout + CLIENT_GRACE):
                await cursor.execute(statement.server_sql)
        except psycopg2.errors.DuplicatePreparedStatement:
            pass  # prepared by an earlier call whose answer was lost (a timeout): it is there
        except psycopg2.Error as error:
            raise _translate(error) from error
        except TimeoutError:
            raise DatabaseUnavailable("statement timed out") from None
        finally:
            cursor.close()
        names.add(statement.name)

    async def fetch_one(self, statement: Statement, params: Mapping[str, Any] | None = None) -> Row | None:
        """Run a statement and return its first row, or None."""
        cursor = await self._run(statement, params)
        try:
            row = await cursor.fetchone()
        except psycopg2.Error as error:
            # The connection can die between the statement and the read (the cursor is then closed).
            raise _translate(error) from error
        finally:
            cursor.close()
        return row  # type: ignore[no-any-return]

    async def _fetch_every(self, statement: Statement, params: Mapping[str, Any] | None, factory: Any) -> Any:
        cursor = await self._run(statement, params, cursor_factory=factory)
        try:
            return await cursor.fetchall()
        except psycopg2.Error as error:
            raise _translate(error) from error
        finally:
            cursor.close()

    async def fetch_all(self, statement: Statement, params: Mapping[str, Any] | None = None) -> Sequence[Row]:
        """Run a statement and return every row."""
        rows: Sequence[Row] = await self._fetch_every(statement, params, _DICT_CURSOR)
        return rows

    async def fetch_tuples(
        self, statement: Statement, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a statement and return every row as a tuple (no dict per row: for long hot results)."""
        rows: list[tuple[Any, ...]] = await self._fetch_every(statement, params, None)
        return rows

    async def execute(self, statement: Statement, params: Mapping[str, Any] | None = None) -> int:
        """Run a statement; return the number of rows it touched."""
        cursor = await self._run(statement, params)
        try:
            return int(cursor.rowcount)
        except psycopg2.Error as error:
            raise _translate(error) from error
        finally:
            cursor.close()


class _Pooled:
    """An aiopg connection with what the pool knows of it (kept here, not set on aiopg's object)."""

    __slots__ = ("last_used", "prepared", "raw")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.last_used = time.monotonic()
        self.prepared: set[str] = set()  # names PREPAREd on this server connection (see Prepared)

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)

    def close(self) -> Any:
        return self.raw.close()


class _Pool:
    """The connections of one process: LIFO reuse, a bounded size, waiters served in order.

    aiopg's own pool walks every idle connection under a lock on each acquire and schedules a task
    on every release; here a connection is a `pop()` away. Measured against aiopg's pool back to
    back (README, "The packages"): 24 % less service CPU per request on `/me`, 11 % on a referral
    page. Statements run without aiopg's per-statement timeout (the caller's `asyncio.timeout` and
    the server's `statement_timeout` bound them instead).
    """

    def __init__(self, connect: Callable[[], Awaitable[_Pooled]], *, maxsize: int, recycle: float) -> None:
        self._connect = connect
        self._maxsize = maxsize
        self._recycle = recycle
        self._free: collections.deque[_Pooled] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[_Pooled | None]] = collections.deque()
        self.size = 0  # open, or being opened
        self._closed = False

    async def fill(self, count: int) -> None:
        for _ in range(count):
            self._free.append(await self._open())

    async def _open(self) -> _Pooled:
        self.size += 1
        try:
            return await self._connect()
        except BaseException:
            self.size -= 1
            self._wake_one(None)  # the slot is free again: a waiter may open it
            raise

    async def acquire(self) -> _Pooled:
        if self._closed:
            raise DatabaseUnavailable("the connection pool is closed")
        now = time.monotonic()
        while self._free:
            raw = self._free.pop()
            if raw.closed or now - raw.last_used > self._recycle:
                self._discard(raw)
                continue
            return raw
        if self.size < self._maxsize:
            return await self._open()
        waiter: asyncio.Future[_Pooled | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                late = waiter.result()
                if late is not None:
                    self.release(late)  # handed over just as the caller gave up
            raise
        return handed if handed is not None else await self._open()

    def release(self, raw: _Pooled) -> None:
        if raw.closed or self._closed:
            self._discard(raw)
            self._wake_one(None)
            return
        raw.last_used = time.monotonic()
        if not self._wake_one(raw):
            self._free.append(raw)

    def _wake_one(self, raw: _Pooled | None) -> bool:
        """Hand `raw` (None: a free slot) to the oldest waiter still waiting; False if there is none."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(raw)
                return True
        return False

    def _discard(self, raw: _Pooled) -> None:
        self.size -= 1
        if not raw.closed:
            raw.close()

    async def close(self) -> None:
        self._closed = True
        while self._free:
            raw = self._free.pop()
            self.size -= 1
            await raw.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(DatabaseUnavailable("the connection pool is closed"))
        self._waiters.clear()


class Database:
    """A pool of connections with timeouts; `connection()` for one statement, `transaction()` for many.

    `server_prepare`: whether `Prepared` statements are prepared on the server (see `Prepared`).
    """

    def __init__(self, pool: _Pool, timeout: float, *, server_prepare: bool) -> None:
        self._pool = pool
        self._timeout = timeout
        self._server_prepare = server_prepare

    @property
    def size(self) -> int:
        return self._pool.size

    async def _pick(self) -> _Pooled:
        """A pooled connection that is still open.

        A connection the server dropped (restart, pg_terminate_backend, network) is closed by aiopg
        when it notices; if that happens while the pool is refilling, aiopg hands it out anyway, and
        trips its own assertion on it. Such a connection has left the pool: ask again.
        """
        while True:
            pooled = await self._pool.acquire()
            if not pooled.closed:
                return pooled
            self._pool.release(pooled)
            await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[_Pooled]:
        try:
            async with asyncio.timeout(self._timeout):
                pooled = await self._pick()
        except TimeoutError:
            raise DatabaseUnavailable("no connection available in time") from None
        except psycopg2.Error as error:
            raise _translate(error) from error
        except OSError as error:
            raise DatabaseUnavailable(type(error).__name__) from error
        try:
            yield pooled
        except BaseException:
            # A connection whose statement failed mid-flight may be in any state: do not reuse it
            # unless it is plainly idle.
            if (
                not pooled.closed
                and pooled.raw.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE
            ):
                pooled.close()
            raise
        finally:
            self._pool.release(pooled)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection in autocommit mode: each statement commits on its own."""
        async with self._acquire() as pooled:
            yield Connection(pooled, self._timeout, server_prepare=self._server_prepare)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A connection inside BEGIN ... COMMIT; any exception rolls it back."""
        async with self._acquire() as pooled:
            conn = Connection(pooled, self._timeout, server_prepare=self._server_prepare)
            await conn.execute("BEGIN")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.execute("ROLLBACK"))
                raise
            await conn.execute("COMMIT")

    async def fetch_one(self, statement: Statement, params: Mapping[str, Any] | None = None) -> Row | None:
        """One statement on its own connection, first row."""
        async with self.connection() as conn:
            return await conn.fetch_one(statement, params)

    async def fetch_all(self, statement: Statement, params: Mapping[str, Any] | None = None) -> Sequence[Row]:
        """One statement on its own connection, every row."""
        async with self.connection() as conn:
            return await conn.fetch_all(statement, params)

    async def fetch_tuples(
        self, statement: Statement, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """One statement on its own connection, every row as a tuple."""
        async with self.connection() as conn:
            return await conn.fetch_tuples(statement, params)

    async def execute(self, statement: Statement, params: Mapping[str, Any] | None = None) -> int:
        """One statement on its own connection, rows touched."""
        async with self.connection() as conn:
            return await conn.execute(statement, params)

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless PostgreSQL answers."""
        await self.fetch_one("SELECT 1")

    async def close(self) -> None:
        await self._pool.close()


async def create_database(
    dsn: str,
    *,
    minsize: int,
    maxsize: int,
    timeout: float,  # noqa: ASYNC109
    server_prepare: bool = True,
) -> Database:
    """Open a pool; connections are made lazily past `minsize`, so startup does not need them all.

    The server enforces the timeout (`statement_timeout`), so a slow statement is cancelled where it
    runs and releases its locks; the client waits `CLIENT_GRACE` longer before it gives up on an
    unresponsive server (and then closes the connection). `server_prepare=False`: `Prepared`
    statements run as plain SQL, for a pooler that does not keep server sessions (see `Prepared`).

    JIT compilation is off on these connections: it pays only for long analytical queries, and it
    is decided by the plan's estimated cost, not by what the statement reads. A generic plan's
    estimate grows with the tables (with `LIMIT $n` unknown, PostgreSQL assumes a tenth of the
    rows): at 1,000,000 users the leaderboard's plan passed `jit_above_cost`, and every read spent
    7 ms compiling expressions for a 10-row index scan that takes 0.05 ms (the benchmark's
    `--scale 10`).
    """
    server_timeout_ms = max(1, int(timeout * 1000))

    async def connect() -> _Pooled:
        async with asyncio.timeout(timeout + CLIENT_GRACE):
            raw: Any = await aiopg.connect(
                dsn,
                timeout=None,  # type: ignore[arg-type]  # no `wait_for` per statement: see _Pool
                enable_hstore=False,
                enable_json=True,
                enable_uuid=True,
                options=f"-c timezone=UTC -c statement_timeout={server_timeout_ms} -c jit=off",
            )
        return _Pooled(raw)

    pool = _Pool(connect, maxsize=maxsize, recycle=POOL_RECYCLE_SECONDS)
    try:
        async with asyncio.timeout(timeout):  # opening `minsize` connections
            await pool.fill(minsize)
    except TimeoutError:
        await pool.close()
        raise DatabaseUnavailable("PostgreSQL did not answer in time") from None
    except psycopg2.Error as error:
        await pool.close()
        raise _translate(error) from error
    except OSError as error:
        await pool.close()
        raise DatabaseUnavailable(type(error).__name__) from error
    return Database(pool, timeout, server_prepare=server_prepare)
