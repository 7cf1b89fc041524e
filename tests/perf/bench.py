"""The benchmark (`make bench`, `python -m tests.perf`): the production topology driven by wrk.

1. A fresh database `bench_<pid>_<random>` on the PostgreSQL server of DATABASE_URL (default: the
   local one), migrated with the services' own CLI and filled by `dataset.build` (load time
   reported). Redis (REDIS_URL) keys live under a prefix of the run's own. Either server unreachable:
   a loud failure (exit 2) before anything starts.
2. One pass per `--instances` value (default 1, then 2): nginx + N auth + N referral
   (`topology.py`), idle RSS of each service, then every scenario: one warmup run (not recorded),
   then `--runs` recorded runs of `--duration` seconds (S8 and the other password-hashing scenarios:
   at least S8_MIN_SECONDS) and
   `--connections` connections, each once the services are idle again (what the previous run left,
   such as queued password hashes, done: it would slow this run and count in its CPU). Around each
   run the CPU time (utime + stime from /proc) of the services, nginx (master and workers), the
   database's backends (and the server's background processes) and redis-server is sampled, and
   divided by the run's requests: CPU µs per request. During S8 (password logins, argon2-bound)
   /healthz is also sampled directly on each auth instance's port (~20/s) and the services'
   `event_loop_lag_seconds` histograms are scraped before and after (p99 and max from the buckets'
   deltas, as "≤ bucket bound"). RSS again after the pass. Around each run every service's /metrics
   is also scraped: how the lookups by email were answered (near cache, Redis, database:
   `referral_email_lookups_total`) and, for MIX and S1-DB, what each route answered
   (`http_requests_total`, judged per kind of request: tests/perf/mix.py). A scenario that needs
   service settings other than the defaults (S1-REDIS: the near cache off) runs on a topology of its
   own, started after the others' with those settings and Redis keys of its own.
3. EXPLAIN ANALYZE of the S1-S4 queries (`plans.py`), the report printed and written as
   `report.json`, `report.txt`, `report.md` and `report.png` under `--out/<timestamp>/` (with a
   `latest` symlink), beside every process's log, the request files and `bench.log`.
4. The database is dropped and the Redis keys deleted, whatever happened.

Exit code 1 on any problem: a wrk error or an answer of another status than the scenario expects,
a request file that ran out (`exhausted`), a process that died or did not stop cleanly; 0 otherwise.
A missed speed target is printed (MET/MISSED) but is not a failure, nor is a query plan warning.

The services run with their defaults, but for the database pools when the PostgreSQL server has too
few free connection slots for them (two instances of each with the default 32 take up to 128, the
server's default max_connections is 100): then every pool is capped to fit, and that is said loudly
and noted in the report, since a connection the server refuses is a 503.

Tokens: access tokens are signed here with the key the auth instances are given and the same
signer (`AccessTokenIssuer`, `iss` = the gateway's URL + /api/v1/auth, the default audience), one
hour long. S6's refresh tokens come from real password logins through the gateway: each wrk run
uses each token once (refresh.lua chains the answers), so every run gets `--connections` fresh
ones. S7's activators are each used once in the whole benchmark; when the dataset's are too few
for the rate the run is expected to reach, fresh ones are added (random ids that exist only in
their tokens: the referral service never looks a user up), and that is said loudly. S9 takes
S9_KEYS more, activates each once through the gateway with an `Idempotency-Key` (201), then replays
those same requests: every answer is the kept one (201; running the activation again would be 409).
MIX (tests/perf/mix.py) and S1-DB send files of their own per run, each line at most once, sized
like S7's (S7_SLACK times the fastest run so far, at least a first guess). `--embedded-postgres`
puts the database on the embedded PostgreSQL `make run` starts (deploy/local/embedded.py).

Every other endpoint (R-*, A-* keys) is a scenario of `endpoints.py`, which says how its requests
and subjects are made. Each scenario has a class (an authenticated read, a public read, a write;
password hashing marked): the report checks the issue's targets per class over every scenario.
Webhooks are off (no *_WEBHOOK_URLS: no event is written, as by default) but for WEBHOOK-RELAY, which
runs in a topology of its own, started after the pass's other scenarios (endpoints.py).

Where things are: this module holds the command line (`Options`, `parse_args`), `Bench` (the passes,
each scenario's runs and what is measured around them), the report's context and `run`/`main`. The
scenarios' table (`SCENARIOS`, S8_MIN_SECONDS): scenarios.py. What each run sends (`PassContext`: the
tokens, the request files, S7_SLACK, S9_KEYS): runplans.py. CPU from /proc, the event-loop lag
histograms and /healthz sampling: measure.py. The report: report.py; wrk and its Lua scripts:
wrk.py; py-spy: profiles.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import redis

from deploy.local.embedded import EmbeddedServerError, start_postgres
from deploy.local.processes import ROOT, HarnessError, http_status
from services.auth.adapters.signing import AccessTokenIssuer, generate_pem, parse_key_ring
from services.auth.settings import AuthSettings
from services.referral.settings import ReferralSettings
from tests.harness import migrate
from tests.helpers import drop_redis_keys, fresh_database
from tests.perf import dataset as datasets
from tests.perf import endpoints as endpoint_scenarios
from tests.perf import mix as mixes
from tests.perf import plans as query_plans
from tests.perf import profiles as profiling
from tests.perf import report as reports
from tests.perf import topology as topologies
from tests.perf import wrk
from tests.perf.measure import (
    LAG_METRIC,
    ExternalProcesses,
    HealthzSampler,
    cpu_seconds,
    lag_buckets,
    lag_summary,
    snapshot,
)
from tests.perf.runplans import Activators, PassContext, email_query
from tests.perf.scenarios import S8_MIN_SECONDS, SCENARIOS, Scenario

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ACCESS_TOKEN_TTL = 3600
SETTLE = 1.0  # s after start, before idle RSS
# Before each run, wait until the services are idle (abandoned work of the previous run, e.g. queued
# argon2 hashes, done): at most QUIET_TICKS CPU ticks in a QUIET_WINDOW, for at most QUIET_TIMEOUT.
QUIET_WINDOW = 0.25
QUIET_TICKS = 3
QUIET_TIMEOUT = 60.0
# Connection slots of the PostgreSQL server kept free for everything else (this process, others).
POOL_MARGIN = 10
MIN_POOL = 8  # the services refuse a smaller DB_POOL_MAX
# Names the command line also takes for a scenario: S1 measures the near cache's path (every email
# asked on every instance before the runs), the one S1-REDIS and S1-DB are the other paths of.
ALIASES = {"S1-NEAR": "S1"}
OTHER_SERVICE = {"auth": "referral", "referral": "auth"}


@dataclass(frozen=True)
class Options:
    scale: float
    instances: tuple[int, ...]
    duration: int
    warmup: int
    runs: int
    connections: int
    threads: int
    timeout: int
    scenarios: tuple[str, ...]
    out: Path
    smoke: bool
    seed: int
    embedded_postgres: bool = False
    profile: bool = True  # py-spy on the services during each scenario's last recorded run


SMOKE: dict[str, Any] = {
    "scale": 0.01,
    "duration": 1,
    "warmup": 1,
    "runs": 3,
    "connections": 8,
    "instances": "1,2",
}
# In the smoke, each scenario of endpoints.py runs this many times, without a warmup, in the first
# pass only (CI's time: they add about 100 s per pass on this machine).
SMOKE_ENDPOINT_RUNS = 1
DEFAULTS: dict[str, Any] = {
    "scale": 1.0,
    "duration": 8,
    "warmup": 2,
    "runs": 3,
    "connections": 32,
    "instances": "1,2",
}


def _whole_seconds(value: str) -> int:
    number = float(value)
    if number < 0 or number != int(number):
        raise argparse.ArgumentTypeError(f"whole seconds (wrk takes no fractions), got {value}")
    return int(number)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.perf",
        description="Benchmark the referral system's production topology (nginx + services) with wrk.",
    )
    parser.add_argument("--scale", type=float, help="dataset scale (1: 100k users, 1M referrals)")
    parser.add_argument("--instances", help="instances of each service per pass, comma-separated (1,2)")
    parser.add_argument("--duration", type=_whole_seconds, help="seconds of each recorded run (8)")
    parser.add_argument("--warmup", type=_whole_seconds, help="seconds of the warmup run, 0: none (2)")
    parser.add_argument("--runs", type=int, help="recorded runs per scenario (3)")
    parser.add_argument("--connections", type=int, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--timeout", type=_whole_seconds, default=10, help="wrk's request timeout, s (10)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="which, comma-separated (all)")
    parser.add_argument("--out", type=Path, default=ROOT / ".artifacts" / "bench", help="output directory")
    parser.add_argument("--seed", type=int, default=7, help="dataset seed")
    parser.add_argument(
        "--embedded-postgres",
        action="store_true",
        help="the database on an embedded PostgreSQL started as `make run` starts it"
        " (deploy/local/embedded.py), in a temporary folder, instead of DATABASE_URL's server",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="no py-spy profile of the services during each scenario's last recorded run",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "CI's quick run: scale 0.01, 1 s runs, 1 s warmup, 8 connections (flags given win); the"
            " scenarios of endpoints.py run once, without a warmup, in the first pass only"
        ),
    )
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    values = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in base}
    try:
        instances = tuple(int(part) for part in str(values["instances"]).split(",") if part.strip())
    except ValueError:
        parser.error(f"--instances is a comma-separated list of counts, got {values['instances']!r}")
    scenarios = tuple(
        ALIASES.get(name, name) for part in args.scenarios.split(",") if (name := part.strip().upper())
    )
    if unknown := [key for key in scenarios if key not in SCENARIOS]:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join([*SCENARIOS, *ALIASES])}")
    if not instances or any(n < 1 for n in instances):
        parser.error("--instances: counts of at least 1")
    if values["runs"] < 1 or values["duration"] < 1:
        parser.error("--runs and --duration must be at least 1")
    if args.threads < 1 or values["connections"] < args.threads or values["connections"] % args.threads:
        parser.error("--connections must be a multiple of --threads (wrk opens connections/threads each)")
    return Options(
        scale=float(values["scale"]),
        instances=instances,
        duration=int(values["duration"]),
        warmup=int(values["warmup"]),
        runs=int(values["runs"]),
        connections=int(values["connections"]),
        threads=args.threads,
        timeout=args.timeout,
        scenarios=tuple(key for key in SCENARIOS if key in scenarios),
        out=args.out,
        smoke=args.smoke,
        seed=args.seed,
        embedded_postgres=args.embedded_postgres,
        profile=args.profile,
    )


def pass_scenarios(options: Options, index: int) -> tuple[str, ...]:
    """The scenarios of the pass `index` (0: the first): all, but in the smoke the endpoint scenarios
    run in the first pass only (CI's time)."""
    if options.smoke and index > 0:
        return tuple(key for key in options.scenarios if key not in endpoint_scenarios.BY_KEY)
    return options.scenarios


class Log:
    """Print (flushed) and append to the run's bench.log."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(stamped, flush=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(stamped + "\n")

    def loud(self, message: str) -> None:
        bar = "!" * 100
        self(f"{bar}\n!!! {message}\n{bar}")


# --- the benchmark -------------------------------------------------------------------------------


@dataclass
class PassOutcome:
    pass_: Any  # reports.Pass
    problems: list[str] = field(default_factory=list)


class Bench:
    """Runs the passes over one migrated, loaded database."""

    def __init__(
        self,
        options: Options,
        *,
        database_url: str,
        redis_url: str,
        redis_prefix: str,
        dataset: datasets.Dataset,
        out_dir: Path,
        log: Log,
        external: ExternalProcesses,
    ) -> None:
        self.options = options
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = redis_prefix
        self.dataset = dataset
        self.out_dir = out_dir
        self.log = log
        self.external = external
        self.pem = generate_pem()
        self.ring = parse_key_ring(self.pem)
        self.activators = Activators(dataset.activators, dataset.activation_codes)
        self.s7_rates: list[float] = []  # every S7 run's req/s, every pass
        self.notes: list[str] = []
        self.endpoints = endpoint_scenarios.Endpoints(
            database_url, next(iter(dataset.login_emails), None), options.scenarios
        )

    def pool_settings(self, instances: int) -> dict[str, str]:
        """The services' default pools when the server has the connection slots they can fill; else the
        largest equal cap that fits (said loudly: a connection the server refuses is a 503).

        A process holds at most about as many connections as it has requests in flight: at most
        wrk's connections (+2: a background task, a probe), or its pool's maximum."""
        busiest = self.options.connections + 2
        default = min(AuthSettings.db_pool_max, busiest) + min(ReferralSettings.db_pool_max, busiest)
        with (
            contextlib.closing(psycopg2.connect(self.database_url, connect_timeout=5)) as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
            slots, in_use = (int(value) for value in cursor.fetchone())
        free = slots - in_use - POOL_MARGIN
        if instances * default <= free:
            return {}
        cap = max(MIN_POOL, free // (2 * instances))
        message = (
            f"{instances} instance(s): PostgreSQL has {slots} connection slots, {in_use} in use, but the"
            f" services' default pools may take {instances * default}; every pool is capped at {cap}"
            f" (default: auth {AuthSettings.db_pool_max}, referral {ReferralSettings.db_pool_max})"
        )
        if 2 * instances * cap > free:
            message += f"; even so they may need more than the {max(free, 0)} free: expect 503s"
        self.log.loud(message)
        self.notes.append(message)
        return {"AUTH_DB_POOL_MAX": str(cap), "REFERRAL_DB_POOL_MAX": str(cap)}

    # Each pass: start, measure every scenario, stop.

    def run_pass(self, index: int, instances: int) -> PassOutcome:
        """One topology per set of service settings the scenarios need (most need only the defaults),
        each with Redis keys of its own; the scenarios in the order given, grouped by those settings."""
        name = f"pass{index + 1}-x{instances}"
        pass_dir = self.out_dir / name
        problems: list[str] = []
        results: list[Any] = []
        idle_rss: dict[str, float] = {}
        final_rss: dict[str, float] = {}
        loop_lag: dict[str, dict[str, float]] = {}
        healthz: dict[str, float] = {}
        started = time.monotonic()
        # The scenarios that need other settings get a topology of their own each, started after the
        # usual one stopped: no other scenario's figures pay for them (WEBHOOK-RELAY: webhooks on;
        # S1-REDIS: the near cache off).
        groups: list[tuple[dict[str, str], list[str]]] = []
        for extra_settings, group_keys in self.endpoints.topology_groups(pass_scenarios(self.options, index)):
            by_settings: dict[tuple[tuple[str, str], ...], list[str]] = {}
            for key in group_keys:
                by_settings.setdefault(SCENARIOS[key].settings, []).append(key)
            groups += [({**extra_settings, **dict(own)}, ks) for own, ks in by_settings.items()]
        for group, (extra, keys) in enumerate(groups):
            label = name if group == 0 else f"{name}-{keys[0].lower()}"
            group_dir = pass_dir if group == 0 else pass_dir / keys[0].lower()
            requests_dir = group_dir / "requests"
            requests_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"{self.redis_prefix}{label}:"
            described = " ".join(f"{k}={v}" for k, v in extra.items()) or "default settings"
            self.log(
                f"{label}: starting nginx + {instances} auth + {instances} referral ({described};"
                f" logs in {group_dir}) for {', '.join(keys)}"
            )
            topology = topologies.build(
                instances=instances,
                database_url=self.database_url,
                redis_url=self.redis_url,
                redis_prefix=prefix,
                signing_pem=self.pem,
                log_dir=group_dir,
                settings={**self.pool_settings(instances), **self.endpoints.auth_settings(), **extra},
            )
            group_problems: list[str] = []
            group_started = time.monotonic()
            try:
                topology.start()
                self.log(f"{label}: up in {time.monotonic() - group_started:.1f}s at {topology.gateway_url}")
                time.sleep(SETTLE)
                rss = self._rss(topology)
                if group == 0:
                    idle_rss = rss
                self.log(f"{label}: idle RSS " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
                issuer = AccessTokenIssuer(
                    self.ring,
                    issuer=topology.issuer,
                    audience=AuthSettings.token_audience,
                    ttl=ACCESS_TOKEN_TTL,
                )
                context = PassContext(self, topology, issuer, requests_dir, prefix)
                for key in keys:
                    result, lag, health = self._scenario(context, SCENARIOS[key])
                    results.append(result)
                    if lag is not None:
                        loop_lag = lag
                    if health is not None:
                        healthz = health
                    if topology.dead():  # in the scenario's problems already; the stop notes it again
                        self.log.loud(f"{label}: a process died during {key}; the pass stops here")
                        break
                rss = self._rss(topology)
                if group == 0:
                    final_rss = rss
                self.log(f"{label}: RSS after " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
            except (HarnessError, wrk.WrkError, OSError, psycopg2.Error, redis.RedisError) as error:
                group_problems.append(f"{label}: {type(error).__name__}: {error}")
                self.log.loud(f"{label} failed: {error}")
            finally:
                stop_problems = topology.stop()
                group_problems += [p for p in stop_problems if p not in group_problems]
                with contextlib.suppress(redis.RedisError):
                    drop_redis_keys(self.redis_url, prefix)
            problems += group_problems
        for problem in problems:
            self.log.loud(f"{name}: {problem}")
        order = {key: n for n, key in enumerate(self.options.scenarios)}
        results.sort(key=lambda result: order[result.key])
        if results and problems:  # the report's problems are its scenarios': the pass's go on the last one
            results[-1].problems.extend(f"pass: {problem}" for problem in problems)
        self.log(f"{name}: done in {time.monotonic() - started:.0f}s")
        pass_ = reports.Pass(
            instances=instances,
            scenarios=results,
            idle_rss_mb=idle_rss,
            final_rss_mb=final_rss,
            loop_lag=loop_lag,
            healthz_ms=healthz,
        )
        return PassOutcome(pass_, problems)

    def _rss(self, topology: topologies.Topology) -> dict[str, float]:
        sizes: dict[str, float] = {}
        for process in topology.services:
            value = topologies.rss_mb(process.pid)
            if value is not None:
                sizes[process.name] = round(value, 1)
        nginx = [topologies.rss_mb(pid) for pid in topology.pids().get("nginx", [])]
        if nginx and all(v is not None for v in nginx):
            sizes["nginx"] = round(sum(v for v in nginx if v is not None), 1)
        return sizes

    def _quiesce(self, topology: topologies.Topology, label: str) -> None:
        """Wait until the services use (almost) no CPU: the previous run's leftovers are done."""
        pids = {"services": [process.pid for process in topology.services]}
        started = time.monotonic()
        previous = snapshot(pids)
        while time.monotonic() - started < QUIET_TIMEOUT:
            time.sleep(QUIET_WINDOW)
            current = snapshot(pids)
            if cpu_seconds(previous, current)["services"] * topologies.CLOCK_TICKS <= QUIET_TICKS:
                waited = time.monotonic() - started
                if waited > 2.0:
                    self.log(f"{label}: waited {waited:.1f}s for the services to go idle")
                return
            previous = current
        self.log.loud(f"{label}: the services were still busy after {QUIET_TIMEOUT:.0f}s; running anyway")

    def _prime(self, topology: topologies.Topology, scenario: Scenario) -> None:
        """S1/S2 measure lookups answered by the caches: ask every instance for every email once first.

        A warmup of a few seconds reaches only part of 20,000 emails, so the recorded runs would
        still fill the caches (the first full run measured 532, 286, then 163 µs per request).
        """
        dataset = self.dataset
        emails = {
            "S1": dataset.code_emails,
            "S1-REDIS": dataset.code_emails,
            "S2": dataset.unknown_emails,
        }.get(scenario.key)
        if not emails:
            return
        started = time.monotonic()
        paths = [email_query(email) for email in emails]
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            for process in topology.referral:
                urls = [process.url + path for path in paths]
                statuses = list(pool.map(http_status, urls))
                wrong = [status for status in statuses if status != scenario.expect_status]
                if wrong:
                    self.log.loud(
                        f"priming {process.name} for {scenario.key}: {len(wrong)} answers not "
                        f"{scenario.expect_status} (e.g. {wrong[0]})"
                    )
        self.log(
            f"{topology.instances}x {scenario.key}: primed {len(paths):,} emails on each referral instance"
            f" in {time.monotonic() - started:.1f} s"
        )

    def _groups(self, topology: topologies.Topology) -> dict[str, list[int]]:
        return {**topology.pids(), **self.external.pids()}

    def _scenario(
        self, context: PassContext, scenario: Scenario
    ) -> tuple[Any, dict[str, dict[str, float]] | None, dict[str, float] | None]:
        options = self.options
        topology = context.topology
        problems: list[str] = []
        runs: list[wrk.WrkResult] = []
        cpu: list[float] = []
        other: dict[str, list[float]] = {}
        extra: dict[str, list[float]] = {}
        lag: dict[str, dict[str, float]] | None = None
        health: dict[str, float] | None = None
        paths: dict[str, float] = {}
        kinds: dict[str, dict[str, Any]] = {}
        profile_of: dict[str, profiling.Profile] = {}
        label = f"{topology.instances}x {scenario.key}"
        floor = max(scenario.min_seconds, S8_MIN_SECONDS if scenario.password_hashing else 1)
        warmup_s, run_count = options.warmup, options.runs
        if options.smoke and scenario.key in endpoint_scenarios.BY_KEY:
            warmup_s, run_count = 0, SMOKE_ENDPOINT_RUNS  # CI's time: one run shows the scenario works
        schedule = ([("warmup", max(floor, warmup_s))] if warmup_s else []) + [
            (f"run {n + 1}", max(floor, options.duration)) for n in range(run_count)
        ]
        lag_before: dict[str, dict[float, float] | None] = {}
        sampler: HealthzSampler | None = None
        try:
            self._prime(topology, scenario)
            for phase, seconds in schedule:
                recorded = phase != "warmup"
                if scenario.key == "S8" and recorded and sampler is None:
                    lag_before = {p.name: lag_buckets(p.url) for p in topology.services}
                    sampler = HealthzSampler([p.url for p in topology.auth])
                    sampler.__enter__()
                plan = context.plan(scenario, phase, seconds)
                if plan.note:
                    self.log(f"{label} {phase}: {plan.note}")
                if scenario.key == "S1-DB":
                    context.forget_lookups()
                self._quiesce(topology, f"{label} {phase}")
                metrics_before, _ = mixes.scrape(p.url for p in topology.services)
                meter = context.endpoints.meter(scenario.key)  # WEBHOOK-RELAY's deliveries
                if meter is not None:
                    meter.start()
                sampler_ = self._profiler(topology, scenario, phase, seconds, schedule, problems)
                before = snapshot(self._groups(topology))
                result = wrk.run_wrk(
                    topology.gateway_url,
                    plan.script,
                    duration=seconds,
                    connections=options.connections,
                    threads=options.threads,
                    args=plan.args,
                    timeout_s=options.timeout,
                )
                used = cpu_seconds(before, snapshot(self._groups(topology)))
                if sampler_ is not None:
                    profiled, missing = sampler_.finish()
                    for group, found in profiled.items():
                        profile_of.setdefault(group, profiling.Profile()).merge(found)
                    for error in missing:  # a sampler's failure, not the services': said, not fatal
                        note = f"{label} {phase}: a process left out of the profile: {error}"
                        self.log.loud(note)
                        self.notes.append(note)
                metrics_after, failures = mixes.scrape(p.url for p in topology.services)
                if meter is not None:
                    figures = meter.finish(result.requests - sum(result.unexpected.values()))
                    self.log(f"{label} {phase}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()))
                    if recorded:
                        for name, value in figures.items():
                            extra.setdefault(name, []).append(value)
                context.record(scenario, phase, result)
                per_request = {
                    group: (seconds_used * 1e6 / result.requests if result.requests else math.nan)
                    for group, seconds_used in used.items()
                }
                self.log(
                    f"{label} {phase}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.1f} ms,"
                    f" p99 {result.p99_ms:.1f} ms, {result.requests:,} requests, failed {result.failed},"
                    f" {scenario.service} CPU {per_request.get(scenario.service, math.nan):,.0f} µs/req"
                )
                if not recorded:
                    problems += _run_problems(phase, result)
                if dead := topology.dead():
                    problems += [f"{phase}: {d}" for d in dead]
                    break
                if not recorded:
                    continue
                runs.append(result)
                problems += [f"{phase}: could not scrape {failure}" for failure in failures]
                moved = mixes.delta(metrics_before, metrics_after)
                for source, count in mixes.lookup_paths(moved).items():
                    paths[source] = paths.get(source, 0.0) + count
                if result.kinds:
                    self._judge(scenario, phase, result, moved, kinds, problems)
                cpu.append(per_request.get(scenario.service, math.nan))
                for group in (OTHER_SERVICE[scenario.service], "nginx", "postgres", "redis"):
                    if group in per_request:
                        other.setdefault(group, []).append(per_request[group])
        except (wrk.WrkError, HarnessError, ValueError, OSError) as error:
            problems.append(f"{type(error).__name__}: {error}")
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
                health = sampler.summary()
                if sampler.failures:
                    problems.append(
                        f"/healthz on the auth ports failed {len(sampler.failures)} times during S8,"
                        f" e.g. {sampler.failures[0]}"
                    )
                lag = self._lag(topology, lag_before)
                if health:
                    self.log(
                        f"{label}: /healthz on the auth ports: p50 {health['p50']:.1f} ms,"
                        f" p99 {health['p99']:.1f} ms, max {health['max']:.1f} ms"
                        f" ({len(sampler.latencies)} samples)"
                    )
        result_ = reports.ScenarioResult(
            key=scenario.key,
            title=scenario.title,
            service=scenario.service,
            expect_status=scenario.expect_status,
            runs=runs,
            cpu_us_per_request=cpu,
            other_cpu_us_per_request=other,
            problems=problems,
            lookup_paths=paths if sum(paths.values()) > 0 else {},
            kinds=kinds,
            settings=dict(scenario.settings),
            kind=scenario.kind,
            password_hashing=scenario.password_hashing,
            extra=extra,
            profiles=profile_of,
        )
        if shares := mixes.shares(paths):
            self.log(
                f"{label}: lookups by email answered by "
                + ", ".join(f"{source} {100 * share:.1f} %" for source, share in shares.items())
                + f" ({sum(paths.values()):,.0f} lookups)"
            )
        for problem in [*problems, *result_.run_problems()]:
            self.log.loud(f"{label}: {problem}")
        return result_, lag, health

    def _profiler(
        self,
        topology: topologies.Topology,
        scenario: Scenario,
        phase: str,
        seconds: int,
        schedule: Sequence[tuple[str, int]],
        problems: list[str],
    ) -> profiling.Sampler | None:
        """py-spy on both services' processes during the scenario's last recorded run, if asked."""
        if not self.options.profile or phase != schedule[-1][0] or phase == "warmup":
            return None
        pids = {group: pids for group, pids in topology.pids().items() if group in OTHER_SERVICE}
        try:
            label = f"{topology.instances}x-{scenario.key}"
            return profiling.Sampler(pids, seconds, self.out_dir / "profiles", label)
        except profiling.ProfileError as error:
            problems.append(f"{phase}: no profile: {error}")
            return None

    def _judge(
        self,
        scenario: Scenario,
        phase: str,
        result: wrk.WrkResult,
        moved: mixes.Samples,
        kinds: dict[str, dict[str, Any]],
        problems: list[str],
    ) -> None:
        """Add a mix.lua run's requests and answers per kind to `kinds`; a problem per unexpected kind."""
        judged = mixes.judge_kinds(result.kinds, mixes.route_statuses(moved))
        for key, figures in judged.items():
            if not figures.sent and not figures.unexpected and key not in kinds:
                continue
            total = kinds.setdefault(
                key, {"sent": 0, "expect": figures.expect, "answers": {}, "unexpected": 0}
            )
            if scenario.key == "MIX":
                total["share"] = mixes.KIND[key].share
            total["sent"] += figures.sent
            total["unexpected"] += figures.unexpected
            for status, count in figures.answers.items():
                total["answers"][status] = total["answers"].get(status, 0) + count
            if figures.unexpected:
                problems.append(
                    f"{phase}: {figures.unexpected} answers to {key} requests not {figures.expect}"
                    f" (its route answered {figures.answers})"
                )

    def _lag(
        self, topology: topologies.Topology, before: Mapping[str, dict[float, float] | None]
    ) -> dict[str, dict[str, float]]:
        lag: dict[str, dict[str, float]] = {}
        for process in topology.services:
            earlier = before.get(process.name)
            later = lag_buckets(process.url)
            if earlier is None or later is None:
                message = f"{process.name}: no {LAG_METRIC} histogram on {process.url}/metrics"
                self.log.loud(f"event-loop lag not measured: {message}")
                if message not in self.notes:
                    self.notes.append(message)
                continue
            summary = lag_summary(earlier, later)
            ticks = (later.get(math.inf, 0.0) - earlier.get(math.inf, 0.0)) if math.inf in later else 0.0
            if not summary:
                self.log.loud(f"{process.name}: its {LAG_METRIC} histogram counted no tick during S8")
                continue
            lag[process.name] = summary
            self.log(
                f"{process.name}: event-loop lag during S8: p99 <= {summary['p99_ms']:g} ms,"
                f" max <= {summary['max_ms']:g} ms ({ticks:.0f} ticks)"
            )
        return lag


def _run_problems(phase: str, result: wrk.WrkResult) -> list[str]:
    problems: list[str] = []
    if result.failed:
        errors = {k: v for k, v in result.errors.items() if v}
        problems.append(
            f"{phase}: {result.failed} failed requests (wrk errors {errors}, unexpected statuses"
            f" {result.unexpected})"
        )
    if result.exhausted:
        problems.append(f"{phase}: the request file ran out: {result.exhausted} requests reused one")
    if result.requests == 0:
        problems.append(f"{phase}: no request completed")
    return problems


# --- the report's context ------------------------------------------------------------------------


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (done.stdout.strip() or done.stderr.strip() or "unknown").splitlines()[0]


def machine(database_url: str, redis_url: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    postgres = "unknown"
    with (
        contextlib.suppress(psycopg2.Error),
        contextlib.closing(psycopg2.connect(database_url)) as conn,
        conn.cursor() as cursor,
    ):
        cursor.execute("SHOW server_version")
        postgres = str(cursor.fetchone()[0])
    redis_version = "unknown"
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.RedisError):
        redis_version = str(client.info("server").get("redis_version", "unknown"))
    client.close()
    return {
        "cpu": cpu,
        "cpus": os.cpu_count() or 0,
        "memory_gib": round(memory_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _first_line(["nginx", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "postgres": postgres,
        "redis": redis_version,
    }


def settings(options: Options, notes: Sequence[str]) -> dict[str, Any]:
    return {
        "scale": options.scale,
        "instances": list(options.instances),
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "runs": options.runs,
        "connections": options.connections,
        "threads": options.threads,
        "wrk_timeout_s": options.timeout,
        "s8_min_seconds": S8_MIN_SECONDS,  # and of every password-hashing scenario
        "webhooks": (
            "off (no *_WEBHOOK_URLS) but for WEBHOOK-RELAY, which runs in a topology of its own after the"
            " pass's other scenarios, with both services' webhooks to a receiver of the benchmark's"
            " (aiohttp, 204) on 127.0.0.1"
        ),
        "oauth_provider": (
            f"'{endpoint_scenarios.PROVIDER}' (its discovery document served by the benchmark on 127.0.0.1)"
            " when A-AUTHORIZE runs, else none"
        ),
        "once_only_subjects": (
            "written into the database before each run of a once-only write: its fastest run so far"
            f" x {endpoint_scenarios.ONCE_SLACK:g} (else the S0 ceiling or a first guess) x seconds"
            " + connections"
        ),
        "before_each_run": "wait until the services are idle (the previous run's leftovers done)",
        "scenarios": list(options.scenarios),
        "smoke": options.smoke,
        "postgres_server": "embedded (deploy/local/embedded.py, as make run starts it)"
        if options.embedded_postgres
        else "DATABASE_URL's",
        **(
            {
                "smoke_endpoint_scenarios": (
                    f"{SMOKE_ENDPOINT_RUNS} run, no warmup, first pass only (R-*, A-*, WEBHOOK-RELAY)"
                )
            }
            if options.smoke
            else {}
        ),
        "gateway": "nginx (deploy.nginx.render), access log on",
        "gateway_rate_limits": (
            f"{topologies.BENCH_LIMITS['rate']} burst {topologies.BENCH_LIMITS['burst']} on every zone:"
            " effectively off, the benchmark measures the services, not the limiter"
        ),
        "services": "production mode, access log on (INFO), every other setting the service's default",
        "argon2": {
            "time_cost": AuthSettings.argon2_time_cost,
            "memory_kib": AuthSettings.argon2_memory_kib,
            "parallelism": AuthSettings.argon2_parallelism,
            "hash_workers": os.cpu_count() or 2,
        },
        "db_pool_max": {"auth": AuthSettings.db_pool_max, "referral": ReferralSettings.db_pool_max},
        "cpu_per_request": (
            "utime+stime from /proc over each run / the run's requests; services: every instance of the"
            " scenario's service; nginx: master and workers; postgres: the benchmark database's backends"
            " and the server's background processes; redis: redis-server"
        ),
        "notes": list(notes),
    }


# --- main ----------------------------------------------------------------------------------------


def _check_servers(database_url: str, redis_url: str) -> list[str]:
    failures: list[str] = []
    try:
        psycopg2.connect(database_url, connect_timeout=5).close()
    except psycopg2.Error as error:
        failures.append(f"PostgreSQL is not reachable at DATABASE_URL ({_masked(database_url)}): {error}")
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        failures.append(f"Redis is not reachable at REDIS_URL ({_masked(redis_url)}): {error}")
    finally:
        client.close()
    for tool, hint in (("nginx", "apt-get install -y nginx"), ("wrk", wrk.INSTALL_HINT)):
        if shutil.which(tool) is None:
            failures.append(f"{tool} is not installed (not on PATH): {hint}")
    return [f.strip() for f in failures]


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


KEEP_RUNS = 5  # the runs kept under --out: this one and the 4 before it
_RUN_NAME = re.compile(r"[0-9]{8}-[0-9]{6}(?:-[0-9]+)?")


def prune_runs(out_root: Path, keep: int = KEEP_RUNS) -> list[Path]:
    """Delete all but the newest `keep` run directories under `out_root` (named by their start time,
    so the names sort by age); the ones deleted. Anything else there is left alone."""
    runs = sorted(
        p for p in out_root.iterdir() if p.is_dir() and not p.is_symlink() and _RUN_NAME.fullmatch(p.name)
    )
    old = runs[:-keep] if keep > 0 else runs
    for run_dir in old:
        shutil.rmtree(run_dir, ignore_errors=True)
    return old


def _link_latest(out_root: Path, run_dir: Path) -> None:
    latest = out_root / "latest"
    partial = out_root / f".latest.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    partial.symlink_to(run_dir.name)
    partial.replace(latest)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _dataset_summary(dataset: datasets.Dataset) -> dict[str, Any]:
    return {
        "scale": dataset.scale,
        "users": dataset.users,
        "codes": dataset.codes,
        "referrals": dataset.referrals,
        "load_seconds": round(dataset.load_seconds, 2),
        "big_referrers": len(dataset.big_referrers),
        "code_emails": len(dataset.code_emails),
        "unknown_emails": len(dataset.unknown_emails),
        "token_users": len(dataset.token_users),
        "activators": len(dataset.activators),
        "activation_codes": len(dataset.activation_codes),
        "login_emails": len(dataset.login_emails),
    }


def run(options: Options) -> int:
    """The whole benchmark; the exit code."""
    started_at = datetime.now(UTC)
    wall = time.monotonic()
    server_database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    out_root = options.out.resolve()
    run_dir = out_root / started_at.strftime("%Y%m%d-%H%M%S")
    if run_dir.exists():
        run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    run_dir.mkdir(parents=True)
    _link_latest(out_root, run_dir)
    pruned = prune_runs(out_root)
    log = Log(run_dir / "bench.log")
    log(f"bench: output in {run_dir}" + (f" ({len(pruned)} older run(s) deleted)" if pruned else ""))
    with contextlib.ExitStack() as stack:
        if options.embedded_postgres:
            try:
                server_database_url = stack.enter_context(embedded_postgres(log))
            except EmbeddedServerError as error:
                log.loud(f"bench: the embedded PostgreSQL did not start: {error}")
                return 2
        return _run(options, started_at, wall, server_database_url, redis_url, run_dir, log)
    raise AssertionError("unreachable")  # the with block returns (mypy cannot tell)


@contextlib.contextmanager
def embedded_postgres(log: Log) -> Iterator[str]:
    """An embedded PostgreSQL started as `make run` starts it (deploy.local.embedded.start_postgres),
    in a temporary folder deleted afterwards; its URL."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    started = time.monotonic()
    try:
        server = start_postgres(data_dir / "postgres")
        try:
            log(
                f"bench: embedded PostgreSQL (pid {server.pid}) in {data_dir},"
                f" up in {time.monotonic() - started:.1f}s"
            )
            yield server.url
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _run(
    options: Options,
    started_at: datetime,
    wall: float,
    server_database_url: str,
    redis_url: str,
    run_dir: Path,
    log: Log,
) -> int:
    if failures := _check_servers(server_database_url, redis_url):
        for failure in failures:
            log.loud(failure)
        return 2
    redis_prefix = f"bench:{secrets.token_hex(6)}:"
    problems: list[str] = []
    passes: list[Any] = []
    plans: dict[str, str] = {}
    warnings: list[str] = []
    notes: list[str] = []
    context: dict[str, Any] = {}
    try:
        with fresh_database(server_database_url, f"bench_{os.getpid()}") as database_url:
            log(f"bench: database {urlsplit(database_url).path.lstrip('/')}, Redis prefix {redis_prefix}")
            migrate(database_url, redis_url, run_dir)
            dataset = datasets.build(database_url, scale=options.scale, seed=options.seed, log=log)
            context = {"machine": machine(database_url, redis_url)}
            external = ExternalProcesses(database_url, redis_url, log)
            bench = Bench(
                options,
                database_url=database_url,
                redis_url=redis_url,
                redis_prefix=redis_prefix,
                dataset=dataset,
                out_dir=run_dir,
                log=log,
                external=external,
            )
            try:
                for index, instances in enumerate(options.instances):
                    outcome = bench.run_pass(index, instances)
                    passes.append(outcome.pass_)
                    if not outcome.pass_.scenarios:  # else they are on its last scenario
                        problems += outcome.problems
                    for scenario in outcome.pass_.scenarios:
                        found = [*scenario.problems, *scenario.run_problems()]
                        problems += [f"{scenario.key} ({instances} inst.): {problem}" for problem in found]
            finally:
                external.close()
                bench.endpoints.close()
                notes += [n for n in [*external.notes, *bench.notes] if n not in notes]
            log("bench: EXPLAIN ANALYZE of the S1-S4 queries")
            plans = query_plans.explain(database_url, dataset)
            warnings = query_plans.plan_warnings(plans)
    except KeyboardInterrupt:
        log.loud("bench: interrupted; everything started was stopped, the database dropped")
        return 130
    except Exception as error:  # a failure before any figure: the traceback, loudly, and exit 1
        log(traceback.format_exc().rstrip())
        log.loud(f"bench: failed: {type(error).__name__}: {error}")
        return 1
    finally:
        with contextlib.suppress(redis.RedisError):
            drop_redis_keys(redis_url, redis_prefix)
    report = reports.BenchReport(
        started_at=started_at.isoformat(timespec="seconds"),
        git_revision=git_revision(),
        machine=context.get("machine", {}),
        settings=settings(options, notes),
        dataset=_dataset_summary(dataset),
        passes=passes,
        plans=plans,
        plan_warnings=warnings,
    )
    text = reports.render_text(report)
    print(text, flush=True)
    (run_dir / "report.txt").write_text(text + "\n", encoding="utf-8")
    markdown = "\n\n".join(
        f"### {p.instances} instance(s) of each service\n\n{reports.render_markdown_table(p)}" for p in passes
    )
    (run_dir / "report.md").write_text(markdown + "\n", encoding="utf-8")
    reports.write_json(report, run_dir / "report.json")
    try:
        reports.draw_chart(report, run_dir / "report.png")
    except Exception as error:  # the chart is a nicety: say so, keep the report
        problems.append(f"the chart could not be drawn: {type(error).__name__}: {error}")
    log(f"bench: report in {run_dir} (report.txt, report.md, report.json, report.png)")
    log(f"bench: wall time {time.monotonic() - wall:.0f}s")
    if warnings:
        log(f"bench: {len(warnings)} query plan warning(s) in the report: shown, not a failure")
    if problems:
        log.loud(f"bench: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        return 1
    log("bench: no errors, no unexpected statuses, no reuse, every process stopped cleanly")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(options)
    finally:
        signal.signal(signal.SIGTERM, previous)
