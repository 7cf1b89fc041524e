"""The access log: one JSON line per request, the path without its query, written in batches."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from shared import logs
from shared.logs import JsonAccessLogger, configure_logging, flush_access_log


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("referral", "INFO")
    buffer = io.StringIO()
    root.handlers[0].stream = buffer  # type: ignore[attr-defined]
    yield buffer
    flush_access_log()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def log_one(path: str, status: int = 200) -> None:
    request = make_mocked_request("GET", path, headers={"X-Request-ID": "req-1"})
    response = web.Response(status=status)
    response.headers["X-Request-ID"] = "req-1"
    JsonAccessLogger(logging.getLogger("aiohttp.access"), "").log(request, response, 0.0123)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_line_has_the_fields_and_no_query(stream):
    log_one("/api/v1/referral/codes?email=jane@example.com&token=secret", 404)
    flush_access_log()
    [entry] = lines(stream)
    assert entry["path"] == "/api/v1/referral/codes"
    assert "secret" not in stream.getvalue() and "jane" not in stream.getvalue()
    assert entry["status"] == 404 and entry["method"] == "GET"
    assert entry["request_id"] == "req-1" and entry["service"] == "referral"
    assert entry["message"] == "GET /api/v1/referral/codes 404"
    assert entry["level"] == "info" and entry["logger"] == "aiohttp.access"
    assert entry["duration_ms"] == 12.3
    assert str(entry["time"]).endswith("Z")


async def test_lines_are_written_within_the_flush_interval(stream):
    log_one("/a")
    assert stream.getvalue() == ""  # batched...
    deadline = asyncio.get_running_loop().time() + logs.ACCESS_FLUSH_SECONDS + 1.0
    while not lines(stream):  # ...and written soon
        assert asyncio.get_running_loop().time() < deadline, (
            "the line was not written after the flush interval"
        )
        await asyncio.sleep(0.01)
    assert [entry["path"] for entry in lines(stream)] == ["/a"]


async def test_a_full_batch_is_written_at_once(stream):
    for n in range(logs.ACCESS_BATCH_LINES):
        log_one(f"/n/{n}")
    assert len(lines(stream)) == logs.ACCESS_BATCH_LINES


async def test_a_records_other_loggers_write_stay_whole_lines(stream):
    log_one("/a")
    logging.getLogger("x").warning("something")
    log_one("/b")
    flush_access_log()
    assert {entry["message"] for entry in lines(stream)} >= {"something", "GET /a 200", "GET /b 200"}
