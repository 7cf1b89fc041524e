"""What each wrk run of the benchmark sends: `PassContext.plan` writes a run's request file (or takes
the one it wrote for the pass) and says which script reads it (not plans.py: the EXPLAIN query plans).

Access tokens are signed by the pass's issuer; S6's and MIX's refresh tokens come from real password
logins; S7's activators (`Activators`) are each used once in the whole benchmark; S9's keyed
activations are each made once before the runs replay them; S1-DB and MIX write a file per run,
sized like S7's. The R-* and A-* scenarios' files are endpoints.py's (`PassPlans`).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import random
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import redis

from deploy.local.processes import AUTH_API, REFERRAL_API, HarnessError
from services.auth.adapters.signing import AccessTokenIssuer
from tests.perf import dataset as datasets
from tests.perf import endpoints as endpoint_scenarios
from tests.perf import mix as mixes
from tests.perf import topology as topologies
from tests.perf import wrk
from tests.perf.scenarios import SCENARIOS, Scenario

if TYPE_CHECKING:
    from tests.perf.bench import Bench

LOGIN_WORKERS = 8  # concurrent logins when fetching S6's refresh tokens
LOGIN_TIMEOUT = 60.0
# S7's activators per run: its fastest run so far (any pass) times S7_SLACK, else S0's rate in this
# pass (the ceiling: no scenario goes faster), else S7_FIRST_GUESS; times the seconds, + connections.
S7_SLACK = 3.0
S7_FIRST_GUESS = 5000.0
S9_KEYS = 256  # keyed activations replayed in S9, each made once (201) before the runs
S0_COPIES = 64  # lines of S0's request file (every wrk thread needs at least one)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def email_query(email: str) -> str:
    return f"{REFERRAL_API}/codes?email={quote(email, safe='')}"


def _referrals_path(referrer: uuid.UUID, cursor: str | None = None) -> str:
    path = f"{REFERRAL_API}/referrers/{referrer}/referrals?limit=20"
    return path + (f"&cursor={quote(cursor, safe='')}" if cursor else "")


def send_once(gateway_url: str, request: wrk.Request, expect: int) -> None:
    """Send one request through the gateway (HarnessError unless it answers `expect`)."""
    sent = urllib.request.Request(
        gateway_url + request.path,
        data=request.body.encode(),
        headers=dict(request.headers),
        method=request.method,
    )
    try:
        with urllib.request.urlopen(sent, timeout=LOGIN_TIMEOUT) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise HarnessError(f"{request.method} {request.path} failed: {error}") from error
    if status != expect:
        raise HarnessError(f"{request.method} {request.path} answered {status}, not {expect}: {body[:300]!r}")


def _leaderboard_requests() -> Iterator[wrk.Request]:
    """The public leaderboard of each period, default limit."""
    for n in range(S0_COPIES):
        yield wrk.Request("GET", f"{REFERRAL_API}/leaderboard?period={('month', 'week', 'all')[n % 3]}")


def login(gateway_url: str, email: str, password: str) -> str:
    """A real password login through the gateway; the refresh token (HarnessError on any failure)."""
    body = urllib.parse.urlencode({"grant_type": "password", "username": email, "password": password})
    request = urllib.request.Request(
        gateway_url + f"{AUTH_API}/token",
        data=body.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=LOGIN_TIMEOUT) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise HarnessError(f"login of {email} answered {error.code}: {error.read()[:300]!r}") from error
    except (urllib.error.URLError, OSError) as error:
        raise HarnessError(f"login of {email} failed: {error}") from error
    token = answer.get("refresh_token")
    if not isinstance(token, str) or not token:
        raise HarnessError(f"login of {email} answered no refresh_token: {sorted(answer)}")
    return token


class Activators:
    """S7's activators, each handed out once in the whole benchmark: the dataset's, then fresh ones."""

    def __init__(self, pool: Sequence[tuple[uuid.UUID, str]], codes: Sequence[str]) -> None:
        if not codes:
            raise HarnessError("the dataset has no activation codes for S7")
        self._pool = list(pool)
        self._codes = list(codes)
        self._next = 0
        self.fresh = 0  # how many were made up

    def take(self, count: int) -> tuple[list[tuple[uuid.UUID, str, str]], int]:
        """`count` (user id, email, code) triples; and how many of them are fresh (not the dataset's)."""
        taken: list[tuple[uuid.UUID, str, str]] = []
        fresh = 0
        for _ in range(count):
            index = self._next
            self._next += 1
            if index < len(self._pool):
                user, email = self._pool[index]
            else:
                user, email = uuid.uuid4(), f"bench.fresh{index}.{secrets.token_hex(3)}@example.org"
                fresh += 1
            taken.append((user, email, self._codes[index % len(self._codes)]))
        self.fresh += fresh
        return taken, fresh

    @property
    def left(self) -> int:
        return max(0, len(self._pool) - self._next)


@dataclass
class RunPlan:
    """What one wrk run sends: the script, its arguments, and a note to log before it."""

    script: Path
    args: list[str]
    note: str = ""


class PassContext:
    """One pass's tokens and request files; the plan of each wrk run."""

    def __init__(
        self,
        bench: Bench,
        topology: topologies.Topology,
        issuer: AccessTokenIssuer,
        requests_dir: Path,
        redis_prefix: str = "",
    ) -> None:
        self.bench = bench
        self.topology = topology
        self.issuer = issuer
        self.dir = requests_dir
        self.redis_prefix = redis_prefix  # the topology's: its referral instances' keys are under it
        self.files: dict[str, Path] = {}
        self.rates: dict[str, list[float]] = {}
        self._tokens: list[str] | None = None
        self._refresh: list[list[str]] = []
        self._mix_refresh: list[list[str]] = []
        self._lookups: mixes.LookupUniverse | None = None
        self._cold_unknown = 0  # S1-DB's unknown emails used so far (each once)
        self.endpoints = endpoint_scenarios.PassPlans(self, bench.endpoints)

    def record(self, scenario: Scenario, phase: str, result: wrk.WrkResult) -> None:
        self.rates.setdefault(scenario.key, []).append(result.rps)
        if scenario.key == "S7":
            self.bench.s7_rates.append(result.rps)
        if scenario.key in endpoint_scenarios.BY_KEY:  # the warmup's rate too: it sizes the next run
            self.bench.endpoints.record(scenario.key, result.rps)

    def _token_users(self) -> list[str]:
        if self._tokens is None:
            users = self.bench.dataset.token_users
            if not users:
                raise HarnessError("the dataset has no token users")
            self._tokens = [
                self.issuer.issue(user, email=email, email_verified=True).token for user, email in users
            ]
        return self._tokens

    def _cycle_file(self, key: str, requests: Callable[[], Iterator[wrk.Request]]) -> Path:
        if key not in self.files:
            path = self.dir / f"{key}.txt"
            count = wrk.write_requests(path, requests())
            if count == 0:
                raise HarnessError(f"{key}: no requests to send (the dataset has none)")
            self.files[key] = path
        return self.files[key]

    def plan(self, scenario: Scenario, phase: str, seconds: int) -> RunPlan:
        key = scenario.key
        cycle = wrk.requests_script()
        dataset = self.bench.dataset
        expect = scenario.expect_status
        if key == "S0":
            path = self._cycle_file(
                key, lambda: iter([wrk.Request("GET", f"{REFERRAL_API}/healthz")] * S0_COPIES)
            )
        elif key == "S1":
            path = self._cycle_file(
                key, lambda: (wrk.Request("GET", email_query(e)) for e in dataset.code_emails)
            )
        elif key == "S2":
            path = self._cycle_file(
                key, lambda: (wrk.Request("GET", email_query(e)) for e in dataset.unknown_emails)
            )
        elif key in ("S3", "S4", "S3-UNPREPARED"):
            path = self._cycle_file(key, lambda: self._referral_pages(deep=key == "S4"))
        elif key == "S5":
            path = self._cycle_file(
                key, lambda: (wrk.Request("GET", f"{AUTH_API}/me", _bearer(t)) for t in self._token_users())
            )
        elif key == "S6":
            return self._refresh_plan(phase)
        elif key == "S7":
            return self._activation_plan(phase, seconds)
        elif key == "S8":
            path = self._cycle_file(key, self._logins)
        elif key == "S9":
            path = self._cycle_file(key, self._keyed_activations)
        elif key == "S-STATS":
            path = self._cycle_file(key, self._stats_requests)
        elif key == "S-LEADERBOARD":
            path = self._cycle_file(key, _leaderboard_requests)
        elif key in ("S1-NEAR", "S1-REDIS"):
            path = self._cycle_file(
                key, lambda: (wrk.Request("GET", email_query(e)) for e in dataset.code_emails)
            )
        elif key == "S1-DB":
            return self._cold_lookup_plan(phase, seconds)
        elif key == "MIX":
            return self._mix_plan(phase, seconds)
        elif key == endpoint_scenarios.WEBHOOK_RELAY:  # S7's activations, webhooks on
            return self._activation_plan(phase, seconds)
        elif key in endpoint_scenarios.BY_KEY:
            planned = self.endpoints.plan(key, phase, seconds)
            return RunPlan(planned.script, planned.args, planned.note)
        else:
            raise HarnessError(f"no plan for scenario {key}")
        return RunPlan(cycle, wrk.requests_args(path, mode="cycle", expect=expect))

    def _referral_pages(self, *, deep: bool) -> Iterator[wrk.Request]:
        dataset = self.bench.dataset
        referrers = [r for r in dataset.big_referrers if not deep or r in dataset.deep_cursors]
        if not referrers:
            raise HarnessError("the dataset has no big referrers" + (" with a deep cursor" if deep else ""))
        tokens = self._token_users()
        for n, token in enumerate(tokens):
            referrer = referrers[n % len(referrers)]
            cursor = dataset.deep_cursors[referrer] if deep else None
            yield wrk.Request("GET", _referrals_path(referrer, cursor), _bearer(token))

    def _stats_requests(self) -> Iterator[wrk.Request]:
        """Each big referrer asks for their own statistics (anyone else gets 403)."""
        referrers = self.bench.dataset.big_referrers
        if not referrers:
            raise HarnessError("the dataset has no big referrers")
        tokens = [self.issuer.issue(r, email=None, email_verified=True).token for r in referrers]
        for n in range(S0_COPIES):
            referrer = referrers[n % len(referrers)]
            yield wrk.Request(
                "GET", f"{REFERRAL_API}/referrers/{referrer}/stats", _bearer(tokens[n % len(tokens)])
            )

    def _logins(self) -> Iterator[wrk.Request]:
        dataset = self.bench.dataset
        for email in dataset.login_emails:
            body = urllib.parse.urlencode(
                {"grant_type": "password", "username": email, "password": dataset.password}
            )
            yield wrk.Request(
                "POST", f"{AUTH_API}/token", {"Content-Type": "application/x-www-form-urlencoded"}, body
            )

    def _keyed_activations(self) -> Iterator[wrk.Request]:
        """S9's requests: keyed activations, each sent once first (201), so the runs only replay."""
        taken, _ = self.bench.activators.take(S9_KEYS)
        requests = [
            wrk.Request(
                "POST",
                f"{REFERRAL_API}/referrals",
                {
                    **_bearer(self.issuer.issue(user, email=email, email_verified=True).token),
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"bench-{user}",
                },
                json.dumps({"code": code}),
            )
            for user, email, code in taken
        ]
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(LOGIN_WORKERS) as pool:
            list(pool.map(lambda request: send_once(self.topology.gateway_url, request, 201), requests))
        self.bench.log(
            f"{self.topology.instances}x S9: {len(requests)} keyed activations made in"
            f" {time.monotonic() - started:.1f}s, to be replayed"
        )
        return iter(requests)

    def prepare_refresh_tokens(self) -> None:
        """`connections` refresh tokens for each run of S6, by real password logins through the gateway."""
        options = self.bench.options
        runs = options.runs + (1 if options.warmup else 0)
        tokens = self.refresh_tokens(options.connections * runs, "S6")
        self._refresh = [tokens[i::runs] for i in range(runs)]

    def refresh_tokens(self, wanted: int, label: str) -> list[str]:
        """`wanted` refresh tokens, by real password logins through the gateway."""
        emails = self.bench.dataset.login_emails
        if not emails:
            raise HarnessError("the dataset has no login emails")
        started = time.monotonic()
        password = self.bench.dataset.password
        gateway = self.topology.gateway_url
        with concurrent.futures.ThreadPoolExecutor(LOGIN_WORKERS) as pool:
            tokens = list(
                pool.map(lambda n: login(gateway, emails[n % len(emails)], password), range(wanted))
            )
        elapsed = time.monotonic() - started
        self.bench.log(
            f"{self.topology.instances}x {label}: {wanted} refresh tokens by password login in {elapsed:.1f}s"
            f" ({wanted / elapsed:.1f} logins/s)"
        )
        return tokens

    def _refresh_plan(self, phase: str) -> RunPlan:
        if not self._refresh:
            self.prepare_refresh_tokens()
        tokens = self._refresh.pop(0)
        path = self.dir / f"S6-{phase.replace(' ', '')}.tokens"
        wrk.write_tokens(path, tokens)
        return RunPlan(wrk.refresh_script(), wrk.refresh_args(path, path=f"{AUTH_API}/token"))

    def _expected_rate(self) -> tuple[float, str]:
        """The rate S7 may reach in a run (see S7_SLACK), and where that figure comes from."""
        if rates := self.bench.s7_rates:
            return max(rates) * S7_SLACK, f"{S7_SLACK:g} x S7's fastest run so far"
        if ceiling := self.rates.get("S0"):
            return max(ceiling), "the S0 ceiling"
        return S7_FIRST_GUESS, "a first guess"

    def _lines_for(self, key: str, seconds: int, first_guess: float) -> tuple[int, str]:
        """Lines a once-only file needs for a run: the rate it may reach (S7_SLACK times its fastest
        run in this pass, at least `first_guess`: a warmup on cold caches is much slower than the runs
        after it; else the S0 ceiling, else `first_guess`) times the seconds, plus the connections."""
        if rates := self.rates.get(key):
            rate, source = (
                max(max(rates) * S7_SLACK, first_guess),
                f"{S7_SLACK:g} x {key}'s fastest run, at least {first_guess:,.0f}",
            )
        elif ceiling := self.rates.get("S0"):
            rate, source = max(ceiling), "the S0 ceiling"
        else:
            rate, source = first_guess, "a first guess"
        return math.ceil(
            rate * seconds
        ) + self.bench.options.connections, f"up to {rate:,.0f} req/s: {source}"

    def forget_lookups(self) -> None:
        """Drop every cached lookup by email from Redis; Redis tells the referral instances, whose
        near caches drop theirs (S1-DB: before each run, so that no email of it is cached)."""
        client = redis.Redis.from_url(self.bench.redis_url)
        try:
            pattern = f"{self.redis_prefix}referral:email:*"
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        finally:
            client.close()

    def _universe(self) -> mixes.LookupUniverse:
        if self._lookups is None:
            self._lookups = mixes.LookupUniverse(self.bench.dataset.users, datasets.user_email)
        return self._lookups

    def _cold_lookup_plan(self, phase: str, seconds: int) -> RunPlan:
        """S1-DB: users' emails in a random order, each once; when the run may send more than there are
        users, never-asked unknown emails after them (404, said in the note). The caches are emptied
        before each run (`forget_lookups`)."""
        wanted, source = self._lines_for("S1-DB", seconds, 4000)
        users = self.bench.dataset.users
        known = min(users, wanted)
        rng = secrets.SystemRandom()
        start = rng.randrange(users)
        lines = [
            mixes.MixLine(
                "lookup-known", wrk.Request("GET", email_query(datasets.user_email((start + n) % users)))
            )
            for n in range(known)
        ]
        rng.shuffle(lines)
        base = self._cold_unknown
        self._cold_unknown += wanted - known
        lines += [
            mixes.MixLine("lookup-unknown", wrk.Request("GET", email_query(mixes.unknown_email(base + n))))
            for n in range(wanted - known)
        ]
        path = self.dir / f"S1-DB-{phase.replace(' ', '')}.mix"
        mixes.write_mix(path, lines)
        note = f"{wanted:,} lookups ({source}; + connections): {known:,} users' emails"
        if wanted > known:
            note += f", then {wanted - known:,} unknown ones (404) once the {users:,} users' are used up"
        return RunPlan(mixes.mix_script(), mixes.mix_args(path, None), note)

    def _mix_plan(self, phase: str, seconds: int) -> RunPlan:
        """MIX: a file of its own per run (tests/perf/mix.py), and `connections` refresh tokens."""
        bench = self.bench
        wanted, source = self._lines_for("MIX", seconds, 5000)
        rng = random.Random(f"{bench.options.seed}-{self.topology.instances}-{phase}-{self.redis_prefix}")
        kinds = mixes.draw_kinds(rng, wanted)
        taken, fresh = bench.activators.take(kinds.count("activation"))
        tokens = self._token_users()
        readers = [
            (str(user), token) for (user, _), token in zip(bench.dataset.token_users, tokens, strict=True)
        ]
        inputs = mixes.MixInputs(
            universe=self._universe(),
            readers=readers,
            activations=[
                (self.issuer.issue(user, email=email, email_verified=True).token, code)
                for user, email, code in taken
            ],
            signup_tag=f"{self.redis_prefix.replace(':', '.')}{phase.replace(' ', '')}".strip("."),
        )
        path = self.dir / f"MIX-{phase.replace(' ', '')}.mix"
        counts = mixes.write_mix(path, mixes.mix_lines(rng, kinds, inputs))
        token_file = self.dir / f"MIX-{phase.replace(' ', '')}.tokens"
        refresh = self._mix_refresh_tokens() if counts["refresh"] else []
        wrk.write_tokens(token_file, refresh)
        note = f"{wanted:,} requests ({source}; + connections), " + ", ".join(
            f"{key} {counts[key]:,}" for key in mixes.KIND if counts[key]
        )
        if fresh:
            note += f"; {fresh:,} activators made up (the dataset's ran out: token-only ids, as in S7)"
        return RunPlan(mixes.mix_script(), mixes.mix_args(path, token_file if refresh else None), note)

    def _mix_refresh_tokens(self) -> list[str]:
        """`connections` refresh tokens for this MIX run: every run's are fetched in one batch of
        logins (before the first run, when the services are idle: logins after a run would queue
        behind its signups' hashes)."""
        if not self._mix_refresh:
            options = self.bench.options
            runs = options.runs + (1 if options.warmup else 0)
            tokens = self.refresh_tokens(options.connections * runs, "MIX")
            self._mix_refresh = [tokens[i::runs] for i in range(runs)]
        return self._mix_refresh.pop(0)

    def _activation_plan(self, phase: str, seconds: int) -> RunPlan:
        bench = self.bench
        options = bench.options
        rate, source = self._expected_rate()
        wanted = math.ceil(rate * seconds) + options.connections
        left = bench.activators.left
        taken, fresh = bench.activators.take(wanted)
        note = f"{wanted:,} activators (up to {rate:,.0f} req/s: {source}; + connections)"
        if fresh:
            message = (
                f"S7 {phase}: the dataset's activators are too few for the expected rate: {left:,} left,"
                f" {wanted:,} needed at ~{rate:,.0f} req/s for {seconds}s; adding {fresh:,} fresh users"
                " (random ids that exist only in their access tokens: the referral service never looks"
                " a user up, so an activation costs the same)"
            )
            summary = "S7: the dataset's activators were too few; fresh users (token-only ids) were added"
            if summary in bench.notes:
                bench.log(message)
            else:  # loudly once; in the report's notes
                bench.log.loud(message)
                bench.notes.append(summary)
        path = self.dir / f"S7-{phase.replace(' ', '')}.txt"
        body = (json.dumps({"code": code}) for _, _, code in taken)
        requests = (
            wrk.Request(
                "POST",
                f"{REFERRAL_API}/referrals",
                {
                    **_bearer(self.issuer.issue(user, email=email, email_verified=True).token),
                    "Content-Type": "application/json",
                },
                text,
            )
            for (user, email, _), text in zip(taken, body, strict=True)
        )
        wrk.write_requests(path, requests)
        return RunPlan(
            wrk.requests_script(),
            wrk.requests_args(path, mode="once", expect=SCENARIOS["S7"].expect_status),
            note,
        )
