"""The capacity plan: what a peak of the realistic mix needs, from a benchmark report's own figures.

    python -m tests.perf.capacity [REPORT_JSON] [--redis-url URL]

reads the MIX scenario of the report's one-instance pass (CPU µs per request of each service, nginx,
PostgreSQL and Redis, all measured over the same requests) and prints, for each peak in `RATES`:

- the CPU each part needs (rate x µs per request), and the pods of each service that the
  HorizontalPodAutoscalers in deploy/k8s would run for it: a pod is one event loop (`POD_CPU`, one
  core), kept at `HPA_UTILIZATION` of its request, never fewer than `MIN_PODS`;
- the PostgreSQL connections those pods open (pods x `*_DB_POOL_MAX` of deploy/k8s), against the
  server's `max_connections` there, and what a pooler changes;
- Redis: its CPU (one thread: the part that cannot be scaled out by adding pods) and, measured here
  with `--redis-url` by writing entries through the referral service's own `RedisCodeCache`, its
  memory per million users whose code lookups are cached;
- which part gives out first: the smallest rate at which a single-instance part (Redis's one thread,
  one PostgreSQL primary of `PG_CORES` cores) is full.

Only the rates, the pod shape and the PostgreSQL size are choices (constants below, said in the
output); every per-request figure comes from the report.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import secrets
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.perf import report as reports

RATES = (1_000, 10_000, 100_000)  # requests/s of the mix at the peak
POD_CPU = 1.0  # cores per service pod: one asyncio event loop uses one core at most
HPA_UTILIZATION = 0.70  # deploy/k8s: the HPAs' averageUtilization, of the pod's CPU request
MIN_PODS = 2  # deploy/k8s: minReplicas (and the PodDisruptionBudget keeps one)
GATEWAY_POD_CPU = 0.5  # deploy/k8s/gateway.yaml: nginx's CPU limit
POOL_MAX = 8  # deploy/k8s/kustomization.yaml: AUTH_DB_POOL_MAX and REFERRAL_DB_POOL_MAX
PG_MAX_CONNECTIONS = 100  # PostgreSQL's default max_connections
PG_CORES = 16  # the largest primary considered before sharding or read replicas
REDIS_FULL = 0.8  # share of Redis's one thread it can use before latency climbs
MEASURE_USERS = 20_000  # users whose entries are written to measure Redis's memory per user
BATCH = 50  # writes at once (fewer than the client pool's connections)


@dataclass(frozen=True)
class MixCost:
    """CPU µs per request of the mix, by part, and the run it came from."""

    rps: float
    us: dict[str, float]  # auth, referral, nginx, postgres, redis
    source: str


@dataclass(frozen=True)
class Row:
    rate: int
    cores: dict[str, float]
    pods: dict[str, int]
    connections: int


def mix_cost(report: reports.BenchReport) -> MixCost:
    """The MIX figures of the report's one-instance pass; ValueError when it has none."""
    one = next((p for p in report.passes if p.instances == 1), None)
    mix = one.scenario("MIX") if one else None
    if mix is None or mix.cpu_median_us is None:
        raise ValueError("the report has no MIX scenario measured with one instance of each service")
    us = {mix.service: mix.cpu_median_us, **mix.other_cpu_median_us}
    missing = [part for part in ("auth", "referral", "nginx", "postgres", "redis") if part not in us]
    if missing:
        raise ValueError(f"the report's MIX has no CPU figure for {', '.join(missing)}")
    source = f"{report.started_at} (git {report.git_revision})"
    return MixCost(rps=mix.rps_median or math.nan, us=us, source=source)


def pods_for(cores: float, pod_cpu: float = POD_CPU) -> int:
    return max(MIN_PODS, math.ceil(cores / (pod_cpu * HPA_UTILIZATION)))


def plan(cost: MixCost, rates: Sequence[int] = RATES) -> list[Row]:
    rows = []
    for rate in rates:
        cores = {part: rate * us / 1e6 for part, us in cost.us.items()}
        pods = {
            "auth": pods_for(cores["auth"]),
            "referral": pods_for(cores["referral"]),
            "gateway": pods_for(cores["nginx"], GATEWAY_POD_CPU),
        }
        rows.append(Row(rate, cores, pods, (pods["auth"] + pods["referral"]) * POOL_MAX))
    return rows


def limits(cost: MixCost) -> dict[str, float]:
    """The mix's rate at which each single-instance part is full."""
    return {
        "Redis (one thread)": REDIS_FULL * 1e6 / cost.us["redis"] if cost.us["redis"] > 0 else math.inf,
        f"PostgreSQL ({PG_CORES}-core primary)": PG_CORES * 1e6 / cost.us["postgres"],
        f"PostgreSQL connections without a pooler ({PG_MAX_CONNECTIONS})": _rate_at_connections(cost),
    }


def _rate_at_connections(cost: MixCost) -> float:
    """The rate above which the pods' pools exceed PostgreSQL's max_connections."""
    rate = 100
    while rate < 10_000_000:
        if plan(cost, [rate])[0].connections > PG_MAX_CONNECTIONS:
            return rate
        rate = int(rate * 1.05) + 1
    return math.inf


async def redis_bytes_per_user(redis_url: str, users: int = MEASURE_USERS) -> dict[str, float]:
    """Redis memory per cached user, measured: entries written through the referral service's
    RedisCodeCache (a user's code by email and by its text; an unknown email's absence) under a
    scratch prefix, each one's `MEMORY USAGE` (key, value and Redis's own overhead; other clients'
    keys and buffers do not count), then deleted."""
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from services.referral.adapters.code_cache import CodeCacheSettings, RedisCodeCache
    from services.referral.domain.models import ReferralCode
    from services.referral.settings import ReferralSettings

    defaults = {field.name: field.default for field in dataclasses.fields(ReferralSettings)}
    settings = CodeCacheSettings(
        ttl=int(defaults["cache_ttl"]), negative_ttl=int(defaults["negative_cache_ttl"]), timeout=5.0
    )
    prefix = f"capacity-{secrets.token_hex(4)}:"
    redis = Redis.from_url(redis_url)
    try:
        cache = RedisCodeCache(redis, prefix=prefix, settings=settings, registry=CollectorRegistry())
        now = datetime.now(UTC)
        for start in range(0, users, BATCH):
            numbers = range(start, min(users, start + BATCH))
            codes = [
                ReferralCode(
                    id=uuid.uuid4(),
                    code=secrets.token_urlsafe(6),
                    owner_id=uuid.uuid4(),
                    owner_email=f"bench.user{n}@example.com",
                    expires_at=now + timedelta(days=30),
                    created_at=now,
                    deleted_at=None,
                )
                for n in numbers
            ]
            await asyncio.gather(*(cache.code_created(code) for code in codes))
            await asyncio.gather(*(cache.fill_email(f"nobody{n}@example.org", None) for n in numbers))
        keys = [key.decode() async for key in redis.scan_iter(match=f"{prefix}*", count=10_000)]
        if len(keys) != 3 * users:  # a code by email and by text, and an unknown email, each
            raise RuntimeError(f"{len(keys)} entries in Redis, {3 * users} written: the cache lost some")
        sizes: dict[str, int] = {}
        for begin in range(0, len(keys), 1_000):
            pipe = redis.pipeline(transaction=False)
            for key in keys[begin : begin + 1_000]:
                pipe.memory_usage(key, samples=0)
            for key, size in zip(keys[begin : begin + 1_000], await pipe.execute(), strict=True):
                kind = "unknown" if key.endswith("@example.org") else "user"
                sizes[kind] = sizes.get(kind, 0) + int(size)
        return {
            "user_bytes": sizes["user"] / users,
            "unknown_bytes": sizes["unknown"] / users,
            "ttl_s": settings.ttl,
            "negative_ttl_s": settings.negative_ttl,
        }
    finally:
        async for key in redis.scan_iter(match=f"{prefix}*", count=10_000):
            await redis.delete(key)
        await redis.aclose()


def render(cost: MixCost, rows: Sequence[Row], redis_memory: dict[str, float] | None) -> str:
    out = [
        f"From the MIX of {cost.source}: {cost.rps:,.0f} req/s on one instance of each service;",
        "CPU µs per request of the mix: " + ", ".join(f"{part} {us:,.0f}" for part, us in cost.us.items()),
        f"Pods: {POD_CPU:g} core each (one event loop), kept at {HPA_UTILIZATION:.0%} (the HPAs' target),"
        f" at least {MIN_PODS}; gateway pods {GATEWAY_POD_CPU:g} core; pools {POOL_MAX} connections a pod.",
        "",
        "| peak of the mix | auth cores / pods | referral cores / pods | gateway cores / pods"
        " | PostgreSQL cores | Redis cores | PG connections (pods x pool) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        c, p = row.cores, row.pods
        out.append(
            f"| {row.rate:,} req/s | {c['auth']:,.1f} / {p['auth']} | {c['referral']:,.1f} / {p['referral']}"
            f" | {c['nginx']:,.1f} / {p['gateway']} | {c['postgres']:,.1f} | {c['redis']:,.2f}"
            f" | {row.connections:,} |"
        )
    out += ["", "Where a single-instance part is full (req/s of the mix):"]
    out += [f"- {name}: {rate:,.0f}" for name, rate in sorted(limits(cost).items(), key=lambda item: item[1])]
    if redis_memory:
        per_million = redis_memory["user_bytes"] * 1e6 / 2**20
        out += [
            "",
            f"Redis memory, measured (MEMORY USAGE of {MEASURE_USERS:,} users' entries that RedisCodeCache"
            " wrote): "
            f"{redis_memory['user_bytes']:,.0f} bytes per user whose code is cached (by email and by text),"
            f" {per_million:,.0f} MiB per million such users (entries live {redis_memory['ttl_s']:.0f} s"
            f" at most); {redis_memory['unknown_bytes']:,.0f} bytes per unknown email remembered"
            f" ({redis_memory['negative_ttl_s']:.0f} s).",
        ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    description = (__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m tests.perf.capacity", description=description)
    parser.add_argument(
        "report",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parents[2] / ".artifacts" / "bench" / "latest" / "report.json",
    )
    parser.add_argument("--redis-url", help="measure Redis's memory per user on this server (scratch keys)")
    args = parser.parse_args(argv)
    try:
        cost = mix_cost(reports.read_json(args.report))
    except (OSError, ValueError, KeyError) as error:
        print(f"capacity: {args.report}: {error}", file=sys.stderr)
        return 2
    memory = asyncio.run(redis_bytes_per_user(args.redis_url)) if args.redis_url else None
    print(render(cost, plan(cost), memory), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
