"""What the benchmark measures of the processes beside wrk's figures: CPU ticks from /proc (the
services, nginx, PostgreSQL's backends, redis-server), the event-loop lag histograms the services
expose, and /healthz latency sampled from threads (S8)."""

from __future__ import annotations

import contextlib
import http.client
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.perf import topology as topologies

HEALTHZ_INTERVAL = 0.05  # s between two /healthz samples on one auth port (~20/s)
HEALTHZ_TIMEOUT = 5.0
LAG_METRIC = "event_loop_lag_seconds"


# --- CPU and memory of the processes, through /proc ---------------------------------------------

Snapshot = dict[str, dict[int, int]]  # component -> pid -> CPU ticks


class ExternalProcesses:
    """The PostgreSQL backends of the benchmark's database (and the server's background processes),
    and redis-server, when they run on this machine; else not measured (said once)."""

    def __init__(self, database_url: str, redis_url: str, log: Callable[[str], None]) -> None:
        self.notes: list[str] = []
        self._log = log
        self._conn: Any = None
        self._redis_pid: int | None = None
        try:
            conn = psycopg2.connect(database_url, connect_timeout=5)
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                backend = int(cursor.fetchone()[0])
            # A backend of a server on this machine is a `postgres` process, the postmaster's child.
            if _comm(backend) == "postgres" and _comm(_parent(backend)) in ("postgres", "postmaster"):
                self._conn = conn
            else:
                conn.close()
                self.notes.append("postgres CPU not measured: the server does not run on this machine")
        except psycopg2.Error as error:
            self.notes.append(f"postgres CPU not measured: {error}".strip())
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
        try:
            pid = int(client.info("server")["process_id"])
            if _comm(pid) == "redis-server":
                self._redis_pid = pid
            else:
                self.notes.append("redis CPU not measured: the server does not run on this machine")
        except (redis.RedisError, KeyError, ValueError) as error:
            self.notes.append(f"redis CPU not measured: {error}")
        finally:
            client.close()
        for note in self.notes:
            log(note)

    def pids(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        if self._conn is not None:
            try:
                with self._conn.cursor() as cursor:
                    cursor.execute(
                        "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                        " AND (datname = current_database() OR backend_type <> 'client backend')"
                    )
                    found["postgres"] = [int(row[0]) for row in cursor.fetchall()]
            except psycopg2.Error as error:  # measured no more, said once; the benchmark goes on
                self.notes.append(f"postgres CPU no longer measured: {error}".strip())
                self._log(self.notes[-1])
                with contextlib.suppress(psycopg2.Error):
                    self._conn.close()
                self._conn = None
        if self._redis_pid is not None:
            found["redis"] = [self._redis_pid]
        return found

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def snapshot(groups: Mapping[str, Sequence[int]]) -> Snapshot:
    """CPU ticks of every pid, per component (pids that cannot be read are left out)."""
    taken: Snapshot = {}
    for name, pids in groups.items():
        ticks = {pid: value for pid in pids if (value := topologies.cpu_ticks(pid)) is not None}
        taken[name] = ticks
    return taken


def cpu_seconds(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each component used between two snapshots (a pid new in `after` counts from 0)."""
    used: dict[str, float] = {}
    for name, ticks in after.items():
        earlier = before.get(name, {})
        total = sum(max(0, value - earlier.get(pid, 0)) for pid, value in ticks.items())
        used[name] = total / topologies.CLOCK_TICKS
    return used


# --- event-loop lag and /healthz during S8 ------------------------------------------------------


def lag_buckets(url: str) -> dict[float, float] | None:
    """The cumulative counts of `event_loop_lag_seconds_bucket` by upper bound, None when absent."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5.0) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    buckets: dict[float, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for family in families:
        for sample in family.samples:
            if sample.name != f"{LAG_METRIC}_bucket" or "le" not in sample.labels:
                continue
            bound = float(sample.labels["le"])  # "+Inf" parses as inf
            buckets[bound] = buckets.get(bound, 0.0) + float(sample.value)
    return buckets or None


def lag_summary(before: Mapping[float, float], after: Mapping[float, float]) -> dict[str, float]:
    """p99 and max of the ticks observed between two scrapes, as the bucket's upper bound in ms
    (math.inf: beyond the last finite bound); empty when no tick was observed."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    total = deltas[-1] if bounds and bounds[-1] == math.inf else max(deltas, default=0.0)
    if total <= 0:
        return {}
    p99 = next(b for b, d in zip(bounds, deltas, strict=True) if d >= 0.99 * total)
    top = next(b for b, d in zip(bounds, deltas, strict=True) if d >= total)
    return {"p99_ms": p99 * 1000, "max_ms": top * 1000}


class HealthzSampler:
    """GET /healthz on each given origin every HEALTHZ_INTERVAL from a thread each; latencies in ms."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._sample, args=(origin,), name=f"healthz-{origin}", daemon=True)
            for origin in origins
        ]

    def __enter__(self) -> HealthzSampler:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HEALTHZ_TIMEOUT + 1)

    def _sample(self, origin: str) -> None:
        parts = urlsplit(origin)
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(
                        parts.hostname or "127.0.0.1", parts.port, timeout=HEALTHZ_TIMEOUT
                    )
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                elapsed = (time.perf_counter() - started) * 1000
                with self._lock:
                    if response.status == 200:
                        self.latencies.append(elapsed)
                    else:
                        self.failures.append(f"{origin}/healthz answered {response.status}")
            except (OSError, http.client.HTTPException) as error:
                with self._lock:
                    self.failures.append(f"{origin}/healthz: {type(error).__name__}: {error}")
                if connection is not None:
                    connection.close()
                connection = None
            self._stop.wait(max(0.0, HEALTHZ_INTERVAL - (time.perf_counter() - started)))
        if connection is not None:
            connection.close()

    def summary(self) -> dict[str, float]:
        values = sorted(self.latencies)
        if not values:
            return {}
        return {
            "p50": _percentile(values, 50),
            "p99": _percentile(values, 99),
            "max": values[-1],
        }


def _percentile(ordered: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
