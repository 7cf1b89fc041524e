"""The one process supervisor: `make run` (deploy/local/run.py), the e2e and deploy tests and the
benchmark (tests/perf/topology.py) start, watch and stop their processes with it.

- `Process`: one child process in a process group of its own (the terminal's Ctrl-C reaches only the
  supervisor, which stops the children in order). Its output goes to `<log_dir>/<name>.log`, or to
  the terminal when `log_dir` is None. A service is started on port 0 (`port_env`): it binds a port
  of the kernel's choice and reports it on its `listening` log line, which `wait_healthy` reads
  before polling the health URL. A restart binds that same port again (the gateway and the other
  processes name it). `stop` sends SIGTERM, checks the exit code and that nothing the process started
  is left running, and notes each problem in `Process.problems`.
- `nginx_gateway`: nginx rendered by deploy/nginx/render.py, as a `Process`. nginx cannot report a
  port, so its port is picked (`free_port`) and then bound; when something took it meanwhile, its
  start fails with `AddressInUse`, and `start_fresh` starts the whole attempt again with fresh picks.
  The same holds for a service port another process must be told before that service starts (a port
  baked into an environment).
- `stop_all`: stop processes in reverse start order and gather what went wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deploy.nginx.render import (
    ZONES,
    GatewayConfig,
    NginxConfigError,
    check_config,
    nginx_command,
    write_runtime,
)

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
AUTH_API = "/api/v1/auth"
REFERRAL_API = "/api/v1/referral"
STOP_TIMEOUT = 20.0
POLL = 0.05
ADDRESS_IN_USE = "Address already in use"  # in Python's OSError text and in nginx's bind() error
START_ATTEMPTS = 3

T = TypeVar("T")


class HarnessError(AssertionError):
    """A process could not be started or stopped as asked (it died, timed out, a tool is missing);
    an AssertionError, so a test reports it as a failure."""


class AddressInUse(HarnessError):
    """A process could not bind its port: something took it after it was picked. Pick again."""


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick). Only for a port that must be known
    before the process that binds it starts (nginx's; one named in another process's environment):
    start it inside `start_fresh`, which tries again when the port was taken meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def base_url(port: int) -> str:
    """`http://127.0.0.1:port`."""
    return f"http://{HOST}:{port}"


def origin(url: str) -> str:
    """`scheme://host:port` of `url`."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status GET `url` answers right now, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http:// on loopback)
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return None


def children(pid: int) -> set[int]:
    """Every descendant of `pid` (through /proc), so a stop can check none is left running."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        pending.append(int(child))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def listening_port(output: str) -> int | None:
    """The port of the first `listening` line a service logged (shared/serving.py), None before it."""
    for line in output.splitlines():
        if '"listening"' not in line:
            continue
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(line)
            if record["message"] == "listening":
                return int(record["port"])
    return None


@dataclass
class Process:
    """One process: started, health-checked, stopped by the supervisor (never by name)."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int = 0  # where it listens; 0 until a service started on port 0 reported its own
    port_env: str | None = None  # the variable that tells a service its port (the port is then reported)
    health_path: str = "/healthz"
    log_dir: Path | None = field(default_factory=lambda: ROOT / ".artifacts")  # None: the terminal
    popen: subprocess.Popen[bytes] | None = None
    problems: list[str] = field(default_factory=list)
    stopped: bool = False  # by the supervisor (or a test), not on its own
    _descendants: set[int] = field(default_factory=set, repr=False)
    _log_start: int = field(default=0, repr=False)  # where this run's output begins in the log

    @property
    def log_path(self) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        """The process id of the running process (HarnessError if it was never started)."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def url(self) -> str:
        """Where it listens (HarnessError while its port is unknown)."""
        if not self.port:
            raise HarnessError(f"{self.name} has not reported its port yet")
        return base_url(self.port)

    @property
    def health_url(self) -> str:
        return self.url + self.health_path

    def start(self) -> None:
        """Start it in a process group of its own; a service (`port_env`) on its port, or on port 0."""
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        if self.port_env is not None:
            if not self.port and self.log_path is None:
                raise HarnessError(
                    f"{self.name}: a service on port 0 must log to a file (its port is read there)"
                )
            self.env = {**self.env, self.port_env: str(self.port)}
        self.stopped = False
        self._descendants = set()
        if self.log_path is None:
            self.popen = subprocess.Popen(
                self.command, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, process_group=0
            )
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.command)}\n".encode())
            log.flush()
            self._log_start = log.tell()
            self.popen = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                process_group=0,
            )

    def output(self) -> str:
        """What this run of the process wrote so far ("" when it writes to the terminal)."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return "(its output went to the terminal)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        """HarnessError (AddressInUse when it could not bind its port) if it has exited."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        code = self.popen.poll()
        if code is None:
            return
        if ADDRESS_IN_USE in self.output():
            raise AddressInUse(f"{self.name} could not bind its port {self.port or ''}: {ADDRESS_IN_USE}")
        raise HarnessError(f"{self.name} exited with {code} before it was healthy:\n{self.log_tail()}")

    def wait_healthy(self, deadline: float) -> None:
        """Until its health URL answers 200 (a service on port 0: once it reported its port); HarnessError
        with the log's tail if it dies or time runs out, AddressInUse if its port was taken."""
        while True:
            self.check_alive()
            if not self.port and self.port_env is not None:
                self.port = listening_port(self.output()) or 0
            if self.port and http_status(self.health_url) == 200:
                return
            if time.monotonic() > deadline:
                where = self.health_url if self.port else "(no port reported)"
                raise HarnessError(f"{self.name} not healthy at {where} in time:\n{self.log_tail()}")
            time.sleep(POLL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, and check nothing it started is left; its exit code (SIGKILL after the timeout)."""
        if self.popen is not None and self.popen.poll() is not None:
            self.problems.append(f"{self.name} had exited on its own with {self.popen.returncode}")
            return self.popen.returncode
        self.terminate()
        return self.wait_stopped(timeout)

    def terminate(self) -> None:
        """Send SIGTERM (a stop asked for, not a crash); `wait_stopped` collects the exit."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        self._descendants = children(self.popen.pid)
        self.stopped = True
        self.popen.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> int:
        """After `terminate`: wait for the exit (SIGKILL after `timeout`), note a non-zero code and any
        process it started that outlived it; the exit code."""
        assert self.popen is not None
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.problems.append(f"{self.name} ignored SIGTERM for {timeout:.0f} s; killed")
            self.popen.kill()
            code = self.popen.wait()
        if self.log_path is not None:
            with self.log_path.open("ab") as log:
                log.write(f"--- {time.strftime('%H:%M:%S')} exited with {code} after SIGTERM\n".encode())
        if code != 0:
            self.problems.append(f"{self.name} exited with {code} after SIGTERM:\n{self.log_tail(10)}")
        deadline = time.monotonic() + 5.0
        while (left := {pid for pid in self._descendants if alive(pid)}) and time.monotonic() < deadline:
            time.sleep(POLL)
        if left:
            self.problems.append(f"{self.name} left processes running after it exited: {sorted(left)}")
            for pid in left:  # only the ones this process started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything else left in its own group
        return code


def service(
    name: str, module: str, env: Mapping[str, str], *, port_env: str, port: int = 0, log_dir: Path | None
) -> Process:
    """`python -m <module> serve` with this interpreter, on `port` (0: its own pick, reported)."""
    return Process(
        name,
        [sys.executable, "-m", module, "serve"],
        dict(env),
        port=port,
        port_env=port_env,
        log_dir=log_dir,
    )


def launch(started: list[Process], batch: Sequence[Process], deadline: float) -> None:
    """Start every process of `batch` (each added to `started`), then wait until each is healthy."""
    for process in batch:
        process.start()
        started.append(process)
    for process in batch:
        process.wait_healthy(deadline)


def start_fresh(
    attempt: Callable[[list[Process]], T], attempts: int = START_ATTEMPTS
) -> tuple[T, list[Process]]:
    """`attempt(started)`, which picks the ports it must know in advance and starts processes into
    `started`; its result and the processes it started. When one could not bind a picked port (taken
    between the pick and the bind), stop them all and call it again, with fresh picks; on any other
    failure stop them all and raise."""
    for number in range(1, attempts + 1):
        started: list[Process] = []
        try:
            return attempt(started), started
        except AddressInUse:
            stop_all(started)
            if number == attempts:
                raise
        except BaseException:
            stop_all(started)
            raise
    raise AssertionError("unreachable")


def stop_all(started: Sequence[Process]) -> list[str]:
    """Stop every process (in reverse start order); what went wrong with each, from start to end."""
    problems: list[str] = []
    for process in reversed(started):
        if process.popen is None:
            continue
        if process.stopped:
            problems.append(f"{process.name} was stopped by a test and not started again")
        else:
            process.stop()
        problems += process.problems
    return problems


def nginx_gateway(
    name: str,
    port: int,
    auth: Sequence[int],
    referral: Sequence[int],
    runtime: Path,
    *,
    log_dir: Path | None,
    limits: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> Process:
    """nginx rendered by deploy/nginx/render.py on 127.0.0.1:`port` in front of the services' ports,
    its configuration written (and checked with `nginx -t`) into `runtime`.

    `limits` are `rate`/`burst` for every rate-limited zone (`render.ZONES`); `options` are further
    GatewayConfig fields. With a `log_dir`, the configuration is copied to `<log_dir>/<name>.conf`.
    """
    config = GatewayConfig(
        auth_upstreams=tuple(f"{HOST}:{p}" for p in auth),
        referral_upstreams=tuple(f"{HOST}:{p}" for p in referral),
        listen=f"{HOST}:{port}",
        **{f"{zone}_{key}": value for zone in ZONES for key, value in (limits or {}).items()},
        **options,
    )
    runtime.mkdir(parents=True, exist_ok=True)
    conf = write_runtime(config, runtime)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.conf").write_bytes(conf.read_bytes())
    try:
        check_config(conf)
    except NginxConfigError as error:
        raise HarnessError(str(error)) from error
    command = [str(part) for part in nginx_command(conf)]
    return Process(
        name, command, dict(os.environ if environ is None else environ), port=port, log_dir=log_dir
    )
