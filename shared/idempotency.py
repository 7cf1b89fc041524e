"""Idempotent writes (API.md "Idempotent writes"): an `Idempotency-Key` makes a POST safe to retry.

One implementation for both services: each keeps its keys in its own schema's `idempotency_keys`
table (`idempotency_keys_table(metadata)` declares it in the service's tables module; the service's
migration creates it). The keys live in PostgreSQL rather than Redis because a key is a promise that
a write happened once: it must survive a Redis restart or an eviction under memory pressure (either
would silently let a retry write twice), and the claim is an ordinary row whose atomicity is the
database's own (`INSERT ... ON CONFLICT`), in the same database as the writes it guards.

A row, keyed by (scope, key), is in one of two states:

- `running`: a request claimed the key (`claim_id` says which) at `locked_at` and is executing. The
  same request again answers 409 `idempotency_key_in_use`. A claim older than the lease (60 s by
  default) is abandoned (its process crashed or was killed before it could finish or let go) and the
  next identical request takes it over, atomically, in the claim's one statement.
- `finished`: the first answer (status, the headers that matter, the body bytes) is kept and replayed
  byte for byte, with `Idempotent-Replayed: true`, for 24 hours after the claim.

No row: never seen, expired and cleaned up (a periodic batched DELETE), or released because the
request failed on the server's side (a 5xx answer or an exception): nothing is kept, a retry runs
again. The fingerprint (SHA-256 of method, path and body) tells the same request from another one
under the same key, which answers 422 `idempotency_key_reused`. Scopes keep callers apart: the
token's subject, or a fixed name where there is no caller yet (signup).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp_apigami.constants import API_SPEC_ATTR
from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from shared.appkeys import DATABASE
from shared.db import Database, DatabaseUnavailable, Prepared, prepare_sql
from shared.errors import problem_response
from shared.problems import Problem, ValidationProblem
from shared.tokens import CLAIMS

log = logging.getLogger(__name__)

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# The answer's headers a replay must carry to mean the same thing (a problem's challenge or
# Retry-After too); the rest (request id, Server, Date, CORS) belong to each exchange.
KEPT_HEADERS = ("Content-Type", "Location", "Cache-Control", "Pragma", "WWW-Authenticate", "Retry-After")
TABLE_NAME = "idempotency_keys"

TTL_SECONDS = 24 * 3600.0
LEASE_SECONDS = 60.0
CLEANUP_EVERY_SECONDS = 300.0
CLEANUP_BATCH = 1000


class IdempotencyKeyInUse(Problem):
    status = 409
    code = "idempotency_key_in_use"
    title = "A request with this Idempotency-Key is still running"

    def __init__(self) -> None:
        super().__init__(
            "The first request with this key has not finished; retry shortly.", headers={"Retry-After": "1"}
        )


class IdempotencyKeyReused(Problem):
    status = 422
    code = "idempotency_key_reused"
    title = "This Idempotency-Key was used for another request"


def idempotency_keys_table(metadata: MetaData) -> Table:
    """The keys of one service, in `metadata`'s schema (the migration creating it is the truth)."""
    table = Table(
        TABLE_NAME,
        metadata,
        Column("scope", Text, primary_key=True),
        Column("key", Text, primary_key=True),
        Column("fingerprint", LargeBinary, nullable=False),
        Column("claim_id", Uuid, nullable=False),
        Column("state", Text, nullable=False, server_default=text("'running'")),
        Column("status", Integer),
        Column("headers", JSONB),
        Column("body", LargeBinary),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("locked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        CheckConstraint("state IN ('running', 'finished')", name="idempotency_keys_state"),
        CheckConstraint(
            "state = 'running' OR (status IS NOT NULL AND headers IS NOT NULL AND body IS NOT NULL)",
            name="idempotency_keys_finished_has_answer",
        ),
    )
    Index("idempotency_keys_by_age", table.c.created_at)
    return table


@dataclass(frozen=True, slots=True)
class Answer:
    """A kept answer: replayed as it was first sent."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """SHA-256 of what makes two requests the same one."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two splits hash alike
        digest.update(part)
    return digest.digest()


class IdempotencyStore:
    """The keys of one schema: claim, finish or release, look up, expire."""

    def __init__(
        self,
        database: Database,
        table: Table,
        *,
        ttl: float = TTL_SECONDS,
        lease: float = LEASE_SECONDS,
    ) -> None:
        self._database = database
        self._ttl = ttl
        self._lease = lease
        name = f"{table.schema}.{table.name}"
        # Inserted, or taken over when expired (not yet cleaned up) or abandoned by the same request:
        # a row comes back only if this call owns the claim. Concurrent claims serialize on the row.
        self._claim: Prepared = prepare_sql(
            f"INSERT INTO {name} AS k (scope, key, fingerprint, claim_id)"  # noqa: S608 (names, not input)
            " VALUES (%(scope)s, %(key)s, %(fingerprint)s, %(claim_id)s)"
            " ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,"
            " claim_id = excluded.claim_id, state = 'running', status = NULL, headers = NULL,"
            " body = NULL, created_at = now(), locked_at = now()"
            " WHERE k.created_at < now() - make_interval(secs => %(ttl)s)"
            " OR (k.state = 'running' AND k.fingerprint = excluded.fingerprint"
            " AND k.locked_at < now() - make_interval(secs => %(lease)s))"
            " RETURNING k.claim_id"
        )
        self._lookup = prepare_sql(
            f"SELECT fingerprint, state, status, headers, body FROM {name}"  # noqa: S608
            " WHERE scope = %(scope)s AND key = %(key)s"
        )
        self._finish = prepare_sql(
            f"UPDATE {name} SET state = 'finished', status = %(status)s, headers = %(headers)s,"  # noqa: S608
            " body = %(body)s WHERE scope = %(scope)s AND key = %(key)s AND claim_id = %(claim_id)s"
        )
        self._release = prepare_sql(
            f"DELETE FROM {name} WHERE scope = %(scope)s AND key = %(key)s"  # noqa: S608
            " AND claim_id = %(claim_id)s"
        )
        self._expire = prepare_sql(
            f"DELETE FROM {name} WHERE (scope, key) IN (SELECT scope, key FROM {name}"  # noqa: S608
            " WHERE created_at < now() - make_interval(secs => %(ttl)s) LIMIT %(limit)s)"
        )

    async def claim(self, scope: str, key: str, print_: bytes) -> uuid.UUID | Answer:
        """Our claim's id, or the kept answer to replay; 409 while it runs, 422 for another request."""
        for _ in range(3):  # a row released between our INSERT and SELECT: claim again
            claim_id = uuid.uuid4()
            params = {"scope": scope, "key": key, "fingerprint": print_, "claim_id": claim_id}
            claimed = await self._database.fetch_one(
                self._claim, {**params, "ttl": self._ttl, "lease": self._lease}
            )
            if claimed is not None:
                return claim_id
            row = await self._database.fetch_one(self._lookup, {"scope": scope, "key": key})
            if row is None:
                continue
            if bytes(row["fingerprint"]) != print_:
                raise IdempotencyKeyReused(
                    "This key was first used with another method, path or body; use a new key."
                )
            if row["state"] == "running":
                raise IdempotencyKeyInUse()
            return Answer(row["status"], dict(row["headers"]), bytes(row["body"]))
        raise IdempotencyKeyInUse()

    async def finish(self, scope: str, key: str, claim_id: uuid.UUID, answer: Answer) -> None:
        """Keep the answer for replay (only if the claim is still ours)."""
        await self._database.execute(
            self._finish,
            {
                "scope": scope,
                "key": key,
                "claim_id": claim_id,
                "status": answer.status,
                "headers": dict(answer.headers),
                "body": answer.body,
            },
        )

    async def release(self, scope: str, key: str, claim_id: uuid.UUID) -> None:
        """Let go of the claim: nothing is kept, a retry runs again."""
        await self._database.execute(self._release, {"scope": scope, "key": key, "claim_id": claim_id})

    async def delete_expired(self, limit: int = CLEANUP_BATCH) -> int:
        """Delete up to `limit` keys older than the TTL; how many went."""
        return await self._database.execute(self._expire, {"ttl": self._ttl, "limit": limit})


IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)


def idempotency_ctx(
    table: Table,
    *,
    lease: float = LEASE_SECONDS,
    cleanup_every: float = CLEANUP_EVERY_SECONDS,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The store of `table` under `IDEMPOTENCY` (after the pool's context), and a task deleting
    expired keys every few minutes, a batch at a time (a backlog drains over the next rounds)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = app[IDEMPOTENCY] = IdempotencyStore(app[DATABASE], table, lease=lease)

        async def clean() -> None:
            while True:
                await asyncio.sleep(cleanup_every)
                try:
                    deleted = await store.delete_expired()
                except DatabaseUnavailable as error:
                    log.warning("expired idempotency keys not deleted: %s", error)
                else:
                    if deleted:
                        log.info("deleted %d expired idempotency keys", deleted)

        task = asyncio.create_task(clean(), name="idempotency-cleanup")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return ctx


# --- the HTTP side ---------------------------------------------------------------------------------

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])
Scope = Callable[[web.Request], str]


def by_subject(request: web.Request) -> str:
    """Keys of a user's requests: the access token's subject."""
    return request[CLAIMS].subject


def fixed(name: str) -> Scope:
    """Keys of requests without a caller yet (signup): the key alone, in one named scope."""
    return lambda _request: name


def _key_of(request: web.Request) -> str | None:
    values = request.headers.getall(KEY_HEADER, [])
    if not values:
        return None
    if len(values) == 1:
        key = values[0]
        if 1 <= len(key) <= MAX_KEY_LENGTH and all(" " <= char <= "~" for char in key):
            return key
    message = f"Must be one header of 1 to {MAX_KEY_LENGTH} printable ASCII characters."
    raise ValidationProblem("One or more fields are not valid.", errors={KEY_HEADER: [message]})


def _answer_of(response: web.StreamResponse) -> Answer | None:
    """What to keep of a response, or None when it cannot be replayed (a streamed body)."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None
    headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
    return Answer(response.status, headers, response.body)


def _replay(answer: Answer) -> web.Response:
    return web.Response(
        status=answer.status, body=answer.body, headers={**answer.headers, REPLAYED_HEADER: "true"}
    )


_KEY_PARAMETER = {
    "in": "header",
    "name": KEY_HEADER,
    "required": False,
    "description": (
        "Makes the request safe to retry for 24 hours: the same key and body get the first answer "
        "again (`Idempotent-Replayed: true`) and change nothing; another body answers 422 "
        "`idempotency_key_reused`, a retry while the first is still running 409 "
        "`idempotency_key_in_use`. Server errors (5xx) are not kept. A malformed key answers 422 "
        "`validation_failed`."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[ -~]+$"},
}
_REPLAYED = {
    REPLAYED_HEADER: {
        "description": "`true` when this is the kept answer to an earlier request with the same key",
        "schema": {"type": "string", "enum": ["true"]},
    }
}
_ERRORS = {409: "`idempotency_key_in_use`", 422: "`idempotency_key_reused`"}


def _document(apispec: dict[str, Any]) -> None:
    """The header parameter, the replay header on success answers, the 409 and 422 it may answer."""
    apispec["parameters"].append(copy.deepcopy(_KEY_PARAMETER))
    responses = apispec["responses"]
    for status, response in responses.items():
        if 200 <= int(status) < 300:
            response.setdefault("headers", {}).update(copy.deepcopy(_REPLAYED))
    for status, code in _ERRORS.items():
        if status not in responses:
            raise RuntimeError(f"document {status} with problem_responses() before @idempotent")
        entry = dict(responses[status])
        entry["description"] = f"{entry['description']} (also {code})"
        responses[status] = entry


def idempotent(scope: Scope) -> Callable[[Handler], Handler]:
    """Honour `Idempotency-Key` on a handler; apply it above the handler's other decorators."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            key = _key_of(request)
            if key is None:
                return await handler(request)
            store = request.app[IDEMPOTENCY]
            owner = scope(request)
            claimed = await store.claim(
                owner, key, fingerprint(request.method, request.path, await request.read())
            )
            if isinstance(claimed, Answer):
                return _replay(claimed)
            try:
                response = await handler(request)
            except Problem as problem:
                if problem.status >= 500:
                    await _let_go(store, owner, key, claimed)
                    raise
                # The client's error is the answer: keep it as the error middleware renders it.
                response = problem_response(
                    problem.status,
                    problem.code,
                    problem.title,
                    problem.detail,
                    errors=problem.errors,
                    headers=problem.headers,
                )
            except Exception:
                await _let_go(store, owner, key, claimed)
                raise
            answer = _answer_of(response)
            if answer is None or answer.status >= 500:
                await _let_go(store, owner, key, claimed)
                return response
            try:
                await store.finish(owner, key, claimed, answer)
            except DatabaseUnavailable as error:
                # Done but not kept: the claim stays running until its lease ends, then a retry runs.
                log.warning("idempotent answer not kept: %s", error)
            return response

        apispec = getattr(wrapper, API_SPEC_ATTR, None)
        if apispec is None:
            raise RuntimeError("apply @idempotent above the handler's @docs")
        _document(apispec)
        return wrapper  # type: ignore[return-value]

    return decorate


async def _let_go(store: IdempotencyStore, scope: str, key: str, claim_id: uuid.UUID) -> None:
    try:
        await store.release(scope, key, claim_id)
    except DatabaseUnavailable as error:
        # The lease frees the key later.
        log.warning("idempotency claim not released: %s", error)
