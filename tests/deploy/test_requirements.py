"""The programs beyond Python (deploy/local/requirements.py): found on PATH, or one line that says
exactly what to run; and a test session that needs a missing one stops at once with that line.

Nothing is installed or uninstalled here: the checks run with a PATH that lacks the program."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local import requirements

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bin_dirs(tmp_path: Path) -> tuple[str, str]:
    """A PATH with an executable `nginx` in it, and one with nothing."""
    with_nginx, empty = tmp_path / "with", tmp_path / "empty"
    with_nginx.mkdir()
    empty.mkdir()
    fake = with_nginx / "nginx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    return str(with_nginx), str(empty)


def test_missing_looks_on_the_given_path(bin_dirs: tuple[str, str]) -> None:
    with_nginx, empty = bin_dirs
    assert requirements.missing(["nginx"], {"PATH": with_nginx}) == []
    assert requirements.missing(["nginx", "wrk"], {"PATH": with_nginx}) == ["wrk"]
    assert requirements.missing(["nginx", "chromium", "wrk"], {"PATH": empty}) == ["nginx", "chromium", "wrk"]


def test_the_advice_is_one_line_with_the_command_to_run() -> None:
    line = requirements.advice(["nginx", "wrk"], system="Linux")
    assert line == (
        "missing: nginx, wrk; run: sudo apt-get update && "
        "sudo apt-get install -y --no-install-recommends nginx wrk"
    )
    mac = requirements.advice(["nginx", "chromium"], system="Darwin")
    assert "\n" not in mac
    assert "brew install nginx && brew install --cask chromium" in mac


def test_the_check_without_nginx_on_path_says_what_to_run_and_fails(bin_dirs: tuple[str, str]) -> None:
    _, empty = bin_dirs
    checked = subprocess.run(
        [sys.executable, "-m", "deploy.local.requirements", "--check", "nginx"],
        env={**os.environ, "PATH": empty},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 1
    assert checked.stdout == ""
    assert checked.stderr.splitlines() == [requirements.advice(["nginx"])]


def test_the_check_with_nginx_on_path_passes(bin_dirs: tuple[str, str]) -> None:
    with_nginx, _ = bin_dirs
    checked = subprocess.run(
        [sys.executable, "-m", "deploy.local.requirements", "--check", "nginx"],
        env={**os.environ, "PATH": with_nginx},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_a_test_session_needing_a_missing_program_stops_at_once_with_the_line(
    bin_dirs: tuple[str, str],
) -> None:
    _, empty = bin_dirs
    session = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/deploy/test_launcher.py"],
        env={**os.environ, "PATH": empty},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert session.returncode == pytest.ExitCode.USAGE_ERROR, session.stdout + session.stderr
    output = session.stdout + session.stderr
    assert requirements.advice(["nginx"]) in output
    assert " passed" not in output and " failed" not in output and " error" not in output, output
