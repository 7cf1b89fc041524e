"""The benchmark's report: the figures of every pass, the issue's targets, text, JSON and a chart.

The orchestrator fills a `BenchReport`; this module only derives and renders. Process names (the
keys of `idle_rss_mb`, `final_rss_mb`, `loop_lag`) start with their service's name ("auth",
"auth-2", "referral-1", ...): that is how the auth processes and the service processes are told
from nginx, PostgreSQL or Redis.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.perf.profiles import Profile, explain
from tests.perf.wrk import WrkResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# The targets.
CPU_CACHED_US = 130.0  # S1, S2: service CPU per request
CPU_AUTHED_US = 200.0  # S3, S5
CPU_REDIS_PATH_US = 150.0  # a public read answered by Redis (S1-REDIS: the near cache off)
S0_SHARE = 0.3  # S1, S2: at least this share of S0's req/s
DEEP_PAGE_FACTOR = 1.5  # S4 against S3: CPU and p50
LOOP_LAG_MS = 20.0  # S8: the auth processes' event-loop lag
HEALTHZ_P99_MS = 20.0  # S8: /healthz on the auth service
SCALING = 1.5  # S1 with 2 instances against 1
IDLE_RSS_MB = 120.0  # every service process, idle
# Issue 15's targets by class of scenario, over every scenario measured (1 instance).
AUTH_READ = "authenticated read"
PUBLIC_READ = "public read"
WRITE = "write"
CLASS_CPU_US = {AUTH_READ: 200.0, PUBLIC_READ: 150.0}  # service CPU per request
P99_MS = 25.0  # every scenario but the password-hashing ones

SERVICES = ("auth", "referral")
OTHER_CPU_LABELS = {"nginx": "nginx", "postgres": "PG", "redis": "Redis"}
PROBLEM_MARK = "!!"


def _median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


@dataclass
class ScenarioResult:
    key: str  # "S0".."S9"
    title: str
    service: str  # "referral" | "auth": whose processes' CPU is counted
    expect_status: int
    runs: list[WrkResult]
    cpu_us_per_request: list[float]  # one per run: the service processes' CPU time delta / requests
    # e.g. {"nginx": [...], "postgres": [...], "redis": [...]}, one figure per run
    other_cpu_us_per_request: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what the orchestrator noticed
    # Lookups by email over the recorded runs by where the answer came from (near, redis, database),
    # from the referral service's referral_email_lookups_total; empty when the scenario made none.
    lookup_paths: dict[str, float] = field(default_factory=dict)
    # MIX: per kind, over the recorded runs: share planned, sent, answers by status, unexpected.
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, str] = field(
        default_factory=dict
    )  # the services' settings it ran with, if not the defaults
    kind: str = ""  # AUTH_READ, PUBLIC_READ or WRITE ("": not classified)
    password_hashing: bool = False  # argon2-bound: exempt from the p99 target
    # Figures of the scenario's own, one per run (WEBHOOK-RELAY: deliveries_per_s, ...)
    extra: dict[str, list[float]] = field(default_factory=dict)
    # py-spy's samples of each service's processes during the last recorded run (profiles.py)
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def rps_median(self) -> float | None:
        return _median(run.rps for run in self.runs)

    @property
    def rps_min(self) -> float | None:
        return min((run.rps for run in self.runs), default=None)

    @property
    def rps_max(self) -> float | None:
        return max((run.rps for run in self.runs), default=None)

    @property
    def p50_median_ms(self) -> float | None:
        return _median(run.p50_ms for run in self.runs)

    @property
    def p99_median_ms(self) -> float | None:
        return _median(run.p99_ms for run in self.runs)

    @property
    def errors_total(self) -> int:
        """Failed requests over every run: socket errors and answers of the wrong status."""
        return sum(run.failed for run in self.runs)

    @property
    def exhausted_total(self) -> int:
        """Requests sent after their file ran out, over every run: each one is a reuse."""
        return sum(run.exhausted for run in self.runs)

    @property
    def cpu_median_us(self) -> float | None:
        return _median(self.cpu_us_per_request)

    @property
    def other_cpu_median_us(self) -> dict[str, float]:
        return {
            name: median
            for name, values in self.other_cpu_us_per_request.items()
            if (median := _median(values)) is not None
        }

    def run_problems(self) -> list[str]:
        """What the runs' own figures say went wrong: failed requests, reuses, no answers at all."""
        found = []
        if not self.runs:
            found.append("no run")
        for number, run in enumerate(self.runs, 1):
            details = []
            if run.requests == 0:
                details.append("no answer at all")
            wrong = dict(run.unexpected) if run.judged_by_status else {}
            if not run.judged_by_status and run.errors.get("status"):
                wrong[">= 400"] = run.errors["status"]
            if wrong:
                counts = ", ".join(f"{status} x{count}" for status, count in sorted(wrong.items()))
                details.append(f"{sum(wrong.values())} answers not {self.expect_status} ({counts})")
            sockets = {kind: count for kind, count in run.errors.items() if kind != "status" and count}
            if sockets:
                counts = ", ".join(f"{kind} {count}" for kind, count in sorted(sockets.items()))
                details.append(f"socket errors ({counts})")
            if run.exhausted:
                details.append(f"{run.exhausted} requests reused a line or token (the file ran out)")
            if details:
                found.append(f"run {number}: " + "; ".join(details))
        return found


@dataclass
class Pass:
    """One topology: `instances` processes of each service."""

    instances: int
    scenarios: list[ScenarioResult]
    idle_rss_mb: dict[str, float]  # process name -> RSS (MB) after start, before load
    final_rss_mb: dict[str, float]  # after the pass
    loop_lag: dict[str, dict[str, float]]  # during S8: process -> {"p99_ms", "max_ms"} (bucket upper bounds)
    healthz_ms: dict[str, float]  # during S8: /healthz on the auth service(s): "p50", "p99", "max"

    def scenario(self, key: str) -> ScenarioResult | None:
        return next((s for s in self.scenarios if s.key == key), None)

    def share_of_s0(self, scenario: ScenarioResult) -> float | None:
        """The scenario's median req/s over S0's (the gateway's ceiling) in this pass."""
        s0 = self.scenario("S0")
        base = s0.rps_median if s0 else None
        rps = scenario.rps_median
        return rps / base if rps is not None and base else None

    @property
    def label(self) -> str:
        return f"{self.instances} instance{'s' if self.instances != 1 else ''} of each service"


@dataclass
class BenchReport:
    started_at: str
    git_revision: str
    machine: dict[str, str]  # cpu count, model, kernel, python
    settings: dict[str, object]  # scale, duration, connections, threads, runs, instances list
    dataset: dict[str, object]  # counts, load_seconds
    passes: list[Pass]
    plans: dict[str, str]  # EXPLAIN ANALYZE text per query name
    plan_warnings: list[str]


@dataclass(frozen=True)
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measurable in this run


# Targets ------------------------------------------------------------------------------------------


def _pass_with(report: BenchReport, instances: int) -> Pass | None:
    return next((p for p in report.passes if p.instances == instances), None)


def _processes(values: Mapping[str, Any], services: Sequence[str]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if name.startswith(tuple(services))}


NOT_MEASURED = "not measured"


def _cpu_target(one: Pass | None, key: str, limit: float) -> Target:
    name, wanted = f"{key} service CPU per request", f"≤ {limit:.0f} µs/req (1 instance)"
    scenario = one.scenario(key) if one else None
    cpu = scenario.cpu_median_us if scenario else None
    if cpu is None:
        return Target(name, wanted, NOT_MEASURED, None)
    return Target(name, wanted, f"{cpu:.0f} µs/req", cpu <= limit)


def _share_target(one: Pass | None, key: str) -> Target:
    name, wanted = f"{key} req/s against S0's", f"≥ {S0_SHARE:.2f} x S0 (same pass, 1 instance)"
    scenario = one.scenario(key) if one else None
    s0 = one.scenario("S0") if one else None
    share = one.share_of_s0(scenario) if one and scenario else None
    if share is None or scenario is None or s0 is None:
        return Target(name, wanted, NOT_MEASURED, None)
    measured = f"{_share(share)} x S0 ({_rps(scenario.rps_median)} / {_rps(s0.rps_median)} req/s)"
    return Target(name, wanted, measured, share >= S0_SHARE)


def _deep_page_targets(one: Pass | None) -> list[Target]:
    s3 = one.scenario("S3") if one else None
    s4 = one.scenario("S4") if one else None
    found = []
    figures: list[tuple[str, Callable[[ScenarioResult], float | None], str]] = [
        ("CPU", lambda s: s.cpu_median_us, "µs/req"),
        ("p50", lambda s: s.p50_median_ms, "ms"),
    ]
    for what, figure, unit in figures:
        name = f"S4 (deep cursor) {what} against S3 (first page)"
        wanted = f"≤ {DEEP_PAGE_FACTOR} x S3's"
        deep = figure(s4) if s4 else None
        first = figure(s3) if s3 else None
        if deep is None or not first:
            found.append(Target(name, wanted, NOT_MEASURED, None))
            continue
        measured = f"{deep:.3g} {unit} = {deep / first:.2f} x S3's {first:.3g} {unit}"
        found.append(Target(name, wanted, measured, deep <= DEEP_PAGE_FACTOR * first))
    return found


def _loop_lag_target(report: BenchReport) -> Target:
    name = "S8 event-loop lag of every auth process"
    wanted = f"max < {LOOP_LAG_MS:.0f} ms (histogram bucket ≤ {LOOP_LAG_MS:.0f} ms)"
    worst: tuple[float, str, float] | None = None
    for pass_ in report.passes:
        for process, lag in _processes(pass_.loop_lag, ["auth"]).items():
            if "max_ms" not in lag:
                continue
            where = f"{process} ({pass_.instances} inst.)"
            if worst is None or lag["max_ms"] > worst[0]:
                worst = (lag["max_ms"], where, lag.get("p99_ms", math.nan))
    if worst is None:
        return Target(name, wanted, NOT_MEASURED, None)
    top, where, p99 = worst
    return Target(name, wanted, f"worst {where}: max ≤ {top:g} ms, p99 ≤ {p99:g} ms", top <= LOOP_LAG_MS)


def _healthz_target(report: BenchReport) -> Target:
    name, wanted = "S8 /healthz p99 on the auth service", f"< {HEALTHZ_P99_MS:.0f} ms"
    measured = [(p.healthz_ms["p99"], p) for p in report.passes if "p99" in p.healthz_ms]
    if not measured:
        return Target(name, wanted, NOT_MEASURED, None)
    p99, pass_ = max(measured, key=lambda item: item[0])
    return Target(name, wanted, f"{p99:.1f} ms (worst pass: {pass_.instances} inst.)", p99 < HEALTHZ_P99_MS)


def _scaling_target(report: BenchReport) -> Target:
    name, wanted = "S1 req/s with 2 instances against 1", f"≥ {SCALING} x 1 instance's"
    one, two = _pass_with(report, 1), _pass_with(report, 2)
    single = one.scenario("S1") if one else None
    double = two.scenario("S1") if two else None
    rps1 = single.rps_median if single else None
    rps2 = double.rps_median if double else None
    if not rps1 or rps2 is None:
        return Target(name, wanted, NOT_MEASURED + (" (no 2-instance pass)" if two is None else ""), None)
    return Target(
        name, wanted, f"{rps2 / rps1:.2f} x ({_rps(rps2)} / {_rps(rps1)} req/s)", rps2 >= SCALING * rps1
    )


def _rss_target(report: BenchReport) -> Target:
    name, wanted = "Idle RSS of every service process", f"< {IDLE_RSS_MB:.0f} MB"
    measured = [
        (rss, f"{process} ({pass_.instances} inst.)")
        for pass_ in report.passes
        for process, rss in _processes(pass_.idle_rss_mb, SERVICES).items()
    ]
    if not measured:
        return Target(name, wanted, NOT_MEASURED, None)
    rss, where = max(measured)
    return Target(name, wanted, f"largest {where}: {rss:.0f} MB", rss < IDLE_RSS_MB)


def class_targets(one: Pass | None) -> list[Target]:
    """Issue 15's targets for every scenario of the 1-instance pass: its class's service CPU (an
    authenticated read, a public read) and the p99 (but password hashing, exempt)."""
    found: list[Target] = []
    for s in one.scenarios if one else []:
        limit = CLASS_CPU_US.get(s.kind)
        if limit is not None:
            name, wanted = f"{s.key} service CPU ({s.kind})", f"≤ {limit:.0f} µs/req (1 instance)"
            cpu = s.cpu_median_us
            measured = NOT_MEASURED if cpu is None else f"{cpu:.0f} µs/req"
            found.append(Target(name, wanted, measured, None if cpu is None else cpu <= limit))
        name = f"{s.key} p99"
        if s.password_hashing:
            found.append(
                Target(name, "exempt: password hashing (argon2)", _ms(s.p99_median_ms) + " ms", None)
            )
            continue
        p99 = s.p99_median_ms
        measured = NOT_MEASURED if p99 is None else f"{_ms(p99)} ms"
        found.append(
            Target(name, f"≤ {P99_MS:.0f} ms (1 instance)", measured, None if p99 is None else p99 <= P99_MS)
        )
    return found


def targets(report: BenchReport) -> list[Target]:
    """The issue's targets against the measured figures (S1-S5 on the first 1-instance pass)."""
    one = _pass_with(report, 1)
    return [
        _cpu_target(one, "S1", CPU_CACHED_US),
        _share_target(one, "S1"),
        _cpu_target(one, "S2", CPU_CACHED_US),
        _share_target(one, "S2"),
        _cpu_target(one, "S1-REDIS", CPU_REDIS_PATH_US),
        _cpu_target(one, "S3", CPU_AUTHED_US),
        _cpu_target(one, "S5", CPU_AUTHED_US),
        *_deep_page_targets(one),
        _loop_lag_target(report),
        _healthz_target(report),
        _scaling_target(report),
        _rss_target(report),
        *class_targets(one),
    ]


def problems(report: BenchReport) -> list[str]:
    """Everything that went wrong: the orchestrator's notes, the runs' errors and reuses, plan warnings."""
    found = []
    for pass_ in report.passes:
        for scenario in pass_.scenarios:
            where = f"{scenario.key} ({pass_.instances} inst.)"
            found += [f"{where}: {problem}" for problem in scenario.problems]
            found += [f"{where}: {problem}" for problem in scenario.run_problems()]
    found += [f"plan: {warning}" for warning in report.plan_warnings]
    return found


# Text ---------------------------------------------------------------------------------------------


def _rps(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _share(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.01 else f"{value:.4f}"


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _other_cpu_names(pass_: Pass) -> list[str]:
    names = {name for s in pass_.scenarios for name in s.other_cpu_median_us}
    known = [name for name in OTHER_CPU_LABELS if name in names]
    return known + sorted(names - set(known))


def _scenario_table(pass_: Pass) -> tuple[list[str], list[list[str]]]:
    others = _other_cpu_names(pass_)
    headers = ["Scenario", "req/s median (min-max)", "p50 ms", "p99 ms", "errors", "x S0", "CPU µs/req"]
    headers += [f"{OTHER_CPU_LABELS.get(name, name)} µs/req" for name in others]
    rows = []
    for s in pass_.scenarios:
        share = pass_.share_of_s0(s)
        rps = f"{_rps(s.rps_median)} ({_rps(s.rps_min)}-{_rps(s.rps_max)})" if s.runs else "-"
        errors = str(s.errors_total) + (f" +{s.exhausted_total} reused" if s.exhausted_total else "")
        row = [
            f"{s.key} {s.title}",
            rps,
            _ms(s.p50_median_ms),
            _ms(s.p99_median_ms),
            errors,
            _share(share),
            _us(s.cpu_median_us),
        ]
        row += [_us(s.other_cpu_median_us.get(name)) for name in others]
        rows.append(row)
    return headers, rows


def _fixed_width(headers: list[str], rows: list[list[str]], indent: str = "", left: int = 1) -> list[str]:
    """Columns two spaces apart: the first `left` ones aligned left, the others right."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), indent + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _pairs(values: Mapping[str, object]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "-"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def lookup_path_rows(pass_: Pass) -> list[list[str]]:
    """Per scenario that looked codes up by email: the share answered by each path, and the count."""
    rows = []
    for s in pass_.scenarios:
        total = sum(s.lookup_paths.values())
        if total <= 0:
            continue
        settings = " ".join(f"{k}={v}" for k, v in s.settings.items())
        rows.append(
            [
                s.key,
                *(
                    _percent(s.lookup_paths.get(source, 0.0), total)
                    for source in ("near", "redis", "database")
                ),
                f"{total:,.0f}",
                settings or "defaults",
            ]
        )
    return rows


def _lookup_paths_text(pass_: Pass) -> list[str]:
    rows = lookup_path_rows(pass_)
    if not rows:
        return []
    out = ["Lookups by email, by where the answer came from (referral_email_lookups_total, recorded runs):"]
    headers = ["scenario", "near cache", "Redis", "database", "lookups", "service settings"]
    out += _fixed_width(headers, rows, indent="  ")
    return [*out, ""]


def _kinds_text(pass_: Pass) -> list[str]:
    out: list[str] = []
    for s in pass_.scenarios:
        if not s.kinds:
            continue
        sent_total = sum(int(k.get("sent", 0)) for k in s.kinds.values())
        rows = [
            [
                kind,
                f"{100 * float(k.get('share', 0)):.1f} %" if "share" in k else "-",
                f"{int(k.get('sent', 0)):,}",
                _percent(int(k.get("sent", 0)), sent_total),
                str(k.get("expect", "-")),
                ", ".join(f"{status} x{count:,}" for status, count in dict(k.get("answers", {})).items())
                or "-",
                str(k.get("unexpected", 0)),
            ]
            for kind, k in s.kinds.items()
        ]
        out.append(
            f"{s.key}: requests by kind over the recorded runs (answers: the services' http_requests_total):"
        )
        headers = ["kind", "planned", "sent", "share sent", "expect", "answers", "unexpected"]
        out += _fixed_width(headers, rows, indent="  ")
        out.append("")
    return out


PROFILE_MIN_US = 100.0  # the other service's profile is shown when it spent this much per request
FLOOR_KEY = "S0"  # the floor every request pays: the gateway, aiohttp, the middlewares, /healthz


def _profiles_text(pass_: Pass) -> list[str]:
    """Where each scenario's service CPU went (py-spy, last recorded run), in µs per request, beside
    S0's: what a scenario spends above the floor, by component, is what explains a missed target."""
    s0 = pass_.scenario(FLOOR_KEY)
    floor_profile = s0.profiles.get(s0.service) if s0 else None
    floor = (
        (floor_profile, s0.cpu_median_us)
        if s0 and floor_profile and floor_profile.samples and s0.cpu_median_us is not None
        else None
    )
    out: list[str] = []
    for s in pass_.scenarios:
        for service, profile in s.profiles.items():
            cpu = s.cpu_median_us if service == s.service else s.other_cpu_median_us.get(service)
            if not profile.samples or (service != s.service and (cpu or 0.0) < PROFILE_MIN_US):
                continue
            torn = f", {profile.torn} torn" if profile.torn else ""
            out.append(f"{s.key}, {service}: {_us(cpu)} µs/req ({profile.samples:,} samples{torn})")
            out += explain(profile, cpu, floor=floor if s.key != FLOOR_KEY else None)
    if out:
        floor_text = f"S0's, {_us(floor[1])} µs/req" if floor else "not measured (no S0 profile)"
        out = [
            "Where the services' CPU went: py-spy's samples during each scenario's last recorded run,",
            "by the innermost frame's component, times the median CPU µs per request; the floor is",
            f"{floor_text} (gateway -> aiohttp -> the shared middlewares -> /healthz).",
            "",
            *out,
            "",
        ]
    return out


def _pass_text(pass_: Pass) -> list[str]:
    out = [f"== Pass: {pass_.label} ==", ""]
    out += _fixed_width(*_scenario_table(pass_))
    out.append("")
    out += _lookup_paths_text(pass_)
    out += _kinds_text(pass_)
    for s in pass_.scenarios:
        if s.extra:
            figures = ", ".join(f"{name} {_number(_median(values))}" for name, values in s.extra.items())
            out += [f"{s.key} (medians of its runs): {figures}"]
            baseline = pass_.scenario("S7") if s.key == "WEBHOOK-RELAY" else None
            if baseline and s.cpu_median_us is not None and baseline.cpu_median_us is not None:
                cost = s.cpu_median_us - baseline.cpu_median_us
                out.append(f"  the event's cost per activation (its CPU µs/req less S7's): {cost:,.0f} µs")
            out.append("")
    out += _profiles_text(pass_)
    out.append("Event-loop lag during S8 (upper bounds of histogram buckets):")
    if pass_.loop_lag:
        rows = [
            [process, _ms(lag.get("p99_ms")), _ms(lag.get("max_ms"))]
            for process, lag in pass_.loop_lag.items()
        ]
        out += _fixed_width(["process", "p99 ms", "max ms"], rows, indent="  ")
    else:
        out.append("  not measured")
    healthz = "  ".join(f"{k} {_ms(v)} ms" for k, v in pass_.healthz_ms.items()) or "not measured"
    out.append(f"/healthz on auth during S8: {healthz}")
    out.append("")
    out.append("RSS (MB):")
    processes = list(dict.fromkeys([*pass_.idle_rss_mb, *pass_.final_rss_mb]))
    if processes:
        rows = [
            [
                process,
                f"{pass_.idle_rss_mb[process]:.0f}" if process in pass_.idle_rss_mb else "-",
                f"{pass_.final_rss_mb[process]:.0f}" if process in pass_.final_rss_mb else "-",
            ]
            for process in processes
        ]
        out += _fixed_width(["process", "idle", "after the pass"], rows, indent="  ")
    else:
        out.append("  not measured")
    out.append("")
    return out


def render_text(report: BenchReport) -> str:
    """The whole report as fixed-width text."""
    out = [
        f"Benchmark {report.started_at}  (git {report.git_revision})",
        f"Machine:  {_pairs(report.machine)}",
        f"Settings: {_pairs(report.settings)}",
        f"Dataset:  {_pairs(report.dataset)}",
        "",
    ]
    for pass_ in report.passes:
        out += _pass_text(pass_)
    out += ["== Targets ==", ""]
    verdict = {True: "MET", False: "MISSED", None: "N/A"}
    rows = [[verdict[t.met], t.name, t.wanted, t.measured] for t in targets(report)]
    out += _fixed_width(["", "target", "wanted", "measured"], rows, left=4)
    out.append("")
    found = problems(report)
    if found:
        bar = PROBLEM_MARK + " " + "=" * 70
        out += [bar, f"{PROBLEM_MARK} PROBLEMS: {len(found)}", bar]
        out += [f"{PROBLEM_MARK} {problem}" for problem in found]
        out += [bar, ""]
    else:
        out += ["No problems: every answer had its expected status, no file ran out, no plan warning.", ""]
    if report.plans:
        out += ["== Query plans (EXPLAIN ANALYZE) ==", ""]
        for name, plan in report.plans.items():
            out += [f"-- {name}", plan.rstrip(), ""]
    return "\n".join(out).rstrip() + "\n"


def render_markdown_table(pass_: Pass) -> str:
    """The pass's scenario table in Markdown (for the README)."""
    headers, rows = _scenario_table(pass_)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join([line(headers), "| " + " | ".join(align) + " |", *(line(r) for r in rows)]) + "\n"


# JSON ---------------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """The value with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _scenario_json(pass_: Pass, scenario: ScenarioResult) -> dict[str, Any]:
    data = asdict(scenario)
    for run, result in zip(data["runs"], scenario.runs, strict=True):
        run["failed"] = result.failed
    data["derived"] = {
        "rps_median": scenario.rps_median,
        "rps_min": scenario.rps_min,
        "rps_max": scenario.rps_max,
        "p50_median_ms": scenario.p50_median_ms,
        "p99_median_ms": scenario.p99_median_ms,
        "errors_total": scenario.errors_total,
        "exhausted_total": scenario.exhausted_total,
        "share_of_s0": pass_.share_of_s0(scenario),
        "cpu_median_us": scenario.cpu_median_us,
        "other_cpu_median_us": scenario.other_cpu_median_us,
    }
    return data


def report_json(report: BenchReport) -> dict[str, Any]:
    """The report as JSON data: every measured figure, the derived ones, targets and problems."""
    data = asdict(report)
    for pass_data, pass_ in zip(data["passes"], report.passes, strict=True):
        pass_data["scenarios"] = [_scenario_json(pass_, s) for s in pass_.scenarios]
    data["targets"] = [asdict(target) for target in targets(report)]
    data["problems"] = problems(report)
    return dict(_finite(data))


def write_json(report: BenchReport, path: Path) -> None:
    text = json.dumps(report_json(report), indent=2, ensure_ascii=False, allow_nan=False, default=str)
    path.write_text(text + "\n", encoding="utf-8")


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _run_from_json(data: Mapping[str, Any]) -> WrkResult:
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=_float(data["duration_s"]),
        rps=_float(data["rps"]),
        p50_ms=_float(data["p50_ms"]),
        p90_ms=_float(data["p90_ms"]),
        p99_ms=_float(data["p99_ms"]),
        max_ms=_float(data["max_ms"]),
        mean_ms=_float(data["mean_ms"]),
        errors=dict(data["errors"]),
        unexpected=dict(data["unexpected"]),
        exhausted=int(data["exhausted"]),
        expect=data.get("expect"),
        kinds={str(k): int(v) for k, v in (data.get("kinds") or {}).items()},
        statuses={str(k): int(v) for k, v in (data.get("statuses") or {}).items()},
    )


def report_from_json(data: Mapping[str, Any]) -> BenchReport:
    """The report of `report_json`'s data (derived figures, targets and problems are recomputed)."""
    passes = [
        Pass(
            instances=int(p["instances"]),
            scenarios=[
                ScenarioResult(
                    key=s["key"],
                    title=s["title"],
                    service=s["service"],
                    expect_status=int(s["expect_status"]),
                    runs=[_run_from_json(run) for run in s["runs"]],
                    cpu_us_per_request=[_float(v) for v in s["cpu_us_per_request"]],
                    other_cpu_us_per_request={
                        name: [_float(v) for v in values]
                        for name, values in s["other_cpu_us_per_request"].items()
                    },
                    problems=list(s["problems"]),
                    lookup_paths={str(k): float(v) for k, v in (s.get("lookup_paths") or {}).items()},
                    kinds={str(k): dict(v) for k, v in (s.get("kinds") or {}).items()},
                    settings={str(k): str(v) for k, v in (s.get("settings") or {}).items()},
                    kind=str(s.get("kind", "")),
                    password_hashing=bool(s.get("password_hashing", False)),
                    extra={name: [_float(v) for v in values] for name, values in s.get("extra", {}).items()},
                    profiles={
                        name: Profile.from_json(value) for name, value in (s.get("profiles") or {}).items()
                    },
                )
                for s in p["scenarios"]
            ],
            idle_rss_mb=dict(p["idle_rss_mb"]),
            final_rss_mb=dict(p["final_rss_mb"]),
            loop_lag={name: dict(lag) for name, lag in p["loop_lag"].items()},
            healthz_ms=dict(p["healthz_ms"]),
        )
        for p in data["passes"]
    ]
    return BenchReport(
        started_at=data["started_at"],
        git_revision=data["git_revision"],
        machine=dict(data["machine"]),
        settings=dict(data["settings"]),
        dataset=dict(data["dataset"]),
        passes=passes,
        plans=dict(data["plans"]),
        plan_warnings=list(data["plan_warnings"]),
    )


def read_json(path: Path) -> BenchReport:
    return report_from_json(json.loads(path.read_text(encoding="utf-8")))


# Chart --------------------------------------------------------------------------------------------


OTHER_CPU_COLORS = {"nginx": "tab:gray", "postgres": "tab:purple", "redis": "tab:brown"}


def _rps_limits(report: BenchReport) -> tuple[float, float] | None:
    """One log-scale range for every pass's throughput, so that passes compare at a glance."""
    values = [
        value
        for pass_ in report.passes
        for s in pass_.scenarios
        for value in (s.rps_min, s.rps_max)
        if value is not None and value > 0
    ]
    if not values:
        return None
    return 10 ** math.floor(math.log10(min(values))), max(values) * 2


def _draw_rps(
    axes: Axes, pass_: Pass, scenarios: list[ScenarioResult], limits: tuple[float, float] | None
) -> None:
    positions = list(range(len(scenarios)))
    medians = [s.rps_median or 0.0 for s in scenarios]
    below = [m - (s.rps_min or m) for m, s in zip(medians, scenarios, strict=True)]
    above = [(s.rps_max or m) - m for m, s in zip(medians, scenarios, strict=True)]
    axes.bar(positions, medians, yerr=[below, above], capsize=4, color="tab:blue")
    for x, median, high in zip(positions, medians, above, strict=True):
        axes.annotate(
            _rps(median),
            (x, median + high),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    if limits is not None and min(medians, default=0) > 0:
        axes.set_yscale("log")  # S8 (argon2) is 2-3 orders of magnitude below S0
        axes.set_ylim(*limits)
    axes.set_xticks(positions, [s.key for s in scenarios])
    axes.set_ylabel("req/s (median, bars: min-max)")
    axes.set_title(f"Throughput, {pass_.label}")


def _draw_cpu(axes: Axes, pass_: Pass, scenarios: list[ScenarioResult]) -> None:
    positions = list(range(len(scenarios)))
    service = [s.cpu_median_us or 0.0 for s in scenarios]
    totals = service
    axes.bar(positions, service, color="tab:orange", label="auth / referral (figure on the bar)")
    for name in _other_cpu_names(pass_):
        values = [s.other_cpu_median_us.get(name, 0.0) for s in scenarios]
        label, color = OTHER_CPU_LABELS.get(name, name), OTHER_CPU_COLORS.get(name)
        axes.bar(positions, values, bottom=totals, label=label, color=color)
        totals = [t + v for t, v in zip(totals, values, strict=True)]
    # S8 (argon2) costs tens of ms a request: such bars are cut off, their figure written inside.
    top = 1.25 * max([CPU_AUTHED_US, *(t for t in totals if t <= 10 * CPU_AUTHED_US)])
    axes.set_ylim(0, top)
    for x, total, own in zip(positions, totals, service, strict=True):
        cut = total > top
        label = f"{_us(own)}\n(cut)" if cut else _us(own)
        axes.annotate(label, (x, min(total, top)), ha="center", va="top" if cut else "bottom", fontsize=8)
    axes.axhline(CPU_CACHED_US, color="tab:green", linestyle="--", label=f"{CPU_CACHED_US:.0f} µs: S1, S2")
    axes.axhline(CPU_AUTHED_US, color="tab:red", linestyle=":", label=f"{CPU_AUTHED_US:.0f} µs: S3, S5")
    axes.set_xticks(positions, [s.key for s in scenarios])
    axes.set_ylabel("CPU µs per request (median)")
    axes.set_title(f"CPU per request, {pass_.label}")
    axes.legend(fontsize=8, loc="upper left")


def draw_chart(report: BenchReport, path: Path) -> None:
    """A PNG: per pass, median req/s per scenario (min-max bars), and CPU µs per request."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(report.passes), 1)
    figure = Figure(figsize=(14, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2, squeeze=False)
    figure.suptitle(f"make bench {report.started_at} (git {report.git_revision})")
    limits = _rps_limits(report)
    for (rps_axes, cpu_axes), pass_ in zip(axes, report.passes, strict=False):
        scenarios = [s for s in pass_.scenarios if s.rps_median is not None]
        _draw_rps(rps_axes, pass_, scenarios, limits)
        _draw_cpu(cpu_axes, pass_, scenarios)
    if not report.passes:
        axes[0][0].set_title("no pass")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
