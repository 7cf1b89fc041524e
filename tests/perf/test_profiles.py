"""py-spy's samples folded by component: made-up stacks, a real py-spy on a real process, the report."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.perf.profiles import OTHER, ROOT, Profile, Sampler, explain, fold, py_spy
from tests.perf.report import read_json, render_text, write_json
from tests.perf.test_report import bench, one_instance

SITE = "/venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"
HANDLER = f"handle ({ROOT}/services/referral/api/handlers.py:10)"
MIDDLEWARE = f"access_middleware ({ROOT}/shared/access.py:20)"
LOOP = f"_run_once ({STDLIB}/asyncio/base_events.py:1900)"
MAIN = f"<module> ({ROOT}/services/referral/__main__.py:3)"


def stack(*frames: str) -> str:
    return ";".join(frames)


RAW = "\n".join(
    [
        # a statement: psycopg2's time, under the repository and the handler
        stack(MAIN, LOOP, MIDDLEWARE, HANDLER, f"execute ({SITE}/psycopg2/extras.py:146)") + " 30",
        # a stdlib helper (re) called by aiopg counts for aiopg, not for "other"
        stack(MAIN, LOOP, HANDLER, f"_poll ({SITE}/aiopg/connection.py:8)", f"m ({STDLIB}/re/x.py:1)")
        + " 10",
        # the handler's own lines, and the stdlib it calls (datetime) count as project code
        stack(MAIN, LOOP, MIDDLEWARE, HANDLER, f"isoformat ({STDLIB}/datetime.py:1)") + " 20",
        # the loop itself
        stack(MAIN, LOOP) + " 25",
        # aiohttp's parser under the loop
        stack(MAIN, LOOP, f"data_received ({SITE}/aiohttp/web_protocol.py:400)") + " 15",
        # nothing named: other
        stack(f"<module> ({STDLIB}/runpy.py:1)") + " 0",
        stack(f"run ({STDLIB}/threading.py:982)") + " 0",
        # a torn sample: garbage without a count, and a frame cut by a line break
        "garbage frame (\udcf6\udc9d:12",
        " 9",
        "",
    ]
)


def test_fold_attributes_each_sample_to_its_innermost_named_component() -> None:
    profile = fold(RAW)

    assert profile.samples == 100
    assert profile.torn == 2
    assert profile.shares() == {
        "PostgreSQL driver (aiopg, psycopg2)": pytest.approx(0.40),
        "event loop (asyncio, selectors)": pytest.approx(0.25),
        "project code (services, shared)": pytest.approx(0.20),
        "HTTP server and client (aiohttp, multidict, yarl)": pytest.approx(0.15),
        OTHER: 0.0,
    }
    # Inclusive: every sample with the handler on its stack counts for it, once.
    functions = profile.top_functions(10)
    assert functions["services/referral/api/handlers.py:handle"] == pytest.approx(0.60)
    assert functions["shared/access.py:access_middleware"] == pytest.approx(0.50)
    assert functions["services/referral/__main__.py:<module>"] == pytest.approx(1.0)
    # Own: the project code component's samples, by the innermost project function.
    own = profile.top_functions(own=True)
    assert own == {"services/referral/api/handlers.py:handle": pytest.approx(0.20)}


def test_a_recursive_project_function_counts_once_per_sample() -> None:
    profile = fold(stack(MAIN, HANDLER, HANDLER, HANDLER) + " 4\n")
    assert profile.functions["services/referral/api/handlers.py:handle"] == 4
    assert profile.samples == 4


def test_explain_shows_microseconds_against_the_floor_and_drops_the_entry_points() -> None:
    profile = fold(RAW)
    floor = fold(stack(MAIN, LOOP) + " 50\n" + stack(MAIN, LOOP, f"x ({SITE}/aiohttp/web.py:1)") + " 50\n")

    lines = explain(profile, 400.0, floor=(floor, 100.0))
    text = "\n".join(lines)

    # 40 % of 400 µs in the driver, none of it in the floor
    assert any("160" in line and "+160" in line and "PostgreSQL driver" in line for line in lines), text
    # the loop: 25 % of 400 = 100 µs, the floor's 50 % of 100 = 50 µs, 50 above it
    assert any(" 100 " in line and "+50" in line and "event loop" in line for line in lines), text
    assert "__main__.py" not in text
    assert "services/referral/api/handlers.py:handle" in text


def test_profiles_round_trip_and_render_in_the_report(tmp_path: Path) -> None:
    report = bench(one_instance())
    scenarios = {s.key: s for s in report.passes[0].scenarios}
    scenarios["S0"].profiles = {"referral": fold(stack(MAIN, LOOP) + " 100\n")}
    scenarios["S3"].profiles = {"referral": fold(RAW), "auth": fold(stack(MAIN, LOOP) + " 5\n")}
    path = tmp_path / "report.json"
    write_json(report, path)

    again = read_json(path)
    text = render_text(again)

    assert text == render_text(report)
    assert again.passes[0].scenario("S3").profiles["referral"] == fold(RAW)  # type: ignore[union-attr]
    assert "S3, referral: 180 µs/req (100 samples, 2 torn)" in text
    assert "the floor is\nS0's, 40 µs/req" in text
    # S3's auth processes spent 0 µs per request: their profile is left out
    assert "S3, auth" not in text


@pytest.fixture
def busy_process(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, time
            print("ready", flush=True)
            end = time.monotonic() + 30
            while time.monotonic() < end:
                json.dumps({"n": list(range(200))})
            """
        )
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    yield process
    process.kill()
    process.wait()
    process.stdout.close()


def test_sampler_records_a_real_process_with_py_spy(
    busy_process: subprocess.Popen[str], tmp_path: Path
) -> None:
    assert py_spy() is not None, "py-spy is in requirements.lock: `make venv` installs it"
    started = time.monotonic()
    sampler = Sampler({"busy": [busy_process.pid]}, 2, tmp_path / "profiles", "test")
    profiles, errors = sampler.finish()

    assert time.monotonic() - started < 20
    assert errors == []
    profile = profiles["busy"]
    assert isinstance(profile, Profile)
    assert profile.samples > 100  # 250 Hz for 2 s, the process always busy
    assert max(profile.shares().items(), key=lambda item: item[1])[0] == "JSON"
    assert list((tmp_path / "profiles").glob(f"test-busy-{busy_process.pid}.txt"))


def test_a_py_spy_that_fails_leaves_out_its_process_not_the_others(
    busy_process: subprocess.Popen[str], tmp_path: Path
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid nobody has now: py-spy cannot attach, and exits at once with an error
    sampler = Sampler({"busy": [busy_process.pid], "gone": [gone.pid]}, 1, tmp_path, "test")

    profiles, errors = sampler.finish()

    assert list(profiles) == ["busy"] and profiles["busy"].samples > 0
    assert len(errors) == 1 and f"test-gone-{gone.pid}.txt" in errors[0]
