"""The capacity plan's arithmetic on a made-up report, and its Redis measurement on the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.perf import capacity
from tests.perf.report import write_json
from tests.perf.test_report import bench, one_instance, scenario


def with_mix(path: Path) -> Path:
    one = one_instance()
    mix = scenario("MIX", [500, 520, 480], [800, 810, 790])
    mix.other_cpu_us_per_request = {
        "auth": [1500.0] * 3,
        "nginx": [120.0] * 3,
        "postgres": [350.0] * 3,
        "redis": [50.0] * 3,
    }
    one.scenarios.append(mix)
    write_json(bench(one), path)
    return path


def test_the_plan_scales_the_measured_cost_per_request(tmp_path: Path) -> None:
    cost = capacity.mix_cost(capacity.reports.read_json(with_mix(tmp_path / "report.json")))
    assert cost.us == {"referral": 800, "auth": 1500, "nginx": 120, "postgres": 350, "redis": 50}

    low, middle, high = capacity.plan(cost, [1_000, 10_000, 100_000])

    assert low.cores["referral"] == pytest.approx(0.8)
    assert low.pods == {"auth": 3, "referral": 2, "gateway": 2}  # 1.5 cores / 0.7 -> 3; never below 2
    assert middle.pods["referral"] == 12  # 8 cores at 70 % of one core each: 11.4 -> 12
    assert high.cores["postgres"] == pytest.approx(35.0)
    assert high.pods["gateway"] == 35  # 12 cores, pods of 0.5 core at 70 %: 34.3 -> 35
    assert high.connections == (high.pods["auth"] + high.pods["referral"]) * capacity.POOL_MAX


def test_the_limits_name_what_gives_out_first(tmp_path: Path) -> None:
    cost = capacity.mix_cost(capacity.reports.read_json(with_mix(tmp_path / "report.json")))
    found = capacity.limits(cost)

    assert found["Redis (one thread)"] == pytest.approx(16_000)  # 0.8 s of CPU a second / 50 µs
    assert found[f"PostgreSQL ({capacity.PG_CORES}-core primary)"] == pytest.approx(16e6 / 350)
    # 100 connections: (auth + referral pods) x 8 passes 100 once there are 13 pods
    at = found[f"PostgreSQL connections without a pooler ({capacity.PG_MAX_CONNECTIONS})"]
    assert capacity.plan(cost, [int(at)])[0].connections > capacity.PG_MAX_CONNECTIONS
    assert capacity.plan(cost, [int(at * 0.9)])[0].connections <= capacity.PG_MAX_CONNECTIONS


def test_the_command_prints_the_table_and_refuses_a_report_without_a_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert capacity.main([str(with_mix(tmp_path / "report.json"))]) == 0
    out = capsys.readouterr().out
    assert "| 100,000 req/s |" in out and "Redis (one thread): 16,000" in out

    write_json(bench(one_instance()), tmp_path / "no-mix.json")
    assert capacity.main([str(tmp_path / "no-mix.json")]) == 2
    assert "no MIX scenario" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text(json.dumps({"passes": []}))
    assert capacity.main([str(tmp_path / "broken.json")]) == 2


async def test_redis_memory_is_measured_through_the_code_cache_and_cleaned_up(redis_url: str) -> None:
    measured = await capacity.redis_bytes_per_user(redis_url, users=300)

    # Two JSON entries of a code (about 300 bytes each) and their keys: hundreds of bytes, not tens.
    assert 300 < measured["user_bytes"] < 5_000
    assert 20 < measured["unknown_bytes"] < measured["user_bytes"]
    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match="capacity-*"))
    finally:
        client.close()
