"""argon2id password hashing, run on a small thread pool so the event loop never waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread (and the threads libargon2 starts from it) yield the CPU to others.

    Linux schedules threads, each with its own nice value, so a hashing thread at nice 10 leaves
    the event loop's thread (nice 0) all the CPU it needs: a burst of logins on a small machine
    no longer delays every other request by a hash's duration.
    """
    if nice > 0:
        with contextlib.suppress(OSError):  # not permitted here: normal priority, still correct
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class PasswordHasher:
    """Hash and verify off the loop; `verify_dummy` costs the same as a real check (unknown users)."""

    def __init__(
        self, executor: ThreadPoolExecutor, *, time_cost: int, memory_kib: int, parallelism: int
    ) -> None:
        self._executor = executor
        self._argon2 = Argon2Hasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._dummy_hash: str | None = None

    async def _run(self, fn: object, *args: str) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)  # type: ignore[arg-type]

    async def hash(self, password: str) -> str:
        return str(await self._run(self._argon2.hash, password))

    def _verify_sync(self, password_hash: str, password: str) -> bool:
        try:
            return self._argon2.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, password_hash: str, password: str) -> bool:
        return bool(await self._run(self._verify_sync, password_hash, password))

    async def warm_up(self) -> None:
        """Make the dummy hash at startup, so the first unknown-email login is not slower."""
        self._dummy_hash = await self.hash(secrets.token_urlsafe(16))

    async def verify_dummy(self, password: str) -> None:
        """Spend one verification's time on a hash nobody has, so unknown emails are not faster."""
        if self._dummy_hash is None:
            await self.warm_up()
        assert self._dummy_hash is not None
        await self.verify(self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._argon2.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
