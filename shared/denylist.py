"""Erased subjects whose access tokens are refused at once, before they expire: the deny-list.

An erased account's access tokens stay cryptographically valid until they expire (15 minutes). Both
services refuse them from the moment the erasure answers 204, on every replica, without a Redis round
trip on the hot path of authenticated requests:

- **The entry.** A subject is kept as the SHA-256 of its id (no table or key names the person) in a
  Redis sorted set, scored with the time the longest token it could hold has expired, and in the
  service's own table (`<schema>.erased_subjects`): the auth service writes it in the erasure's
  transaction, the referral service when the auth service's `DELETE /internal/v1/users/{id}` reaches
  it. The eraser writes the Redis entry (`deny`) before it answers.
- **The mirror.** Every process keeps the set in memory and checks a token's subject with one set
  lookup (`is_denied`: a hash and a `in`, about 1 µs). A connection of its own subscribes to the
  deny-list's channel; the eraser publishes each new entry there and waits until every subscriber
  Redis delivered it to has acknowledged it (each applies it, then answers on the eraser's own
  channel).
- **"At once", deterministically.** A process trusts its mirror only until `validity` seconds after it
  last *sent* a PING on the subscription that was answered. Redis answers a PING on a connection
  after every message published to it before, and the process reads them in order: a PONG for a
  PING sent after a publish therefore means the entry was applied. So when a subscriber does not
  acknowledge (a silent network cut, a stalled process), the eraser waits `validity` seconds: by then
  the laggard's mirror has lapsed unless it applied the entry. A process whose mirror has lapsed (its
  subscription down, Redis gone, still starting) asks on every request instead: Redis and its own
  table (`_slow`), denied when either says so; with Redis down, its table alone; with both down the
  request fails (503): never open.
- **Redis down at the erasure.** The entry is then only in the tables: the auth service's at once,
  the referral service's when the outbox has delivered (an erasure tries that at once as well). When
  the subscription comes back, each process first writes its table's live entries into Redis, then
  loads the set, then trusts its mirror again: an entry the outage kept from Redis is never lost.

Only users' tokens are checked: service tokens (the referral service's internal API) are verified by a
verifier of their own, whose audience and scope only the auth service's signature vouches for, and
which has no deny-list: a service is never erased, and internal calls never wait on (or fail with) it.

The table's rows are kept after the tokens expired (only the unexpired ones are read): in the
referral service the digest also stops a link or a notice that was already on its way from bringing
an erased id back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    Table,
    bindparam,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from shared.db import Connection, Database, DatabaseUnavailable, prepare

log = logging.getLogger(__name__)

VALIDITY = 3.0  # seconds a mirror is trusted after the last answered PING was sent
PING_EVERY = 1.0
RETRY_SECONDS = 1.0
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


def erased_subjects_table(metadata: MetaData) -> Table:
    """The `erased_subjects` table of a service's schema (its migration creates it)."""
    table = Table(
        "erased_subjects",
        metadata,
        Column("subject_digest", LargeBinary, primary_key=True),
        Column("erased_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("tokens_expire_at", DateTime(timezone=True), nullable=False),
        CheckConstraint("octet_length(subject_digest) = 32", name="erased_subjects_digest_length"),
    )
    Index("erased_subjects_by_expiry", table.c.tokens_expire_at)
    return table


def subject_digest(subject: str | uuid.UUID) -> bytes:
    """What the deny-list keeps of a subject: its SHA-256, never the id itself."""
    return hashlib.sha256(str(subject).encode()).digest()


class DenyListStatements:
    """The statements over one service's `erased_subjects` table (subject_digest, tokens_expire_at)."""

    def __init__(self, table: Table) -> None:
        self.record = prepare(
            pg_insert(table)
            .values(subject_digest=bindparam("digest"), tokens_expire_at=bindparam("expires_at"))
            .on_conflict_do_update(
                index_elements=[table.c.subject_digest],
                set_={"tokens_expire_at": func.greatest(table.c.tokens_expire_at, bindparam("expires_at"))},
            )
        )
        self.live = prepare(
            select(table.c.subject_digest, table.c.tokens_expire_at).where(
                table.c.tokens_expire_at > func.now()
            )
        )
        self.denied = prepare(
            select(table.c.subject_digest).where(
                table.c.subject_digest == bindparam("digest"), table.c.tokens_expire_at > func.now()
            )
        )
        self.ever = prepare(
            select(table.c.subject_digest).where(table.c.subject_digest == bindparam("digest"))
        )

    async def record_in(self, conn: Connection, subject: str | uuid.UUID, expires_at: datetime) -> None:
        """Record the subject in the caller's transaction (idempotent; a later expiry wins)."""
        await conn.execute(self.record, {"digest": subject_digest(subject), "expires_at": expires_at})

    async def was_erased(self, conn: Connection | Database, subject: str | uuid.UUID) -> bool:
        """Whether the subject was ever erased here (expired entries too)."""
        return await conn.fetch_one(self.ever, {"digest": subject_digest(subject)}) is not None


async def _close(pubsub: PubSub) -> None:
    close: Callable[[], Awaitable[None]] = pubsub.aclose  # redis-py leaves it unannotated
    await close()


def _score(when: datetime) -> float:
    return when.timestamp()


class DenyList:
    """Erased subjects: written by `deny`, read by `is_denied` (shared/tokens.py calls it)."""

    def __init__(
        self,
        redis: Redis,
        database: Database,
        statements: DenyListStatements,
        *,
        prefix: str,
        validity: float = VALIDITY,
        ping_every: float = PING_EVERY,
    ) -> None:
        self._redis = redis
        self._db = database
        self._statements = statements
        self._key = f"{prefix}erased-subjects"
        self._channel = f"{prefix}erased-subjects:new"
        self._validity = validity
        self._ping_every = min(ping_every, validity / 3)
        self._entries: set[bytes] = set()
        self._valid_until = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def mirrored(self) -> bool:
        """Whether `is_denied` answers from memory now (the subscription is up and answering)."""
        return time.monotonic() < self._valid_until

    async def is_denied(self, subject: str) -> bool:
        """Whether tokens of this subject are refused. From memory while the mirror is trusted; else
        from Redis and the service's table (a database error propagates: never open)."""
        digest = subject_digest(subject)
        if time.monotonic() < self._valid_until:
            return digest in self._entries
        return await self._slow(digest)

    async def _slow(self, digest: bytes) -> bool:
        try:
            score = await self._redis.zscore(self._key, digest)
        except _REDIS_ERRORS:
            score = None  # Redis cannot say: the table decides alone
        else:
            if score is not None and score > time.time():
                return True
        return await self._db.fetch_one(self._statements.denied, {"digest": digest}) is not None

    async def deny(self, subject: str | uuid.UUID, expires_at: datetime) -> bool:
        """Refuse the subject's tokens until `expires_at` on every process, before this returns.

        The entry is written to Redis and published; this waits until every subscriber acknowledged
        it, or `validity` seconds (then every mirror that did not apply it has lapsed). False when
        Redis could not be written (the caller's table holds the entry: see the module docstring).
        """
        digest = subject_digest(subject)
        self._entries.add(digest)
        ack_channel = f"{self._channel}:ack:{uuid.uuid4()}"
        acks = self._redis.pubsub()
        try:
            await acks.subscribe(ack_channel)
            await self._redis.zadd(self._key, {digest: _score(expires_at)})
            receivers = int(await self._redis.publish(self._channel, digest.hex() + " " + ack_channel))
            deadline = time.monotonic() + self._validity
            acknowledged = 0
            while acknowledged < receivers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                message = await acks.get_message(ignore_subscribe_messages=True, timeout=remaining)
                if message is not None and message.get("type") == "message":
                    acknowledged += 1
            if acknowledged < receivers:
                log.warning(
                    "deny-list: %d of %d processes did not acknowledge; waited until their mirrors lapsed",
                    receivers - acknowledged,
                    receivers,
                )
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        except _REDIS_ERRORS as error:
            log.warning(
                "deny-list: Redis not written (%s); the database keeps the entry", type(error).__name__
            )
            return False
        finally:
            with contextlib.suppress(*_REDIS_ERRORS):
                await _close(acks)
        return True

    # --- the mirror ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="deny-list-mirror")

    async def stop(self) -> None:
        self._stopping = True
        self._valid_until = float("-inf")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            pubsub = self._redis.pubsub()
            try:
                await self._follow(pubsub)
            except (*_REDIS_ERRORS, DatabaseUnavailable) as error:
                if failures == 0:
                    log.warning("deny-list mirror off, checking per request: %s", type(error).__name__)
                failures += 1
            else:
                failures = 0
            finally:
                self._valid_until = float("-inf")
                with contextlib.suppress(*_REDIS_ERRORS):
                    await _close(pubsub)
            await asyncio.sleep(RETRY_SECONDS)

    async def _load(self) -> None:
        """Push the table's live entries into Redis (an outage may have kept them out), then read all."""
        rows = await self._db.fetch_all(self._statements.live)
        own = {bytes(row["subject_digest"]): _score(row["tokens_expire_at"]) for row in rows}
        if own:
            # GT: never shorten an entry Redis has with a later expiry.
            await self._redis.zadd(self._key, own, gt=True)
        now = time.time()
        await self._redis.zremrangebyscore(self._key, "-inf", now)
        members: Iterable[Any] = await self._redis.zrangebyscore(self._key, now, "+inf")
        self._entries = {bytes(m) for m in members} | set(own)

    async def _follow(self, pubsub: PubSub) -> None:
        await pubsub.subscribe(self._channel)
        await self._load()  # after subscribing: an entry published meanwhile is in one or the other
        ping_sent: float | None = None
        next_ping = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if ping_sent is None and now >= next_ping:
                ping_sent = now
                await pubsub.ping()
            elif ping_sent is not None and now - ping_sent > self._validity:
                raise TimeoutError("the subscription did not answer a PING")
            wait = max(0.01, (next_ping if ping_sent is None else ping_sent + self._validity) - now)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "pong" and ping_sent is not None:
                # Everything published before this PING reached Redis was read before its answer.
                self._valid_until = ping_sent + self._validity
                ping_sent = None
                next_ping = time.monotonic() + self._ping_every
            elif kind == "message":
                await self._apply(message.get("data"))

    async def _apply(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        digest_hex, _, ack_channel = text.partition(" ")
        try:
            self._entries.add(bytes.fromhex(digest_hex))
        except ValueError:
            return
        if ack_channel:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.publish(ack_channel, b"1")


def tokens_expire_at(now: datetime | None, lifetime: timedelta) -> datetime:
    """When the longest token issued up to `now` has expired (lifetime includes leeway and margin)."""
    return (now or datetime.now(UTC)) + lifetime
