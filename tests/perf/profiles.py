"""Where a service's CPU goes during a scenario: py-spy's samples, folded by component.

`Sampler` attaches py-spy to the service processes for one recorded run (`--nonblocking`: the
processes are never paused; idle frames, a loop waiting in epoll, are not sampled, so every
sample is CPU the process spent). `fold` reads py-spy's raw output (one line per distinct stack,
root first, then the sample count) and tells, for the scenario's report:

- each component's share of the samples, by the innermost frame that belongs to a named
  component (a stdlib helper such as `re` or `uuid` counts for the library that called it);
- the project's own functions by inclusive share (a sample counts once for every distinct
  project function on its stack): which handler, middleware or repository call the time is in.

Multiplied by the scenario's measured CPU per request, a share is µs per request: the profile
that explains a missed target in the report's own unit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RATE_HZ = 250
ROOT = Path(__file__).resolve().parents[2]
PROJECT_DIRS = tuple(f"{ROOT / name}/" for name in ("services", "shared"))

# (component, pattern of a frame's file name), innermost match wins; order breaks no tie (a file
# matches one pattern at most).
COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("PostgreSQL driver (aiopg, psycopg2)", re.compile(r"/(aiopg|psycopg2)/")),
    ("SQL building (SQLAlchemy)", re.compile(r"/sqlalchemy/")),
    ("Redis client (redis, aiocache)", re.compile(r"/(redis|aiocache)/")),
    ("tokens (joserfc, cryptography)", re.compile(r"/(joserfc|cryptography)/")),
    ("validation (marshmallow, webargs, apigami)", re.compile(r"/(marshmallow|webargs|aiohttp_apigami)/")),
    ("HTTP server and client (aiohttp, multidict, yarl)", re.compile(r"/(aiohttp|multidict|yarl)/")),
    ("metrics (prometheus_client)", re.compile(r"/prometheus_client/")),
    ("password hashing (argon2)", re.compile(r"/argon2/")),
    ("JSON", re.compile(r"/json/")),
    ("logging", re.compile(r"/logging/")),
    ("event loop (asyncio, selectors)", re.compile(r"/asyncio/|/selectors\.py$")),
    ("project code (services, shared)", re.compile("^(" + "|".join(map(re.escape, PROJECT_DIRS)) + ")")),
)
OTHER = "other (stdlib, interpreter)"
# "func (file:line)" or "func (file)"; py-spy's frame format
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


class ProfileError(Exception):
    """py-spy could not run, or its output could not be read."""


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def component(self) -> str:
        for name, pattern in COMPONENTS:
            if pattern.search(self.file):
                return name
        return OTHER

    @property
    def project_name(self) -> str | None:
        """`services/referral/api/codes.py:get_my_code` for the project's own frames, else None."""
        for directory in PROJECT_DIRS:
            if self.file.startswith(directory):
                return f"{self.file.removeprefix(str(ROOT) + '/')}:{self.function}"
        return None


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "")
    return Frame(match["function"], match["file"])


@dataclass
class Profile:
    """One service's samples during one run."""

    samples: int = 0
    components: dict[str, int] = field(default_factory=dict)
    functions: dict[str, int] = field(default_factory=dict)  # project functions, inclusive
    own: dict[str, int] = field(default_factory=dict)  # the project code component, by function
    torn: int = 0  # lines of py-spy's output that were not a sample (see `fold`)

    def shares(self) -> dict[str, float]:
        """Each component's share of the samples, largest first."""
        if not self.samples:
            return {}
        ordered = sorted(self.components.items(), key=lambda item: (-item[1], item[0]))
        return {name: count / self.samples for name, count in ordered}

    def top_functions(self, count: int = 8, *, own: bool = False) -> dict[str, float]:
        """The project's functions with the largest inclusive shares (`own`: of the project code
        component, the innermost project function of its samples)."""
        if not self.samples:
            return {}
        counts = self.own if own else self.functions
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:count]
        return {name: value / self.samples for name, value in ordered}

    def merge(self, other: Profile) -> None:
        self.samples += other.samples
        self.torn += other.torn
        for name, value in other.components.items():
            self.components[name] = self.components.get(name, 0) + value
        for name, value in other.functions.items():
            self.functions[name] = self.functions.get(name, 0) + value
        for name, value in other.own.items():
            self.own[name] = self.own.get(name, 0) + value

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "components": self.components,
            "functions": self.functions,
            "own": self.own,
            "torn": self.torn,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        return cls(
            samples=int(data.get("samples", 0)),
            components={str(k): int(v) for k, v in data.get("components", {}).items()},
            functions={str(k): int(v) for k, v in data.get("functions", {}).items()},
            own={str(k): int(v) for k, v in data.get("own", {}).items()},
            torn=int(data.get("torn", 0)),
        )


def fold(raw: str) -> Profile:
    """A Profile from py-spy's raw (collapsed-stack) output.

    A sample read while the process changed its stack (`--nonblocking` reads without pausing it) can
    hold garbage, even a line break inside a frame's name: a line that is not `stack count` is such a
    torn sample, counted in `torn` and otherwise left out.
    """
    profile = Profile()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            profile.torn += 1
            continue
        count = int(count_text)
        frames = [parse_frame(text) for text in stack.split(";")]
        innermost = next((f for f in reversed(frames) if f.component != OTHER), None)
        component = innermost.component if innermost else OTHER
        profile.samples += count
        profile.components[component] = profile.components.get(component, 0) + count
        if innermost is not None and (own := innermost.project_name) is not None:
            profile.own[own] = profile.own.get(own, 0) + count
        for name in {f.project_name for f in frames} - {None}:
            assert name is not None
            profile.functions[name] = profile.functions.get(name, 0) + count
    return profile


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter's (the venv's), or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Sampler:
    """py-spy attached to some processes for `seconds`; `finish` folds what each one sampled."""

    def __init__(self, pids: Mapping[str, Sequence[int]], seconds: int, out_dir: Path, label: str) -> None:
        executable = py_spy()
        if executable is None:
            raise ProfileError("py-spy is not installed (it is in requirements.lock: run `make venv`)")
        out_dir.mkdir(parents=True, exist_ok=True)
        self._running: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for group, group_pids in pids.items():
            for pid in group_pids:
                path = out_dir / f"{label}-{group}-{pid}.txt"
                command = [
                    executable, "record", "--pid", str(pid), "--duration", str(seconds),
                    "--rate", str(RATE_HZ), "--nonblocking", "--format", "raw", "--full-filenames",
                    "--output", str(path),
                ]  # fmt: skip
                popen = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self._running.append((group, path, popen))

    def finish(self, timeout_s: float = 30.0) -> tuple[dict[str, Profile], list[str]]:
        """Wait for every py-spy: the samples of each group's processes merged, by group, and what
        went wrong with any of them. A py-spy that failed leaves its process out, not the others:
        reading a running process's memory without pausing it, py-spy itself crashes now and then
        (seen once in about a hundred one-second recordings: SIGSEGV, no output)."""
        profiles: dict[str, Profile] = {}
        errors: list[str] = []
        for group, path, popen in self._running:
            try:
                _, stderr = popen.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.communicate()
                errors.append(f"py-spy on {path.name} did not end within {timeout_s:g} s")
                continue
            if popen.returncode != 0 or not path.exists():
                tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                errors.append(f"py-spy on {path.name} exited with {popen.returncode}: {tail[0]}")
                continue
            profiles.setdefault(group, Profile()).merge(fold(path.read_bytes().decode(errors="replace")))
        return profiles, errors


ENTRY_POINTS = ("__main__.py:", "shared/cli.py:")  # on every sample's stack: they tell nothing


def explain(
    profile: Profile,
    cpu_us: float | None,
    *,
    floor: tuple[Profile, float] | None = None,
    top: int = 8,
) -> list[str]:
    """Readable lines: µs per request by component (beside `floor`'s, S0's, when given), then the
    project's functions with the largest inclusive shares."""

    def us(share: float, cpu: float | None) -> str:
        return f"{share * cpu:6.0f}" if cpu is not None else "     -"

    floor_shares = floor[0].shares() if floor else {}
    lines = ["    µs/req  share" + ("  floor µs  above it" if floor else "") + "  component"]
    names = list(profile.shares()) + [n for n in floor_shares if n not in profile.components]
    for name in names:
        share = profile.shares().get(name, 0.0)
        if share < 0.01 and floor_shares.get(name, 0.0) < 0.01:
            continue
        line = f"    {us(share, cpu_us)}  {100 * share:4.1f} %"
        if floor:
            floor_us = floor_shares.get(name, 0.0) * floor[1]
            above = f"{share * cpu_us - floor_us:+9.0f}" if cpu_us is not None else "        -"
            line += f"  {floor_us:8.0f}  {above}"
        lines.append(f"{line}  {name}")
    functions = {
        name: share
        for name, share in profile.top_functions(top + len(ENTRY_POINTS)).items()
        if not any(entry in name for entry in ENTRY_POINTS)
    }
    if functions:
        lines.append("  the project's functions, inclusive (a middleware includes what it wraps):")
        for name, share in list(functions.items())[:top]:
            lines.append(f"    {us(share, cpu_us)}  {100 * share:4.1f} %  {name}")
    own = {name: share for name, share in profile.top_functions(top // 2, own=True).items() if share >= 0.01}
    if own:
        lines.append("  the project code component, by function (its own lines and the stdlib it calls):")
        for name, share in own.items():
            lines.append(f"    {us(share, cpu_us)}  {100 * share:4.1f} %  {name}")
    return lines
