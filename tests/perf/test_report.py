"""The benchmark report on made-up figures: targets, text, Markdown, JSON and the chart."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.perf.report import (
    PROBLEM_MARK,
    BenchReport,
    Pass,
    ScenarioResult,
    Target,
    draw_chart,
    problems,
    read_json,
    render_markdown_table,
    render_text,
    report_json,
    targets,
    write_json,
)
from tests.perf.wrk import WrkResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_ERRORS = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}


def run(
    rps: float,
    p50_ms: float = 1.0,
    *,
    expect: int | None = 200,
    unexpected: dict[str, int] | None = None,
    errors: dict[str, int] | None = None,
    exhausted: int = 0,
) -> WrkResult:
    return WrkResult(
        requests=int(rps * 10),
        duration_s=10.0,
        rps=rps,
        p50_ms=p50_ms,
        p90_ms=p50_ms * 2,
        p99_ms=p50_ms * 4,
        max_ms=p50_ms * 10,
        mean_ms=p50_ms * 1.2,
        errors=errors or dict(NO_ERRORS),
        unexpected=unexpected or {},
        exhausted=exhausted,
        expect=expect,
    )


def scenario(
    key: str, rps: list[float], cpu: list[float], *, p50_ms: float = 1.0, service: str = "referral"
) -> ScenarioResult:
    return ScenarioResult(
        key=key,
        title=f"title of {key}",
        service=service,
        expect_status=404 if key == "S2" else 200,
        runs=[run(r, p50_ms) for r in rps],
        cpu_us_per_request=cpu,
        other_cpu_us_per_request={"nginx": [20.0, 22.0, 21.0], "postgres": [5.0, 6.0, 7.0]},
    )


def one_instance() -> Pass:
    return Pass(
        instances=1,
        scenarios=[
            scenario("S0", [10_000, 9_000, 11_000], [40, 41, 39]),
            scenario("S1", [4_000, 3_500, 4_200], [120, 125, 110]),  # MET: 0.40 x S0, 120 µs
            scenario("S2", [2_000, 2_500, 2_900], [150, 140, 160]),  # MISSED: 0.25 x S0, 150 µs
            scenario("S3", [3_000, 3_000, 3_000], [180, 190, 170], p50_ms=2.0),
            scenario("S4", [2_800, 2_900, 3_000], [300, 310, 290], p50_ms=2.5),  # CPU 1.67x: MISSED
            scenario("S5", [3_000, 3_100, 3_200], [199, 200, 201], service="auth"),  # 200: MET
            scenario("S6", [900, 950, 1_000], [600, 610, 620], service="auth"),
            scenario("S7", [800, 850, 900], [700, 710, 720]),
            scenario("S8", [30.5, 31.0, 29.5], [30_000, 31_000, 29_000], p50_ms=250, service="auth"),
            scenario("S1-REDIS", [2_000, 2_100, 1_900], [150, 140, 160]),  # 150: MET
        ],
        idle_rss_mb={"auth": 80.0, "referral": 95.5, "nginx": 300.0},
        final_rss_mb={"auth": 110.0, "referral": 101.0, "nginx": 310.0},
        loop_lag={"auth": {"p99_ms": 5.0, "max_ms": 15.0}, "referral": {"p99_ms": 2.0, "max_ms": 50.0}},
        healthz_ms={"p50": 2.0, "p99": 12.0, "max": 18.0},
    )


def two_instances() -> Pass:
    single = one_instance()
    return replace(
        single,
        instances=2,
        scenarios=[scenario("S0", [12_000] * 3, [40] * 3), scenario("S1", [7_000] * 3, [115] * 3)],
        idle_rss_mb={"auth-1": 81.0, "auth-2": 125.0, "referral-1": 90.0, "referral-2": 91.0},
        final_rss_mb={"auth-1": 90.0, "auth-2": 130.0, "referral-1": 99.0, "referral-2": 98.0},
        loop_lag={"auth-1": {"p99_ms": 10.0, "max_ms": 20.0}, "auth-2": {"p99_ms": 5.0, "max_ms": 10.0}},
        healthz_ms={"p50": 3.0, "p99": 25.0, "max": 40.0},
    )


def bench(*passes: Pass) -> BenchReport:
    return BenchReport(
        started_at="2026-01-02T03:04:05Z",
        git_revision="abc1234",
        machine={"cpus": "2", "model": "Made-up CPU", "kernel": "6.1", "python": "3.11.7"},
        settings={
            "scale": 1.0,
            "duration": 10,
            "connections": 64,
            "threads": 2,
            "runs": 3,
            "instances": [1, 2],
        },
        dataset={"users": 10_000, "referrals": 100_000, "load_seconds": 12.5},
        passes=list(passes),
        plans={
            "referrals_page": "Index Scan using referrals_referrer_id_idx on referrals\n"
            "  Execution Time: 0.1 ms"
        },
        plan_warnings=[],
    )


def by_name(found: list[Target]) -> dict[str, Target]:
    return {target.name: target for target in found}


def test_targets_met_and_missed_on_one_pass() -> None:
    found = by_name(targets(bench(one_instance())))

    assert found["S1 service CPU per request"].met is True
    assert found["S1 service CPU per request"].measured == "120 µs/req"
    assert found["S1 req/s against S0's"].met is True
    assert found["S1 req/s against S0's"].measured.startswith("0.40 x S0")
    assert found["S2 service CPU per request"].met is False
    assert found["S2 req/s against S0's"].met is False  # 2500 / 10000
    assert found["S3 service CPU per request"].met is True
    assert found["S5 service CPU per request"].met is True  # 200 is within "<= 200"
    assert found["S4 (deep cursor) CPU against S3 (first page)"].met is False  # 300 / 180
    assert found["S4 (deep cursor) p50 against S3 (first page)"].met is True  # 2.5 / 2.0
    # Only the auth processes count: the referral process's 50 ms does not.
    assert found["S8 event-loop lag of every auth process"].met is True
    assert "15 ms" in found["S8 event-loop lag of every auth process"].measured
    assert found["S8 /healthz p99 on the auth service"].met is True
    # nginx's 300 MB is no service process.
    assert found["Idle RSS of every service process"].met is True
    assert "referral" in found["Idle RSS of every service process"].measured
    scaling = found["S1 req/s with 2 instances against 1"]
    assert scaling.met is None
    assert "no 2-instance pass" in scaling.measured


def test_targets_over_two_passes() -> None:
    found = by_name(targets(bench(one_instance(), two_instances())))

    scaling = found["S1 req/s with 2 instances against 1"]
    assert scaling.met is True  # 7000 / 4000 = 1.75
    assert scaling.measured.startswith("1.75 x")
    # The worst over every pass: auth-1's bucket of 20 ms holds lags <= 20 ms; auth-2 is too big idle.
    lag = found["S8 event-loop lag of every auth process"]
    assert lag.met is True
    assert "auth-1 (2 inst.)" in lag.measured
    assert found["S8 /healthz p99 on the auth service"].met is False  # 25 ms in the 2-instance pass
    rss = found["Idle RSS of every service process"]
    assert rss.met is False
    assert "auth-2 (2 inst.): 125 MB" in rss.measured
    # S1-S5 come from the 1-instance pass.
    assert found["S2 req/s against S0's"].met is False

    slower = replace(two_instances(), scenarios=[scenario("S1", [5_000] * 3, [115] * 3)])
    assert by_name(targets(bench(one_instance(), slower)))["S1 req/s with 2 instances against 1"].met is False


def test_targets_not_measurable() -> None:
    bare = Pass(instances=1, scenarios=[], idle_rss_mb={}, final_rss_mb={}, loop_lag={}, healthz_ms={})
    found = targets(bench(bare))
    assert len(found) == 13
    assert all(target.met is None for target in found)
    assert all(target.measured.startswith("not measured") for target in found)

    no_cpu = replace(
        one_instance(), scenarios=[replace(s, cpu_us_per_request=[]) for s in one_instance().scenarios]
    )
    by = by_name(targets(bench(no_cpu)))
    assert by["S1 service CPU per request"].met is None
    assert by["S1 req/s against S0's"].met is True


def test_text_report_without_problems() -> None:
    report = bench(one_instance(), two_instances())
    text = render_text(report)

    assert "== Pass: 1 instance of each service ==" in text
    assert "== Pass: 2 instances of each service ==" in text
    lines = text.splitlines()
    s1 = next(line for line in lines if line.startswith("S1 title of S1"))
    assert "4000 (3500-4200)" in s1
    assert "0.40" in s1  # x S0
    assert "120" in s1  # CPU
    header = next(line for line in lines if line.startswith("Scenario"))
    assert "nginx µs/req" in header
    assert "PG µs/req" in header
    assert "Redis" not in header
    s8 = next(line for line in lines if line.startswith("S8 "))
    assert "30.5 (29.5-31.0)" in s8
    assert "MISSED  S2 req/s against S0's" in text
    assert "MET     S1 service CPU per request" in text
    assert "N/A" not in text
    assert PROBLEM_MARK not in text
    assert "No problems" in text
    assert "Index Scan using referrals_referrer_id_idx" in text


def test_text_report_shouts_problems() -> None:
    single = one_instance()
    s2 = single.scenarios[2]
    s2.runs[1] = run(2500, expect=404, unexpected={"200": 3}, errors={**NO_ERRORS, "read": 2})
    s7 = single.scenarios[7]
    s7.runs[0] = run(800, exhausted=12)
    s7.problems.append("referral answered 409 to a reused code")
    report = bench(single)
    report.plan_warnings.append("referrals_page: Seq Scan on referrals")

    found = problems(report)
    assert found == [
        "S2 (1 inst.): run 2: 3 answers not 404 (200 x3); socket errors (read 2)",
        "S7 (1 inst.): referral answered 409 to a reused code",
        "S7 (1 inst.): run 1: 12 requests reused a line or token (the file ran out)",
        "plan: referrals_page: Seq Scan on referrals",
    ]
    text = render_text(report)
    assert f"{PROBLEM_MARK} PROBLEMS: 4" in text
    for problem in found:
        assert f"{PROBLEM_MARK} {problem}" in text
    assert "No problems" not in text
    s2_line = next(line for line in text.splitlines() if line.startswith("S2 "))
    assert " 5 " in s2_line  # errors: 3 wrong statuses + 2 read errors
    s7_line = next(line for line in text.splitlines() if line.startswith("S7 "))
    assert "0 +12 reused" in s7_line


def test_wrk_status_errors_count_when_no_status_was_expected() -> None:
    single = one_instance()
    single.scenarios[0].runs[0] = run(10_000, expect=None, errors={**NO_ERRORS, "status": 7})
    assert problems(bench(single)) == ["S0 (1 inst.): run 1: 7 answers not 200 (>= 400 x7)"]
    assert single.scenarios[0].errors_total == 7


def test_markdown_table() -> None:
    table = render_markdown_table(one_instance())
    lines = table.splitlines()
    assert lines[0].startswith("| Scenario | req/s median (min-max) |")
    assert lines[1].startswith("| --- | ---: |")
    assert len(lines) == 2 + 10
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_json_round_trips(tmp_path: Path) -> None:
    report = bench(one_instance(), two_instances())
    report.passes[0].scenarios[1].runs[0] = replace(
        report.passes[0].scenarios[1].runs[0], mean_ms=float("nan")
    )
    path = tmp_path / "bench.json"
    write_json(report, path)

    data = json.loads(path.read_text())
    s1 = data["passes"][0]["scenarios"][1]
    assert s1["key"] == "S1"
    assert s1["derived"]["rps_median"] == 4000
    assert s1["derived"]["share_of_s0"] == pytest.approx(0.4)
    assert s1["derived"]["cpu_median_us"] == 120
    assert s1["derived"]["other_cpu_median_us"] == {"nginx": 21.0, "postgres": 6.0}
    assert s1["runs"][0]["failed"] == 0
    assert s1["runs"][0]["mean_ms"] is None  # NaN is no JSON
    assert {target["name"] for target in data["targets"]} >= {"S1 service CPU per request"}
    assert data["problems"] == []
    assert data["settings"]["instances"] == [1, 2]

    again = read_json(path)
    assert render_text(again) == render_text(report)
    assert report_json(again) == report_json(report)


def test_lookup_paths_and_the_mix_kinds_are_reported_and_round_trip(tmp_path: Path) -> None:
    one = one_instance()
    redis_only = replace(
        next(s for s in one.scenarios if s.key == "S1-REDIS"),
        lookup_paths={"near": 0.0, "redis": 600.0, "database": 0.0},
        settings={"REFERRAL_NEAR_CACHE_SIZE": "0"},
    )
    mixed = replace(
        scenario("MIX", [900] * 3, [400] * 3),
        lookup_paths={"near": 75.0, "redis": 5.0, "database": 20.0},
        kinds={
            "lookup-known": {
                "share": 0.54,
                "sent": 90,
                "expect": 200,
                "answers": {"200": 90},
                "unexpected": 0,
            },
            "activation": {
                "share": 0.045,
                "sent": 10,
                "expect": 201,
                "answers": {"201": 9, "409": 1},
                "unexpected": 1,
            },
        },
    )
    others = [s for s in one.scenarios if s.key != "S1-REDIS"]
    report = bench(replace(one, scenarios=[*others, redis_only, mixed]))

    text = render_text(report)
    assert "S1-REDIS       0.0 %  100.0 %     0.0 %      600  REFERRAL_NEAR_CACHE_SIZE=0" in text
    assert "MIX           75.0 %    5.0 %    20.0 %      100                    defaults" in text
    assert "S1            " not in text.split("Lookups by email")[1].split("\n\n")[0]  # none counted: no row
    assert "  activation      4.5 %    10      10.0 %     201  201 x9, 409 x1           1" in text
    redis_target = by_name(targets(report))["S1-REDIS service CPU per request"]
    assert redis_target.met is True  # 150 is within "<= 150"
    assert redis_target.wanted == "≤ 150 µs/req (1 instance)"

    path = tmp_path / "bench.json"
    write_json(report, path)
    again = read_json(path)
    assert again.passes[0].scenario("MIX") == report.passes[0].scenario("MIX")
    assert render_text(again) == text


def test_chart_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "charts" / "bench.png"
    draw_chart(bench(one_instance(), two_instances()), path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000

    empty = tmp_path / "empty.png"
    draw_chart(bench(), empty)
    assert empty.read_bytes().startswith(PNG_SIGNATURE)
