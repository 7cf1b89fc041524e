"""The embedded PostgreSQL and Redis used by `make run` start, answer, stop without leftovers, and restart."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest
import redis

from deploy.local.embedded import EmbeddedServer, process_alive, start_postgres, start_redis
from shared.resources import close_redis_cache, redis_cache

pytestmark = pytest.mark.timeout(60)


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (PostgreSQL's checkpointer, walwriter, ...)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def _query(server: EmbeddedServer, sql: str) -> list[tuple[object, ...]]:
    connection = psycopg2.connect(server.url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def test_postgres_and_redis_answer_then_stop_without_leftovers(tmp_path: Path) -> None:
    postgres = start_postgres(tmp_path / "postgres")
    try:
        assert postgres.url.startswith("postgresql://postgres@")
        assert _query(postgres, "SELECT 1") == [(1,)]
        processes = {postgres.pid, *_children(postgres.pid)}
        assert len(processes) > 1

        with start_redis(tmp_path / "redis") as server:
            assert server.url.startswith("unix://")
            client = redis.Redis.from_url(server.url)
            try:
                client.set("greeting", "hello")
                assert client.get("greeting") == b"hello"
            finally:
                client.close()
            redis_pid = server.pid
            assert server.running
        assert not server.running
        assert not process_alive(redis_pid)
    finally:
        postgres.stop()

    assert not postgres.running
    assert [pid for pid in processes if process_alive(pid)] == []
    postgres.stop()  # a second stop does nothing


def test_redis_stops_even_with_clients_connected(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping()
        server.stop()
        assert not process_alive(server.pid)
    finally:
        client.close()
        server.stop()


def test_postgres_restarts_on_existing_data(tmp_path: Path) -> None:
    with start_postgres(tmp_path / "postgres") as first:
        _query(first, "CREATE TABLE kept (value text)")
        _query(first, "INSERT INTO kept VALUES ('still here')")
    assert not first.running

    with start_postgres(tmp_path / "postgres") as second:
        assert second.pid != first.pid
        assert _query(second, "SELECT value FROM kept") == [("still here",)]
    assert not second.running


async def test_the_aiocache_stores_work_on_the_embedded_redis_socket(tmp_path: Path) -> None:
    """`make run`'s Redis is a unix socket: the aiocache stores (OAuth states, email verdicts) use it too."""
    with start_redis(tmp_path / "redis") as server:
        cache = redis_cache(server.url, timeout=2)
        try:
            await cache.set("key", {"a": 1}, ttl=60, namespace="ns")
            assert await cache.get("key", namespace="ns") == {"a": 1}
        finally:
            await close_redis_cache(cache)
