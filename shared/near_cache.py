"""A small in-process cache in front of Redis, kept coherent by Redis itself (client-side caching).

One Redis GET through redis-py costs about 100 µs of CPU, three times what aiohttp spends serving
a request; the hottest read (a code by its owner's email) would pay it every time. So values read
from Redis are also kept here, and Redis tells this process when any client changes (or expires,
evicts, deletes) a key under the tracked prefix: `CLIENT TRACKING on BCAST PREFIX p NOLOOP` on a
connection of its own, whose RESP3 push messages evict the keys named. This process's own writes
evict locally (NOLOOP: Redis does not echo them).

The rules that keep it honest:
- It serves only while the tracking connection is up. When that connection fails, everything is
  dropped and nothing is served or kept until a new connection tracks again; a connection that
  answers nothing for `HEARTBEAT` seconds (pinged once) counts as failed.
- A value read from Redis, or from the database after a miss, is kept only if no invalidation
  arrived since the lookup began (a generation counter), so a read that raced a write cannot keep
  the old value. Redis also tells this process of its own writes; a write it announced
  (`expect_echo`) is not taken for someone else's change.
- Entries live `ttl` seconds at most, and at most `size` of them (the oldest go first).
Another process's change reaches this one as fast as Redis pushes it, about 0.1 ms on a local
network; a request that arrives in that window may still see the old value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

HEARTBEAT = 5.0
RETRY_SECONDS = 1.0
INVALIDATE = (b"invalidate", "invalidate")


class NearCache:
    """Values of keys under `prefix`, cached in process while Redis tracks them for us."""

    def __init__(self, redis: Redis, prefix: str, *, size: int, ttl: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._size = size
        self._ttl = ttl
        self._entries: dict[str, tuple[Any, float]] = {}
        # Writes of this process whose invalidation has not come back yet (Redis tells every
        # connection but the tracking one about them, so this process hears of its own writes).
        self._echoes: dict[str, int] = {}
        self.generation = 0
        self._tracking = False
        self._task: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None

    @property
    def enabled(self) -> bool:
        """Whether entries are served and kept now (the tracking connection is up)."""
        return self._tracking

    def get(self, key: str) -> Any:
        """The value kept for `key`, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] < time.monotonic() or not self._tracking:
            self._entries.pop(key, None)
            return None
        return entry[0]

    def put(self, key: str, value: Any, generation: int) -> None:
        """Keep `value`, read from Redis when the generation was `generation`, unless it changed since."""
        if not self._tracking or generation != self.generation or self._size <= 0:
            return
        if len(self._entries) >= self._size and key not in self._entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (value, time.monotonic() + self._ttl)

    def evict(self, keys: Iterable[str]) -> None:
        """Drop these keys (this process changed them, or Redis said someone did)."""
        self.generation += 1
        for key in keys:
            self._entries.pop(key, None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._echoes.clear()

    def expect_echo(self, key: str) -> None:
        """This process is about to write `key` and will keep what it wrote: its echo is no change."""
        self._echoes[key] = self._echoes.get(key, 0) + 1

    def cancel_echo(self, key: str) -> None:
        """The write announced with `expect_echo` did not happen."""
        left = self._echoes.get(key, 0) - 1
        if left > 0:
            self._echoes[key] = left
        else:
            self._echoes.pop(key, None)

    # --- the tracking connection -----------------------------------------------------------------

    def start(self) -> None:
        if self._size > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="near-cache-tracking")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._down()

    async def _down(self) -> None:
        self._tracking = False
        self.clear()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect(nowait=True)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._track()
            except (RedisError, OSError, TimeoutError) as error:
                if failures == 0 or self._tracking:
                    log.warning("near cache off until Redis tracks again: %s", type(error).__name__)
                failures += 1
            await self._down()
            await asyncio.sleep(RETRY_SECONDS)

    async def _track(self) -> None:
        pool = self._redis.connection_pool
        # Named after what it tracks (CLIENT LIST shows it; names cannot hold spaces).
        name = "near-cache:" + "".join(c if c.isalnum() or c in ":._-@" else "_" for c in self._prefix)
        kwargs = {**pool.connection_kwargs, "protocol": 3, "socket_timeout": None, "client_name": name}
        connection = pool.connection_class(**kwargs)
        # redis-py hands invalidation pushes to this handler (left unset, it drops them).
        parser: Any = connection._parser
        parser.set_invalidation_push_handler(self._pushed)
        self._connection = connection
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_command("CLIENT", "TRACKING", "on", "BCAST", "PREFIX", self._prefix, "NOLOOP")
        reply = await connection.read_response(timeout=HEARTBEAT)
        if reply not in (b"OK", "OK"):
            raise RedisError(f"CLIENT TRACKING answered {reply!r}")
        self.clear()
        self._tracking = True
        log.info("near cache on: Redis tracks %s*", self._prefix)
        pinged = False
        while True:
            message = await connection.read_response(timeout=HEARTBEAT, push_request=True)
            if message is None:  # nothing for a heartbeat: a quiet connection may be a dead one
                if pinged:
                    raise TimeoutError("the tracking connection did not answer a PING")
                await connection.send_command("PING")
                pinged = True
                continue
            pinged = False  # an invalidation (handled in `_pushed`) or the PONG

    async def _pushed(self, message: Any) -> bool:
        self._invalidated(message)
        return True

    def _invalidated(self, message: Any) -> None:
        if not isinstance(message, list) or len(message) != 2 or message[0] not in INVALIDATE:
            return  # a PONG, or a push of another kind
        keys = message[1]
        if keys is None:  # FLUSHDB / FLUSHALL
            self.clear()
            return
        changed = []
        for raw in keys:
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if key in self._echoes:
                self.cancel_echo(key)  # this process's own write, already accounted for
            else:
                changed.append(key)
        if changed:
            self.evict(changed)
