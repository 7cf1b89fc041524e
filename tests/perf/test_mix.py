"""The mix (tests/perf/mix.py): the Zipf lookups, the mix file and mix.lua (real wrk against a tiny
aiohttp server, 1 s runs), and what is read from the services' metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from deploy.local.processes import AUTH_API, REFERRAL_API
from tests.perf import bench, mix, scenarios
from tests.perf.dataset import user_email
from tests.perf.wrk import Request, WrkResult, run_wrk, write_tokens

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


# --- the Zipf distribution and the lookup universe -------------------------------------------------


def test_zipf_ranks_follow_the_power_law() -> None:
    zipf = mix.Zipf(1000, exponent=1.0)
    harmonic = sum(1 / r for r in range(1, 1001))
    assert zipf.probability(0) == pytest.approx(1 / harmonic)
    assert zipf.probability(0) / zipf.probability(1) == pytest.approx(2.0)
    assert zipf.probability(9) / zipf.probability(99) == pytest.approx(10.0)

    samples = Counter(zipf.sample(random.Random(1), 200_000))
    assert min(samples) >= 0 and max(samples) < 1000
    for rank in (0, 1, 2, 9, 99):
        assert samples[rank] / 200_000 == pytest.approx(zipf.probability(rank), rel=0.06), rank
    # The head is popular, the tail long: the top 1 % of ranks take about 39 % of the draws.
    top = sum(samples[r] for r in range(10)) / 200_000
    assert top == pytest.approx(sum(1 / r for r in range(1, 11)) / harmonic, abs=0.01)
    assert len(samples) > 900  # most ranks are drawn at least once


def test_a_steeper_exponent_concentrates_the_draws() -> None:
    flat = Counter(mix.Zipf(1000, exponent=0.5).sample(random.Random(2), 50_000))
    steep = Counter(mix.Zipf(1000, exponent=1.5).sample(random.Random(2), 50_000))
    assert steep[0] > 3 * flat[0]
    assert len(steep) < len(flat)


def test_the_universe_has_a_million_distinct_emails_at_least() -> None:
    small = mix.LookupUniverse(1000, user_email)
    assert small.known == 1000
    assert small.size >= mix.MIN_UNIVERSE
    # The known ranks map onto every user once (a permutation, not the dataset's order).
    indexes = [small.known_index(rank) for rank in range(1000)]
    assert sorted(indexes) == list(range(1000))
    assert indexes[:10] != list(range(10))
    # Unknown emails: one per rank, none a user's.
    assert len({mix.unknown_email(rank) for rank in range(0, small.unknown, 997)}) == len(
        range(0, small.unknown, 997)
    )
    assert not mix.unknown_email(small.unknown - 1).endswith("@example.com")
    # Users enough to fill the universe: still MIN_UNKNOWN unknown ones.
    big = mix.LookupUniverse(2_000_000, user_email, exponent=0.9)
    assert big.unknown == mix.MIN_UNKNOWN
    assert big.size == 2_100_000


def test_a_tenth_of_the_lookups_are_of_unknown_emails() -> None:
    rng = random.Random(3)
    kinds = mix.draw_kinds(rng, 200_000)
    counts = Counter(kinds)
    lookups = counts["lookup-known"] + counts["lookup-unknown"]
    assert counts["lookup-unknown"] / lookups == pytest.approx(mix.UNKNOWN_SHARE, abs=0.005)
    for kind in mix.KINDS:
        assert counts[kind.key] / len(kinds) == pytest.approx(kind.share, abs=0.003), kind.key
    assert sum(kind.share for kind in mix.KINDS) == pytest.approx(1.0)


# --- the mix file ------------------------------------------------------------------------------------


def inputs(activations: int = 100) -> mix.MixInputs:
    return mix.MixInputs(
        universe=mix.LookupUniverse(500, user_email),
        readers=[(f"user-{n}", f"token-{n}") for n in range(5)],
        activations=[(f"activator-{n}", f"CODE{n}") for n in range(activations)],
        signup_tag="t1",
    )


def test_the_mix_file_holds_each_once_only_request_once(tmp_path: Path) -> None:
    rng = random.Random(4)
    kinds = mix.draw_kinds(rng, 2000)
    given = inputs(activations=Counter(kinds)["activation"])
    path = tmp_path / "run.mix"
    counts = mix.write_mix(path, mix.mix_lines(rng, kinds, given))

    lines = mix.read_mix(path)
    assert counts == Counter(kinds)
    assert [kind for kind, _, _ in lines] == kinds
    by_kind: dict[str, list[Request]] = {}
    for kind, expect, request in lines:
        assert expect == mix.KIND[kind].expect
        by_kind.setdefault(kind, []).append(request)
    activations = by_kind["activation"]
    assert len({r.headers["Authorization"] for r in activations}) == len(activations)  # each activator once
    assert {json.loads(r.body)["code"] for r in activations} <= {code for _, code in given.activations}
    signups = [json.loads(r.body)["email"] for r in by_kind["signup"]]
    assert len(set(signups)) == len(signups) > 0
    assert all(
        r.body == "" and r.path == f"{AUTH_API}/token" for r in by_kind["refresh"]
    )  # mix.lua adds the token
    users = {user_email(n) for n in range(500)}
    for request in by_kind["lookup-known"]:
        assert request.path.startswith(f"{REFERRAL_API}/codes?email=")
        assert request.path.split("=", 1)[1].replace("%40", "@") in users
    for request in by_kind["lookup-unknown"]:
        assert request.path.split("=", 1)[1].replace("%40", "@") not in users
    for request in by_kind["my-referrals"]:
        user = request.path.split("/")[5]
        assert request.headers["Authorization"] == "Bearer token-" + user.split("-")[1]  # their own page


def test_too_few_activations_are_refused() -> None:
    with pytest.raises(ValueError, match="activations drawn"):
        list(mix.mix_lines(random.Random(5), ["activation"] * 3, inputs(activations=2)))
    with pytest.raises(ValueError, match="not a kind"):
        mix.encode_line(mix.MixLine("nope", Request("GET", "/")))


# --- mix.lua against a real wrk ------------------------------------------------------------------


@dataclass
class MixServer:
    """/found 200, /missing 404, /created 201 (each path once: 409 the second time), /boom 500, and a
    rotating refresh grant."""

    seen: Counter[str] = field(default_factory=Counter)
    valid: set[str] = field(default_factory=set)
    issued: itertools.count[int] = field(default_factory=itertools.count)
    reused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.seen[request.path_qs] += 1
        if request.path.startswith("/created"):
            return web.Response(status=201 if self.seen[request.path_qs] == 1 else 409)
        status = {"/found": 200, "/missing": 404, "/boom": 500}.get(request.path, 400)
        return web.Response(status=status, text="{}")

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = form.get("refresh_token")
        if form.get("grant_type") != "refresh_token" or not isinstance(token, str) or token not in self.valid:
            self.reused += 1
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.valid.discard(token)
        fresh = f"r+{next(self.issued)}/x=="
        self.valid.add(fresh)
        return web.json_response({"access_token": "a.b.c", "refresh_token": fresh})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"{AUTH_API}/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def run_mix(server: TestServer, file: Path, tokens: Path | None, connections: int = 4) -> WrkResult:
    url = f"http://{server.host}:{server.port}"
    return await asyncio.to_thread(
        run_wrk,
        url,
        mix.mix_script(),
        duration=1,
        connections=connections,
        threads=2,
        args=mix.mix_args(file, tokens),
        timeout_s=5,
    )


async def test_mix_lua_counts_kinds_and_statuses_and_chains_refresh_tokens(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    app = MixServer(valid={f"seed-{n}" for n in range(8)})
    server = await aiohttp_server(app.app())
    pattern = ["lookup-known", "lookup-unknown", "refresh", "activation", "lookup-known"]
    lines = []
    for n in range(40_000):  # several times what 1 s can send
        kind = pattern[n % len(pattern)]
        path = {"lookup-known": "/found", "lookup-unknown": "/missing", "refresh": f"{AUTH_API}/token"}.get(
            kind, f"/created/{n}"
        )
        lines.append(mix.MixLine(kind, Request("POST" if kind in ("refresh", "activation") else "GET", path)))
    file = tmp_path / "run.mix"
    mix.write_mix(file, lines)
    tokens = tmp_path / "run.tokens"
    write_tokens(tokens, sorted(app.valid))

    result = await run_mix(server, file, tokens)

    assert result.requests > 200
    assert result.exhausted == 0
    assert app.reused == 0  # every refresh token was used once, each answer's token next
    assert result.unexpected == {}
    assert result.failed == 0
    assert set(result.kinds) == set(pattern)
    sent = sum(result.kinds.values())
    assert sent - 4 <= result.requests <= sent
    assert result.kinds["lookup-known"] == pytest.approx(2 * result.kinds["activation"], abs=6)
    assert set(result.statuses) == {"200", "404", "201"}
    assert sum(result.statuses.values()) == result.requests
    assert max(n for path, n in app.seen.items() if path.startswith("/created")) == 1  # each once


async def test_mix_lua_counts_statuses_no_kind_expects_and_reuses(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    app = MixServer()
    server = await aiohttp_server(app.app())
    file = tmp_path / "run.mix"
    mix.write_mix(
        file,
        [
            mix.MixLine("lookup-known", Request("GET", "/boom")),  # 500: no kind expects it
            mix.MixLine("activation", Request("POST", "/created/1")),  # once, then 409 when reused
            mix.MixLine("lookup-unknown", Request("GET", "/missing")),
            mix.MixLine("activation", Request("POST", "/created/2")),
        ],
    )

    result = await run_mix(server, file, None, connections=2)

    assert result.exhausted > 100  # 2 lines a thread: the rest are reuses
    assert set(result.unexpected) == {"500", "409"}
    assert result.unexpected["500"] == result.statuses["500"] > 0
    assert result.failed == sum(result.unexpected.values())
    assert result.statuses["404"] > 0 and "404" not in result.unexpected


# --- the services' metrics -------------------------------------------------------------------------

EXPOSITION = """\
# HELP referral_email_lookups_total Lookups of a code by its owner's email, by where the answer came from
# TYPE referral_email_lookups_total counter
referral_email_lookups_total{source="near"} 90.0
referral_email_lookups_total{source="redis"} 6.0
referral_email_lookups_total{source="database"} 4.0
# HELP http_requests_total HTTP requests served
# TYPE http_requests_total counter
http_requests_total{method="GET",route="/api/v1/referral/codes",status="200"} 80.0
http_requests_total{method="GET",route="/api/v1/referral/codes",status="404"} 20.0
http_requests_total{method="GET",route="/api/v1/referral/codes",status="503"} 1.0
http_requests_total{method="POST",route="/api/v1/referral/referrals",status="201"} 9.0
http_requests_total{method="POST",route="/api/v1/referral/referrals",status="409"} 1.0
http_requests_total{method="GET",route="/api/v1/auth/me",status="200"} 12.0
# HELP other_total not read
# TYPE other_total counter
other_total 5.0
"""


def test_the_metrics_scrape_is_parsed_into_paths_and_statuses() -> None:
    after = mix.parse_metrics(EXPOSITION)
    assert all(name in (mix.EMAIL_LOOKUPS, mix.HTTP_REQUESTS) for name, _ in after)
    before = mix.parse_metrics('referral_email_lookups_total{source="near"} 40.0\n')
    moved = mix.delta(before, after)

    paths = mix.lookup_paths(moved)
    assert paths == {"near": 50.0, "redis": 6.0, "database": 4.0}
    assert mix.shares(paths) == pytest.approx({"near": 50 / 60, "redis": 0.1, "database": 4 / 60})
    assert mix.shares(mix.lookup_paths({})) == {}

    statuses = mix.route_statuses(moved)
    assert statuses[("GET", f"{REFERRAL_API}/codes")] == Counter({200: 80, 404: 20, 503: 1})

    judged = mix.judge_kinds({"lookup-known": 85, "lookup-unknown": 15, "activation": 10, "me": 12}, statuses)
    # 20 404s for 15 unknown lookups sent: 5 known ones answered 404; the 503 counts against known.
    assert judged["lookup-unknown"] == mix.Judged(15, 404, {"404": 15}, 5)
    assert judged["lookup-known"] == mix.Judged(85, 200, {"200": 80, "503": 1}, 1)
    assert judged["activation"] == mix.Judged(10, 201, {"201": 9, "409": 1}, 1)
    assert judged["me"] == mix.Judged(12, 200, {"200": 12}, 0)
    assert judged["signup"] == mix.Judged(0, 201, {}, 0)


def test_a_malformed_scrape_is_an_error() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        mix.parse_metrics('referral_email_lookups_total{source="near" 1\n')


# --- the command line --------------------------------------------------------------------------------


def test_the_path_scenarios_and_the_mix_are_on_the_command_line() -> None:
    options = bench.parse_args(
        ["--smoke", "--scenarios", "MIX,S1-NEAR,S1-REDIS,S1-DB", "--embedded-postgres"]
    )
    assert options.scenarios == ("S1", "S1-REDIS", "S1-DB", "MIX")  # S1-NEAR is S1
    assert options.embedded_postgres
    assert dict(scenarios.SCENARIOS["S1-REDIS"].settings) == {"REFERRAL_NEAR_CACHE_SIZE": "0"}
    assert not bench.parse_args(["--smoke"]).embedded_postgres
