"""The benchmark's scenarios: what each one measures, whose CPU is the service's, the status every
answer must have, and the issue's class it is judged by (bench.py runs them, runplans.py writes
their requests; the R-* and A-* ones are endpoints.py's, registered here)."""

from __future__ import annotations

from dataclasses import dataclass

from tests.perf import endpoints as endpoint_scenarios
from tests.perf import report as reports

S8_MIN_SECONDS = 3  # a login takes ~1 s under load: shorter S8 runs may see no answer at all


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    service: str  # whose CPU is "the service's": auth or referral
    expect_status: int
    kind: str  # the class: reports.AUTH_READ, PUBLIC_READ or WRITE
    password_hashing: bool = False  # argon2-bound: exempt from the p99 target
    min_seconds: int = 0  # its runs last at least this long (else S8_MIN_SECONDS when argon2-bound)
    # Service settings other than the defaults (env name, value): the scenario runs on a topology
    # started with them (Bench.run_pass groups the scenarios by settings, one topology each).
    settings: tuple[tuple[str, str], ...] = ()


_AUTHED, _PUBLIC, _WRITE = reports.AUTH_READ, reports.PUBLIC_READ, reports.WRITE
SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario("S0", "gateway -> referral /healthz (ceiling)", "referral", 200, _PUBLIC),
        Scenario("S1", "code by email, known (cache hit)", "referral", 200, _PUBLIC),
        Scenario("S2", "code by email, unknown (404)", "referral", 404, _PUBLIC),
        Scenario("S3", "referrals of a big referrer, first page", "referral", 200, _AUTHED),
        Scenario("S4", "referrals of a big referrer, deep cursor", "referral", 200, _AUTHED),
        Scenario("S5", "GET /auth/me", "auth", 200, _AUTHED),
        Scenario("S6", "refresh grant", "auth", 200, _WRITE),
        Scenario("S7", "activate a code (201 each)", "referral", 201, _WRITE),
        Scenario("S8", "password login (argon2id, default cost)", "auth", 200, _WRITE, True),
        Scenario(
            "S9", "an idempotent activation replayed (201 from the kept answer)", "referral", 201, _WRITE
        ),
        Scenario(
            "S-STATS", "a big referrer's statistics by level (their own token)", "referral", 200, _AUTHED
        ),
        Scenario("S-LEADERBOARD", "the leaderboard: month, week, all time", "referral", 200, _PUBLIC),
        Scenario(
            "S1-REDIS",
            "code by email, known, near cache off (Redis hit)",
            "referral",
            200,
            _PUBLIC,
            settings=(("REFERRAL_NEAR_CACHE_SIZE", "0"),),
        ),
        # S3 as behind a transaction-mode pooler (PgBouncer pool_mode=transaction), where SQL-level
        # PREPARE cannot be used: what planning every statement costs (the capacity plan's pooler). A
        # setting's cost, not an endpoint: no class of its own.
        Scenario(
            "S3-UNPREPARED",
            "S3 without server-side PREPARE (as behind a transaction pooler)",
            "referral",
            200,
            "",
            settings=(("REFERRAL_DB_SERVER_PREPARE", "false"),),
        ),
        # The database path: the public-read target is for the Redis path (S1-REDIS), so
        # S1-DB has no CPU target of its class (""), only the p99's.
        Scenario("S1-DB", "code by email, cold (database; each email once per run)", "referral", 200, ""),
        # Every kind at once, signups (argon2) included: no class, and its p99 is password hashing's.
        Scenario("MIX", "the realistic mix (tests/perf/mix.py; kinds below)", "referral", 200, "", True),
        # Every other endpoint: tests/perf/endpoints.py.
        *(
            Scenario(e.key, e.title, e.service, e.expect_status, e.kind, e.password_hashing, e.min_seconds)
            for e in endpoint_scenarios.SCENARIOS
        ),
    )
}
