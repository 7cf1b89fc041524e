"""The programs `make run`, `make test` and `make bench` need beyond Python, installed when missing.

`python -m deploy.local.requirements nginx chromium wrk` installs those of them that are not
installed: with apt-get (as root, or through `sudo -n` when that needs no password), or Homebrew on
macOS. When it cannot, it prints one line saying exactly what to run, and exits 1; `--check` never
installs (the same line, the same exit code). `.ci/run` reaches it through `make test` and `make bench`;
the test session checks the programs its tests need with `missing` (tests/conftest.py) and stops at
once with the same line.

What needs what: nginx is the gateway (`make run`, the e2e and deploy tests, the benchmark);
Chromium opens the docs and mail pages in the e2e tests; wrk drives the benchmark.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    """A program found on PATH by `command`, installed from the named packages."""

    command: str
    apt: str
    brew: str  # the arguments of `brew install`


PROGRAMS = {
    "nginx": Program("nginx", apt="nginx", brew="nginx"),
    # tests/e2e/test_docs_browser.py drives Debian's /usr/bin/chromium.
    "chromium": Program("chromium", apt="chromium", brew="--cask chromium"),
    "wrk": Program("wrk", apt="wrk", brew="wrk"),
}


def found(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the program is on the PATH of `environ` (default: this process's)."""
    path = (os.environ if environ is None else environ).get("PATH", os.defpath)
    return shutil.which(PROGRAMS[name].command, path=path) is not None


def missing(names: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Those of `names` not on PATH, in order."""
    return [name for name in names if not found(name, environ)]


def install_commands(names: Sequence[str], system: str | None = None) -> list[list[str]] | None:
    """The commands that install the programs' packages here (without `sudo`), None when unknown."""
    if (platform.system() if system is None else system) == "Darwin":
        if shutil.which("brew") is None:
            return None
        return [["brew", "install", *PROGRAMS[name].brew.split()] for name in names]
    if shutil.which("apt-get") is None:
        return None
    packages = [PROGRAMS[name].apt for name in names]
    return [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ]


def advice(names: Sequence[str], system: str | None = None) -> str:
    """The one line that says what is missing and exactly what to run."""
    listed = ", ".join(names)
    if (platform.system() if system is None else system) == "Darwin":
        commands = " && ".join(f"brew install {PROGRAMS[name].brew}" for name in names)
        return f"missing: {listed}; run: {commands} (Homebrew: https://brew.sh)"
    packages = " ".join(PROGRAMS[name].apt for name in names)
    install = f"sudo apt-get install -y --no-install-recommends {packages}"
    return f"missing: {listed}; run: sudo apt-get update && {install}"


def _sudo_prefix() -> list[str] | None:
    """[] as root, ["sudo", "-n"] when sudo works without a password, else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") is None:
        return None
    probe = subprocess.run(
        ["sudo", "-n", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if probe.returncode != 0:
        return None
    return ["sudo", "-n"]


def install(names: Sequence[str]) -> bool:
    """Install the programs' packages here if this user can without a password; whether it succeeded."""
    commands = install_commands(names)
    if commands is None:
        return False
    prefix: list[str] | None = []
    if commands[0][0] == "apt-get":
        prefix = _sudo_prefix()
    if prefix is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in commands:
        print(f"Installing {', '.join(names)}: {' '.join([*prefix, *command])}", flush=True)
        if (
            subprocess.run([*prefix, *command], env=env, stdin=subprocess.DEVNULL, check=False).returncode
            != 0
        ):
            return False
    return True


def ensure(names: Sequence[str], *, check_only: bool = False) -> int:
    """Install what is missing of `names` (unless `check_only`); 0 when all are there, else 1 after one
    line on stderr saying what to run."""
    absent = missing(names)
    if absent and not check_only:
        install(absent)
        absent = missing(absent)
    if absent:
        print(advice(absent), file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.requirements", description=__doc__)
    parser.add_argument("programs", nargs="+", choices=sorted(PROGRAMS))
    parser.add_argument("--check", action="store_true", help="only check; never install")
    args = parser.parse_args(argv)
    return ensure(args.programs, check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
