"""How late the event loop runs a timer: the `event_loop_lag_seconds` histogram of /metrics.

A callback is scheduled every `interval`; the time between when it was due and when it ran is how
long the loop was busy with something else (a handler computing, a blocking call). Anything that
stalls the loop for 20 ms shows up here as a 20 ms sample, whatever request caused it. It costs
about 1 µs of CPU per tick (100 ticks a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram

LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DEFAULT_INTERVAL = 0.01


class LoopLagMonitor:
    """Observe the loop's lag every `interval` seconds while started."""

    def __init__(self, registry: CollectorRegistry, *, interval: float = DEFAULT_INTERVAL) -> None:
        self._histogram = Histogram(
            "event_loop_lag_seconds",
            "How late the event loop ran a timer due every 10 ms",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._observe = self._histogram.observe
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._observe(max(0.0, now - self._due))
        self._schedule(now)


def loop_lag_ctx(registry: CollectorRegistry) -> Callable[[web.Application], AsyncIterator[None]]:
    """Measure the loop's lag while the application runs."""

    async def ctx(_: web.Application) -> AsyncIterator[None]:
        monitor = LoopLagMonitor(registry)
        monitor.start()
        try:
            yield
        finally:
            monitor.stop()

    return ctx
