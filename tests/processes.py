"""Real processes on loopback ports for the harnesses that run the whole system (e2e, the benchmark).

Free of pytest: a failure raises `HarnessError` (an AssertionError, so a test reports it as a
failure), and every process writes its output to a log file in a directory its creator names.

- `Process`: one process, started with its output in `<log_dir>/<name>.log`, waited for until its
  health URL answers 200, stopped with SIGTERM; a stop checks the exit code and that nothing it
  started is left running, and notes each problem in `Process.problems`.
- `stop_all`: stop processes in reverse start order and gather what went wrong.
- `nginx_gateway` / `python_gateway`: the gateway in front of given upstream ports, as a `Process`.
- `free_port`, `base_url`, `origin`, `http_status`, `children`, `alive`: the small helpers around them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from services.auth.signing import generate_pem

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
AUTH_API = "/api/v1/auth"
REFERRAL_API = "/api/v1/referral"
STOP_TIMEOUT = 20.0
POLL = 0.05


class HarnessError(AssertionError):
    """The harness could not do what it was asked (a process died, timed out, a tool is missing)."""


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def base_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def origin(url: str) -> str:
    """`scheme://host:port` of `url`."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status GET `url` answers right now, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
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


@dataclass
class Process:
    """One process of a stack: started, health-checked, stopped by the harness (never by name)."""

    name: str
    command: list[str]
    env: dict[str, str]
    health_url: str
    log_dir: Path = field(default_factory=lambda: ROOT / ".artifacts")
    popen: subprocess.Popen[bytes] | None = None
    problems: list[str] = field(default_factory=list)
    stopped: bool = False  # by the harness (or a test), not on its own
    _descendants: set[int] = field(default_factory=set, repr=False)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

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
        """Where it listens: the origin of its health URL."""
        return origin(self.health_url)

    def start(self) -> None:
        if self.running:
            raise HarnessError(f"{self.name} is already running")
        self.stopped = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.command)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.command, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, deadline: float) -> None:
        """Until `health_url` answers 200; HarnessError with the log's tail if it dies or time runs out."""
        if self.popen is None:
            raise HarnessError(f"{self.name} was never started")
        while http_status(self.health_url) != 200:
            code = self.popen.poll()
            if code is not None:
                raise HarnessError(
                    f"{self.name} exited with {code} before it was healthy:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name} not healthy at {self.health_url} in time:\n{self.log_tail()}"
                )
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
        return code


def service_pair(
    index: int,
    auth_port: int,
    referral_port: int,
    auth_env: Mapping[str, str],
    referral_env: Mapping[str, str],
    process: type[Process] = Process,
    *,
    jwks_url: str | None = None,
    **fields: Any,
) -> tuple[Process, Process]:
    """`auth-i` and `referral-i` (`python -m services.<name> serve`) on their ports, each healthy once
    its /healthz answers; `referral-i` reads the JWKS at `jwks_url`, by default that of `auth-i`.
    `fields` go to `process`."""
    auth = process(
        f"auth-{index}",
        [sys.executable, "-m", "services.auth", "serve"],
        {**auth_env, "AUTH_PORT": str(auth_port)},
        f"{base_url(auth_port)}/healthz",
        **fields,
    )
    referral = process(
        f"referral-{index}",
        [sys.executable, "-m", "services.referral", "serve"],
        {
            **referral_env,
            "REFERRAL_PORT": str(referral_port),
            "REFERRAL_AUTH_JWKS_URL": jwks_url or f"{base_url(auth_port)}{AUTH_API}/.well-known/jwks.json",
        },
        f"{base_url(referral_port)}/healthz",
        **fields,
    )
    return auth, referral


def inherited(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without any service setting: the services' defaults apply."""
    return {k: v for k, v in environ.items() if not k.startswith(("AUTH_", "REFERRAL_"))}


# What the stacks of the e2e tests set beyond production's defaults: hashing cheap, pools small.
LIGHT_AUTH = {
    "AUTH_ARGON2_TIME_COST": "1",
    "AUTH_ARGON2_MEMORY_KIB": "8192",
    "AUTH_ARGON2_PARALLELISM": "1",
    "AUTH_DB_POOL_MIN": "1",
    "AUTH_DB_POOL_MAX": "8",
}
LIGHT_REFERRAL = {"REFERRAL_DB_POOL_MIN": "1", "REFERRAL_DB_POOL_MAX": "8"}


def servers_env(
    database_url: str, redis_url: str, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment every service process of a stack starts from: the caller's without service
    settings, the servers' URLs, unbuffered output."""
    return {
        **inherited(os.environ if environ is None else environ),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
    }


_SMTP: list[Any] = []  # the harness's SMTP server, once started


def harness_smtp() -> Any:
    """The SMTP server every stack of this process sends its mails to (`deploy.local.embedded`'s, as
    `make run`'s): started at the first call, mails under `.artifacts/mail/<pid>/`, stopped at exit."""
    if not _SMTP:
        from deploy.local.embedded import start_smtp

        parent = ROOT / ".artifacts" / "mail"
        runs = [d for d in parent.glob("*") if d.name.isdigit() and not Path(f"/proc/{d.name}").exists()]
        for old in sorted(runs, key=lambda d: d.stat().st_mtime)[:-3]:
            shutil.rmtree(old, ignore_errors=True)
        server = start_smtp(parent / str(os.getpid()))
        atexit.register(server.stop)
        _SMTP.append(server)
    return _SMTP[0]


def production_envs(
    base: Mapping[str, str], *, redis_prefix: str, signing_pem: str, gateway_url: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The auth and referral environments of a stack behind the gateway at `gateway_url`: production
    mode on loopback, the gateway trusted, Redis keys under `redis_prefix`, tokens issued (and
    expected) with `iss` = the gateway's URL + /api/v1/auth, mails to `harness_smtp()`. Ports and
    JWKS: `service_pair`."""
    auth = {
        **base,
        "AUTH_ENV": "production",
        "AUTH_HOST": HOST,
        "AUTH_REDIS_PREFIX": f"{redis_prefix}auth:",
        "AUTH_JWT_PRIVATE_KEYS": signing_pem,
        "AUTH_PUBLIC_BASE_URL": gateway_url,
        "AUTH_TRUSTED_PROXIES": HOST,
        "AUTH_SMTP_URL": harness_smtp().url,
    }
    referral = {
        **base,
        "REFERRAL_ENV": "production",
        "REFERRAL_HOST": HOST,
        "REFERRAL_REDIS_PREFIX": f"{redis_prefix}referral:",
        "REFERRAL_AUTH_ISSUER": gateway_url + AUTH_API,
    }
    return auth, referral


def migrate(database_url: str, redis_url: str, log_dir: Path, timeout: float = 120.0) -> None:
    """Migrate a database with the services' own CLI (`python -m services.<name> migrate`), auth first;
    HarnessError naming the log when one fails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **inherited(os.environ),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "AUTH_ENV": "production",
        "AUTH_JWT_PRIVATE_KEYS": generate_pem(),  # required to load the settings; not used to migrate
        "AUTH_SMTP_URL": "smtp://127.0.0.1:1?starttls=off",  # likewise
        "REFERRAL_ENV": "production",
    }
    for service in ("auth", "referral"):
        log_path = log_dir / f"migrate-{service}.log"
        with log_path.open("wb") as log:
            migrated = subprocess.run(
                [sys.executable, "-m", f"services.{service}", "migrate"],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                timeout=timeout,
                check=False,
            )
        if migrated.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise HarnessError(f"{service} migrations failed ({migrated.returncode}); {log_path}:\n{tail}")


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


def nginx_render() -> ModuleType:
    """deploy.nginx.render, or a HarnessError naming what is missing."""
    if not shutil.which("nginx"):  # deploy.nginx.render runs `nginx` from PATH
        raise HarnessError(
            "nginx is not installed (or not on PATH); the harness runs the real gateway: "
            "apt-get install -y nginx"
        )
    try:
        return importlib.import_module("deploy.nginx.render")
    except ImportError as error:
        raise HarnessError(
            f"the nginx gateway (deploy/nginx/render.py) cannot be imported: {error}"
        ) from error


def nginx_gateway(
    name: str,
    port: int,
    auth: Sequence[int],
    referral: Sequence[int],
    limits: Mapping[str, Any],
    runtime: Path,
    *,
    log_dir: Path,
    **options: Any,
) -> Process:
    """nginx rendered by deploy.nginx.render on `port` in front of the services' ports.

    `limits` are `rate`/`burst` for every rate-limited zone (`render.ZONES`); `options` are
    further GatewayConfig fields. The rendered configuration is copied to `<log_dir>/<name>.conf`.
    """
    render = nginx_render()
    config = render.GatewayConfig(
        auth_upstreams=tuple(f"{HOST}:{p}" for p in auth),
        referral_upstreams=tuple(f"{HOST}:{p}" for p in referral),
        listen=f"{HOST}:{port}",
        max_body="64k",
        **{f"{zone}_{key}": value for zone in render.ZONES for key, value in limits.items()},
        **options,
    )
    runtime.mkdir(parents=True, exist_ok=True)
    conf = render.write_runtime(config, runtime)
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(conf, log_dir / f"{name}.conf")
    try:
        render.check_config(conf)
    except render.NginxConfigError as error:
        raise HarnessError(str(error)) from error
    command = [str(part) for part in render.nginx_command(conf)]
    return Process(name, command, dict(os.environ), f"{base_url(port)}/healthz", log_dir=log_dir)


def python_gateway(
    name: str, port: int, auth: Sequence[int], referral: Sequence[int], *, log_dir: Path
) -> Process:
    """The Python dev gateway (deploy.local.gateway) on `port`; no rate limits."""
    command = [sys.executable, "-m", "deploy.local.gateway", "--host", HOST, "--port", str(port)]
    command += ["--max-body", str(64 * 1024)]
    command += ["--route", f"{AUTH_API}=" + ",".join(base_url(p) for p in auth)]
    command += ["--route", f"{REFERRAL_API}=" + ",".join(base_url(p) for p in referral)]
    return Process(name, command, dict(os.environ), f"{base_url(port)}/healthz", log_dir=log_dir)
