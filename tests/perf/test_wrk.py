"""The wrk driver against a tiny aiohttp server that records every request it is sent.

wrk is a real subprocess (run through asyncio.to_thread, so that the server keeps serving on the
test's loop); each run lasts 1 s. Without wrk these tests fail with the install hint.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.perf.wrk import (
    INSTALL_HINT,
    Request,
    WrkError,
    WrkResult,
    decode_request,
    encode_request,
    read_requests,
    refresh_args,
    refresh_script,
    requests_args,
    requests_script,
    run_wrk,
    write_requests,
    write_tokens,
)

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
Seen = tuple[str, str, tuple[tuple[str, str], ...], str]

TOKEN_PATH = "/api/v1/auth/token"


@dataclass
class Recorder:
    """What the server was sent: (method, path+query, the recorded headers, body) -> count."""

    headers: tuple[str, ...] = ("Authorization", "X-Odd", "Content-Type")
    seen: Counter[Seen] = field(default_factory=Counter)
    content_lengths: Counter[tuple[str, str | None]] = field(default_factory=Counter)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        kept = tuple((name, request.headers[name]) for name in self.headers if name in request.headers)
        self.seen[(request.method, request.path_qs, kept, body)] += 1
        self.content_lengths[(request.method, request.headers.get("Content-Length"))] += 1
        status = 404 if request.path.startswith("/missing") else 200
        return web.Response(status=status, text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def seen_as(request: Request, recorded: Sequence[str] = Recorder.headers) -> Seen:
    kept = tuple((name, request.headers[name]) for name in recorded if name in request.headers)
    return (request.method, request.path, kept, request.body)


async def wrk(server: TestServer, script: Path, args: list[str], connections: int = 4) -> WrkResult:
    url = f"http://{server.host}:{server.port}"
    return await asyncio.to_thread(
        run_wrk, url, script, duration=1, connections=connections, threads=2, args=args, timeout_s=5
    )


ODD_BODY = 'line one\tand a tab\nline two: "ünïcödé" ✓ 100% %41 %%\r\n+&=?#'
REQUESTS = [
    Request("GET", "/api/v1/referral/codes?email=a%40example.com"),
    Request(
        "POST",
        "/api/v1/referral/referrals",
        {"Authorization": "Bearer abc.def-ghi", "Content-Type": "application/json"},
        json.dumps({"code": "c\t1", "note": "ünï"}, ensure_ascii=False),
    ),
    Request("POST", "/echo?x=%20y", {"X-Odd": "tab\there %41 : ünï, 100%"}, ODD_BODY),
    Request("POST", "/empty", {"Authorization": "Bearer t"}),
]


def test_request_lines_round_trip(tmp_path: Path) -> None:
    file = tmp_path / "requests.txt"
    assert write_requests(file, REQUESTS) == len(REQUESTS)
    assert read_requests(file) == REQUESTS
    for request in REQUESTS:
        line = encode_request(request)
        assert line.count("\t") == 2 + 2 * len(request.headers)  # tabs only between fields
        assert "\n" not in line
        assert " " not in line
        assert line.isascii()
        assert decode_request(line) == request


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request("GE T", "/"), "method"),
        (Request("GET", "no-slash"), "path"),
        (Request("GET", "/a b"), "path"),
        (Request("GET", "/ü"), "path"),
        (Request("GET", "/", {"Bad Name": "x"}), "header name"),
        (Request("GET", "/", {"X-A": "one\r\nX-B: two"}), "CR, LF"),
        (Request("POST", "/", {"Content-Length": "3"}), "added by wrk"),
        (Request("GET", "/", {"host": "elsewhere"}), "added by wrk"),
    ],
)
def test_requests_that_cannot_be_sent_are_refused(request_: Request, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_request(request_)


async def test_requests_lua_sends_exactly_the_lines_of_the_file(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    file = tmp_path / "requests.txt"
    write_requests(file, REQUESTS)

    result = await wrk(server, requests_script(), requests_args(file))

    assert set(recorder.seen) == {seen_as(r) for r in REQUESTS}
    assert result.requests > 100
    assert sum(recorder.seen.values()) >= result.requests
    # No body, no Content-Length on the GET; an empty POST says Content-Length: 0.
    assert {length for method, length in recorder.content_lengths if method == "GET"} == {None}
    assert recorder.content_lengths[("POST", "0")] == recorder.seen[seen_as(REQUESTS[3])]
    assert result.errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}
    assert result.expect is None
    assert result.unexpected == {}
    assert result.exhausted == 0
    assert result.failed == 0
    assert 0.9 < result.duration_s < 3
    assert result.rps == pytest.approx(result.requests / result.duration_s)
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms


async def test_once_never_sends_a_line_twice(tmp_path: Path, aiohttp_server: ServerFactory) -> None:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    file = tmp_path / "once.txt"
    lines = 50_000  # several times what 1 s can send
    write_requests(file, (Request("POST", f"/line/{i}", body=f"{i}") for i in range(lines)))

    result = await wrk(server, requests_script(), requests_args(file, mode="once"))

    assert result.requests > 100
    assert max(recorder.seen.values()) == 1
    assert result.exhausted == 0
    # Each thread starts at the start of its slice (thread 1: lines 0, 2, ...; thread 2: 1, 3, ...):
    # the request wrk asks thread 1 for only to check its syntax took no line.
    sent = sorted(int(path.rsplit("/", 1)[1]) for _, path, _, _ in recorder.seen)
    assert sent[:2] == [0, 1]
    for parity in (0, 1):
        mine = [i for i in sent if i % 2 == parity]
        assert mine == list(range(parity, 2 * len(mine), 2)), "a thread skipped one of its lines"


async def test_once_counts_the_requests_sent_after_the_file_ran_out(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    file = tmp_path / "once.txt"
    lines = 20
    write_requests(file, (Request("GET", f"/line/{i}") for i in range(lines)))

    result = await wrk(server, requests_script(), requests_args(file, mode="once"), connections=2)

    assert len(recorder.seen) == lines  # every line was sent
    total = sum(recorder.seen.values())
    assert result.exhausted > 100
    # Every request past the 20 lines is counted (give or take the ones in flight at the end).
    assert abs(total - (lines + result.exhausted)) <= 2
    assert result.failed == 0  # reuses are counted apart: the report must show them as problems


async def test_expect_counts_every_other_status(tmp_path: Path, aiohttp_server: ServerFactory) -> None:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    file = tmp_path / "requests.txt"
    write_requests(
        file, [Request("GET", "/missing/a"), Request("GET", "/found"), Request("GET", "/missing/b")]
    )

    result = await wrk(server, requests_script(), requests_args(file, expect=404))

    found = sum(n for (_, path, _, _), n in recorder.seen.items() if path == "/found")
    assert result.expect == 404
    assert set(result.unexpected) == {"200"}
    assert found - 4 <= result.unexpected["200"] <= found
    assert result.errors["status"] == result.requests - result.unexpected["200"]  # wrk's: the 404s
    assert result.failed == result.unexpected["200"]

    plain = await wrk(server, requests_script(), requests_args(file))
    assert plain.expect is None
    assert plain.unexpected == {}
    assert plain.failed == plain.errors["status"] > 0


@dataclass
class TokenServer:
    """A refresh grant that rotates: each token works once and the answer holds the next."""

    valid: set[str]
    issued: itertools.count[int] = field(default_factory=itertools.count)
    granted: int = 0
    reused: int = 0
    malformed: int = 0

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if (
            request.content_type != "application/x-www-form-urlencoded"
            or form.get("grant_type") != "refresh_token"
            or len(form) != 2
        ):
            self.malformed += 1
            return web.json_response({"error": "invalid_request"}, status=400)
        token = form.get("refresh_token")
        if not isinstance(token, str) or token not in self.valid:
            self.reused += 1
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.valid.discard(token)
        fresh = f"r+{next(self.issued)}/x=="  # +, / and = must be form-encoded on the way back
        self.valid.add(fresh)
        self.granted += 1
        return web.json_response(
            {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 900, "refresh_token": fresh}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(TOKEN_PATH, self.token)
        return app


async def test_refresh_lua_chains_each_token_once(tmp_path: Path, aiohttp_server: ServerFactory) -> None:
    tokens = [f"seed-{i}" for i in range(32)]  # 2 threads x 4 connections: 16 a thread, 4x enough
    tokens_server = TokenServer(valid=set(tokens))
    server = await aiohttp_server(tokens_server.app())
    file = tmp_path / "tokens.txt"
    assert write_tokens(file, tokens) == 32

    result = await wrk(server, refresh_script(), refresh_args(file, path=TOKEN_PATH), connections=8)

    assert tokens_server.malformed == 0
    assert tokens_server.reused == 0
    assert result.requests > 100
    assert tokens_server.granted - 8 <= result.requests <= tokens_server.granted
    assert result.expect == 200
    assert result.unexpected == {}
    assert result.exhausted == 0
    assert result.failed == 0


async def test_refresh_lua_counts_refused_tokens(tmp_path: Path, aiohttp_server: ServerFactory) -> None:
    tokens_server = TokenServer(valid=set())  # every token is refused: the chain stops at once
    server = await aiohttp_server(tokens_server.app())
    file = tmp_path / "tokens.txt"
    write_tokens(file, [f"stale-{i}" for i in range(8)])

    result = await wrk(server, refresh_script(), refresh_args(file, path=TOKEN_PATH), connections=4)

    # 8 refused tokens; then each connection goes on with a token the server cannot know.
    assert result.unexpected == {"400": result.requests}
    assert result.exhausted >= result.requests - 8
    assert result.failed == result.requests


def test_tokens_are_one_a_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        write_tokens(tmp_path / "t.txt", ["ok", "has space"])


async def test_a_lua_error_fails_loudly(tmp_path: Path, aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(Recorder().app())
    with pytest.raises(WrkError, match=r"(?s)exited with.*cannot open .*absent\.txt"):
        await wrk(server, requests_script(), requests_args(tmp_path / "absent.txt"))


def test_missing_wrk_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WrkError, match="apt-get install -y wrk"):
        run_wrk("http://127.0.0.1:9", requests_script(), duration=1, connections=1, threads=1)
    assert INSTALL_HINT == "apt-get install -y wrk"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"duration": 1.5, "connections": 2, "threads": 1}, "whole seconds"),
        ({"duration": 1, "connections": 3, "threads": 2}, "multiple of threads"),
        ({"duration": 1, "connections": 2, "threads": 1, "args": ["threads=3"]}, "threads="),
    ],
)
def test_run_wrk_refuses_settings_wrk_would_bend(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_wrk("http://127.0.0.1:9", requests_script(), **settings)
