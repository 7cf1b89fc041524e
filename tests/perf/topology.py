"""The production topology on 127.0.0.1 for the benchmark: nginx in front of N auth and N referral instances.

- `gateway`: nginx rendered by `deploy.nginx.render` (as in production: its access log on, JSON lines
  into its log file), `/api/v1/auth` to every auth instance, `/api/v1/referral` to every referral
  instance. Its rate limits are set far above anything one machine can send (`BENCH_LIMITS`): every
  request of the benchmark comes from one address, and what is measured is the services, not the
  limiter.
- `auth-i`: `python -m services.auth serve` in production mode, with the benchmark's signing key and
  the service's defaults for everything else (argon2 cost, pool sizes, access log, log level) but
  what the caller sets in `settings` (the benchmark caps the pools when the server has too few
  connection slots for them).
- `referral-i`: `python -m services.referral serve` in production mode, reading `auth-i`'s JWKS.

Tokens carry `iss` = the gateway's URL + `/api/v1/auth`; the services believe the gateway's
X-Forwarded-For (trusted proxy 127.0.0.1). Redis keys live under the prefix the caller gives (its
own: the caller deletes them). `AUTH_*` / `REFERRAL_*` variables of the caller's environment are not
passed on, so the defaults are really the services' own. Every process writes its output to
`<log_dir>/<name>.log`. `Topology.pids()` gives the process ids per component, for CPU and RSS
sampling through /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.processes import (
    AUTH_API,
    START_ATTEMPTS,
    AddressInUse,
    HarnessError,
    Process,
    alive,
    base_url,
    children,
    free_port,
    http_status,
    launch,
    nginx_gateway,
    stop_all,
)
from tests.harness import jwks_of, production_envs, servers_env, service_pair

START_TIMEOUT = 60.0
# Per client address; wrk sends everything from 127.0.0.1. nginx counts rates per millisecond, so
# this is "no limit" for a benchmark on one machine.
BENCH_LIMITS: Mapping[str, Any] = {"rate": "1000000r/s", "burst": 1000000}


@dataclass
class Topology:
    """The running processes; `start()` then `stop()` (or `running(...)` as a context manager)."""

    instances: int
    gateway: Process
    auth: list[Process]
    referral: list[Process]
    runtime_dir: Path
    limits: Mapping[str, Any] = field(default_factory=dict)
    started: list[Process] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return self.gateway.url

    @property
    def issuer(self) -> str:
        """`iss` of the tokens the auth instances sign (and the referral instances expect)."""
        return self.gateway_url + AUTH_API

    @property
    def services(self) -> list[Process]:
        return [*self.auth, *self.referral]

    @property
    def processes(self) -> list[Process]:
        return [*self.auth, *self.referral, self.gateway]

    def pids(self) -> dict[str, list[int]]:
        """Process ids per component: `auth`, `referral` (one per instance), `nginx` (master and workers)."""
        result: dict[str, list[int]] = {
            "auth": [p.pid for p in self.auth if p.popen is not None],
            "referral": [p.pid for p in self.referral if p.popen is not None],
        }
        if self.gateway.popen is not None:
            master = self.gateway.pid
            result["nginx"] = [master, *sorted(children(master))]
        return result

    def process_pids(self) -> dict[str, int]:
        """The pid of each started process by name (auth-0, referral-0, gateway, ...)."""
        return {p.name: p.pid for p in self.processes if p.popen is not None}

    def dead(self) -> list[str]:
        """What went wrong so far: each started process that is no longer running, with its log's tail."""
        return [
            f"{p.name} exited on its own with {p.popen.returncode}:\n{p.log_tail(10)}"
            for p in self.started
            if p.popen is not None and not p.stopped and p.popen.poll() is not None
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the auth instances (port 0, reported), the referral instances (on the ports picked in
        `build`, which the auth instances call), then the gateway (on its picked port); wait for every
        /healthz, then each service's /readyz. AddressInUse (all stopped) when a picked port was taken
        meanwhile: `running` builds the topology again with fresh picks."""
        try:
            deadline = time.monotonic() + timeout
            launch(self.started, self.auth, deadline)
            for auth, referral in zip(self.auth, self.referral, strict=True):
                referral.env["REFERRAL_AUTH_JWKS_URL"] = jwks_of(auth)
            launch(self.started, self.referral, deadline)
            self.gateway = nginx_gateway(
                "gateway",
                self.gateway.port,
                [p.port for p in self.auth],
                [p.port for p in self.referral],
                self.runtime_dir,
                log_dir=self.gateway.log_dir,
                limits=self.limits,
            )
            launch(self.started, [self.gateway], deadline)
            for process in self.services:
                while (status := http_status(process.url + "/readyz", timeout=3.0)) != 200:
                    if not process.running or time.monotonic() > deadline:
                        raise HarnessError(
                            f"{process.name} is not ready (/readyz: {status}):\n{process.log_tail()}"
                        )
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[str]:
        """Stop everything (the gateway first); every problem: deaths, exit codes, processes left behind."""
        problems = stop_all(self.started)
        self.started.clear()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        return problems


def build(
    *,
    instances: int,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    signing_pem: str,
    log_dir: Path,
    limits: Mapping[str, Any] = BENCH_LIMITS,
    environ: Mapping[str, str] | None = None,
    settings: Mapping[str, str] | None = None,
) -> Topology:
    """The processes of a topology of `instances` of each service on free ports (nothing started).

    `settings`: AUTH_* / REFERRAL_* variables to set beyond the topology's own (default: none, the
    services' defaults apply).
    """
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    log_dir.mkdir(parents=True, exist_ok=True)
    gateway_port = free_port()
    gateway_url = base_url(gateway_port)
    common = servers_env(database_url, redis_url, environ)
    auth_env, referral_env = production_envs(
        common, redis_prefix=redis_prefix, signing_pem=signing_pem, gateway_url=gateway_url
    )
    auth_env.update({k: v for k, v in (settings or {}).items() if k.startswith("AUTH_")})
    referral_env.update({k: v for k, v in (settings or {}).items() if k.startswith("REFERRAL_")})
    auth: list[Process] = []
    referral: list[Process] = []
    for i in range(instances):
        referral_port = free_port()  # auth-i calls referral-i: named before referral-i starts
        pair = service_pair(
            i,
            {**auth_env, "AUTH_REFERRAL_SERVICE_URL": base_url(referral_port)},
            referral_env,
            jwks_url="",  # auth-i's, once it has reported its port (Topology.start)
            log_dir=log_dir,
            referral_port=referral_port,
        )
        auth.append(pair[0])
        referral.append(pair[1])
    # The gateway's port is known now (the services' issuer names it); its configuration is written
    # once the services' ports are (Topology.start).
    gateway = Process("gateway", [], {}, port=gateway_port, log_dir=log_dir)
    runtime = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    return Topology(instances, gateway, auth, referral, runtime, limits)


@contextlib.contextmanager
def running(**options: Any) -> Iterator[Topology]:
    """`build(**options)`, started; stopped on the way out (HarnessError if it did not stop cleanly,
    unless the body already raised)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        topology = build(**options)
        try:
            topology.start()
            break
        except AddressInUse:  # a picked port was taken meanwhile: everything was stopped; pick again
            if attempt == START_ATTEMPTS:
                raise
    try:
        yield topology
    except BaseException:
        topology.stop()
        raise
    problems = topology.stop()
    if problems:
        raise HarnessError("the topology did not shut down cleanly:\n" + "\n".join(problems))


def rss_mb(pid: int) -> float | None:
    """The resident set size of `pid` in MiB (VmRSS), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` (every thread, in clock ticks), None when it cannot be read."""
    if not alive(pid):
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
    except (OSError, ValueError, IndexError):
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
