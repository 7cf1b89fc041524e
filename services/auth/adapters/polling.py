"""The polling loop of the vendor APIs that answer 202 while they work (Hunter, Clearbit): ask, and
while the answer is 202 wait and ask again, up to a number of attempts.

A timeout or a connection error ends the loop with `Unreachable` and a short reason built from the
exception's type only (never its text: it can carry a URL with an API key in its query).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

B = TypeVar("B")
PENDING = 202


@dataclass(frozen=True, slots=True)
class Unreachable:
    """No answer: `timeout` or `connection_error:<exception type>`."""

    reason: str


async def poll_while_pending(
    ask: Callable[[], Awaitable[tuple[int, B]]], *, attempts: int, interval: float
) -> tuple[int, B] | Unreachable:
    """The first answer (status, body) that is not 202, or the last one; Unreachable when a call fails.

    Other exceptions of `ask` (an unreadable body) end the loop and reach the caller.
    """
    attempts = max(1, attempts)
    for attempt in range(1, attempts + 1):
        try:
            status, body = await ask()
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            return Unreachable("timeout")
        except aiohttp.ClientError as error:
            return Unreachable(f"connection_error:{type(error).__name__}")
        if status != PENDING or attempt == attempts:
            return status, body
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")


def failure_reason(status: int, known: Mapping[int, str]) -> str:
    """Why an HTTP status gave no answer: the vendor's documented reason, else server_error or http_<n>."""
    return known.get(status) or ("server_error" if status >= 500 else f"http_{status}")
