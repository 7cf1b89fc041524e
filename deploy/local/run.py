"""Run the whole system locally in the foreground until Ctrl-C: `python -m deploy.local.run` (`make run`)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal
from urllib.parse import urlsplit

from deploy.local.embedded import EmbeddedServerError, start_postgres, start_redis, start_smtp
from deploy.nginx.render import (
    GatewayConfig,
    NginxConfigError,
    check_config,
    check_trusted_proxies,
    nginx_command,
    write_runtime,
)
from services.auth.signing import generate_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / ".data"
SIGNING_KEY_FILE = DATA_DIR / "dev" / "jwt-signing-key.pem"
GATEWAY_DIR = DATA_DIR / "gateway"  # nginx's rendered configuration, pid and temporary files
MAIL_DIR = DATA_DIR / "mail"  # the embedded SMTP server's mails, one .eml file each
HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # the gateway's; PORT overrides it
AUTH_PORT = 8081
REFERRAL_PORT = 8082
AUTH_API = "/api/v1/auth"
REFERRAL_API = "/api/v1/referral"
HEALTH_TIMEOUT = 30.0
STOP_GRACE = 10.0
POLL_INTERVAL = 0.2
# Both gateways set X-Forwarded-For to their peer, so the services believe the gateway (on loopback).
TRUSTED_PROXIES = HOST
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)

GatewayKind = Literal["nginx", "python"]
NGINX_INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install nginx-light; macOS: brew install nginx)"


def say(message: str) -> None:
    """Print one plain line for the developer, at once."""
    print(message, flush=True)


@dataclass(frozen=True, slots=True)
class Service:
    """A process the launcher runs and watches; healthy once `health_url` (if any) answers 200."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    health_url: str | None = None

    @classmethod
    def python(
        cls, name: str, module: str, *args: str, env: Mapping[str, str], health_url: str | None = None
    ) -> Service:
        """A `python -m module args...` service run with this interpreter."""
        return cls(name, (sys.executable, "-m", module, *args), env, health_url)


class StopRequest:
    """Set by SIGINT/SIGTERM/SIGHUP; the launcher checks it between steps and while it waits."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; return whether one came."""
        return self._event.wait(seconds)


class Supervisor:
    """Starts services as child processes, notices when one exits, and stops them all."""

    def __init__(self, grace: float = STOP_GRACE) -> None:
        self.grace = grace
        self._running: list[tuple[Service, subprocess.Popen[bytes]]] = []

    def start(self, service: Service) -> None:
        """Start one service; it stops when the launcher tells it to, not on the terminal's Ctrl-C."""
        self._running.append((service, spawn(service.command, service.env)))

    def exited(self) -> tuple[Service, int] | None:
        """The first service whose process has exited, with its exit code; None while all run."""
        for service, process in self._running:
            code = process.poll()
            if code is not None:
                return service, code
        return None

    def stop(self) -> None:
        """SIGTERM every child (newest first), wait up to the grace period, then SIGKILL stragglers."""
        for _, process in reversed(self._running):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for service, process in reversed(self._running):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{service.name} did not stop within {self.grace:.0f} s; killing it.")
                _signal_group(process, signal.SIGKILL)
                process.wait()
            # Whatever the child left in its group (an nginx worker whose master died, say) goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self._running.clear()


def spawn(command: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start a child in the repo root, in its own process group (Ctrl-C reaches only the launcher)."""
    return subprocess.Popen(command, env=dict(env), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, process_group=0)


def _signal_group(process: subprocess.Popen[bytes], number: signal.Signals) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, number)


def mask_url(url: str) -> str:
    """The URL with any password (in the user part or a `password=` parameter) replaced by `***`."""
    netloc = urlsplit(url).netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if at and colon and password:
        url = url.replace(netloc, f"{user}:***@{hostinfo}", 1)
    return _PASSWORD_PARAMETER.sub(r"\1***", url)


def ensure_signing_key(path: Path) -> bool:
    """Create an RSA-2048 PKCS8 PEM private key (mode 0600) at `path` unless one exists; True if created."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        if path.stat().st_mode & 0o777 != 0o600:
            path.chmod(0o600)
        return False
    pem = generate_pem().encode("ascii")
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    os.replace(partial, path)
    return True


def gateway_port(environ: Mapping[str, str]) -> int:
    """The gateway's port: `PORT` from the launcher's environment, else 8080 (not a service's port)."""
    raw = environ.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"PORT must be a TCP port number, got {raw!r}")
    port = int(raw)
    if port in (AUTH_PORT, REFERRAL_PORT):
        raise SystemExit(f"PORT must not be {AUTH_PORT} or {REFERRAL_PORT}: the services listen there")
    return port


def gateway_trusted_proxies(environ: Mapping[str, str]) -> tuple[str, ...]:
    """`GATEWAY_TRUSTED_PROXIES` from the launcher's environment: comma-separated networks of proxies in
    front of the gateway, whose X-Forwarded-For nginx believes; none by default (the gateway is the edge)."""
    raw = environ.get("GATEWAY_TRUSTED_PROXIES", "")
    proxies = tuple(entry.strip() for entry in raw.split(",") if entry.strip())
    try:
        check_trusted_proxies(proxies)
    except ValueError as error:
        raise SystemExit(f"GATEWAY_TRUSTED_PROXIES: {error}") from None
    return proxies


def base_url(port: int) -> str:
    """`http://127.0.0.1:port`."""
    return f"http://{HOST}:{port}"


def auth_env(
    environ: Mapping[str, str],
    *,
    database_url: str,
    redis_url: str,
    gateway_port: int,
    signing_key: Path,
    smtp_url: str,
) -> dict[str, str]:
    """The auth service's environment: the launcher's, plus the dev settings."""
    env = dict(environ)
    env.update(
        {
            "AUTH_ENV": "dev",
            "AUTH_HOST": HOST,
            "AUTH_PORT": str(AUTH_PORT),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AUTH_JWT_PRIVATE_KEYS_FILE": str(signing_key),
            "AUTH_REFERRAL_SERVICE_URL": base_url(REFERRAL_PORT),
            "AUTH_TRUSTED_PROXIES": TRUSTED_PROXIES,
            "AUTH_SMTP_URL": smtp_url,
        }
    )
    env.setdefault("AUTH_PUBLIC_BASE_URL", base_url(gateway_port))
    return env


def referral_env(
    environ: Mapping[str, str], *, database_url: str, redis_url: str, auth_public_base_url: str
) -> dict[str, str]:
    """The referral service's environment: the launcher's, plus the dev settings (auth's JWKS and issuer)."""
    env = dict(environ)
    env.update(
        {
            "REFERRAL_ENV": "dev",
            "REFERRAL_HOST": HOST,
            "REFERRAL_PORT": str(REFERRAL_PORT),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "REFERRAL_AUTH_JWKS_URL": f"{base_url(AUTH_PORT)}{AUTH_API}/.well-known/jwks.json",
            # The same value as the auth service's `iss` (AuthSettings.issuer).
            "REFERRAL_AUTH_ISSUER": auth_public_base_url.rstrip("/") + AUTH_API,
        }
    )
    return env


def migrations(auth: Mapping[str, str], referral: Mapping[str, str]) -> list[Service]:
    """The one-off migration steps, in order: auth's schema, then referral's."""
    return [
        Service.python("auth", "services.auth", "migrate", env=auth),
        Service.python("referral", "services.referral", "migrate", env=referral),
    ]


def gateway_kind(environ: Mapping[str, str]) -> GatewayKind:
    """`GATEWAY` (`nginx` or `python`) when set, else nginx when it is installed, else the Python one."""
    wanted = environ.get("GATEWAY", "").strip().lower()
    if wanted not in ("", "nginx", "python"):
        raise SystemExit(f"GATEWAY must be nginx or python, got {wanted!r}")
    found = shutil.which("nginx", path=environ.get("PATH", os.defpath)) is not None
    if wanted == "nginx" and not found:
        raise SystemExit(
            f"GATEWAY=nginx, but nginx is not on PATH: {NGINX_INSTALL_HINT}, or set GATEWAY=python"
        )
    if wanted == "python" or not found:
        return "python"
    return "nginx"


def gateway_config(port: int, trusted_proxies: tuple[str, ...] = ()) -> GatewayConfig:
    """The nginx gateway of `make run`: on 127.0.0.1:port, in front of the two local services, believing
    the X-Forwarded-For of `trusted_proxies` (see gateway_trusted_proxies)."""
    return GatewayConfig(
        auth_upstreams=(f"{HOST}:{AUTH_PORT}",),
        referral_upstreams=(f"{HOST}:{REFERRAL_PORT}",),
        listen=f"{HOST}:{port}",
        trusted_proxies=trusted_proxies,
    )


def prepare_nginx(port: int, runtime_dir: Path = GATEWAY_DIR, trusted_proxies: tuple[str, ...] = ()) -> Path:
    """Render nginx.conf into `runtime_dir`, have nginx check it (NginxConfigError if refused); its path."""
    conf = write_runtime(gateway_config(port, trusted_proxies), runtime_dir)
    check_config(conf)
    return conf


def gateway(
    environ: Mapping[str, str], port: int, kind: GatewayKind = "python", runtime_dir: Path = GATEWAY_DIR
) -> Service:
    """The gateway on `port`: /api/v1/auth to the auth service, /api/v1/referral to the referral service.

    nginx runs in the foreground on the configuration `prepare_nginx` wrote into `runtime_dir`; the
    Python gateway (deploy/local/gateway.py) serves the same layout where nginx is not installed.
    """
    health_url = f"{base_url(port)}/healthz"
    if kind == "nginx":
        conf = runtime_dir.resolve() / "nginx.conf"
        return Service("gateway", tuple(nginx_command(conf)), dict(environ), health_url)
    routes = ((AUTH_API, AUTH_PORT), (REFERRAL_API, REFERRAL_PORT))
    arguments = ["--host", HOST, "--port", str(port)]
    for prefix, upstream_port in routes:
        arguments += ["--route", f"{prefix}={base_url(upstream_port)}"]
    return Service.python("gateway", "deploy.local.gateway", *arguments, env=environ, health_url=health_url)


def services(
    environ: Mapping[str, str],
    auth: Mapping[str, str],
    referral: Mapping[str, str],
    port: int,
    kind: GatewayKind = "python",
) -> list[Service]:
    """Everything `make run` starts, in start order: the two services, then the gateway on `port`."""
    auth_health = f"{base_url(AUTH_PORT)}/healthz"
    referral_health = f"{base_url(REFERRAL_PORT)}/healthz"
    return [
        Service.python("auth", "services.auth", "serve", env=auth, health_url=auth_health),
        Service.python("referral", "services.referral", "serve", env=referral, health_url=referral_health),
        gateway(environ, port, kind),
    ]


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def run_step(command: Sequence[str], env: Mapping[str, str], stop: StopRequest) -> int | None:
    """Run a one-off command to completion; its exit code, or None if a stop request cut it short."""
    process = spawn(command, env)
    try:
        while (code := process.poll()) is None:
            if stop.wait(POLL_INTERVAL):
                return None
        return code
    finally:
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def healthy(url: str) -> bool:
    """Whether GET `url` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # noqa: S310 (a fixed http:// URL)
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False


def wait_until_healthy(supervisor: Supervisor, pending: list[Service], stop: StopRequest) -> int | None:
    """Poll the services' health URLs; None once all answer, else the launcher's exit code."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while pending:
        if stop.is_set():
            return 0
        if (gone := supervisor.exited()) is not None:
            service, code = gone
            say(f"{service.name} exited with code {code} before it was ready; stopping.")
            return 1
        pending = [service for service in pending if service.health_url and not healthy(service.health_url)]
        if not pending:
            break
        if time.monotonic() >= deadline:
            names = ", ".join(service.name for service in pending)
            say(f"Not ready after {HEALTH_TIMEOUT:.0f} s: {names}; stopping.")
            return 1
        stop.wait(POLL_INTERVAL)
    return None


def backing_stores(stack: contextlib.ExitStack, environ: Mapping[str, str]) -> tuple[str, str]:
    """The database and Redis URLs: from the environment, else from embedded servers `stack` will stop."""
    database_url = environ.get("DATABASE_URL") or ""
    if database_url:
        say(f"Database: {mask_url(database_url)} (from DATABASE_URL)")
    else:
        postgres = stack.enter_context(start_postgres(DATA_DIR / "postgres"))
        database_url = postgres.url
        say(f"Database: {database_url} (embedded PostgreSQL, data in {postgres.data_dir})")
    redis_url = environ.get("REDIS_URL") or ""
    if redis_url:
        say(f"Redis: {mask_url(redis_url)} (from REDIS_URL)")
    else:
        redis = stack.enter_context(start_redis(DATA_DIR / "redis"))
        redis_url = redis.url
        say(f"Redis: {redis_url} (embedded Redis, data in {redis.data_dir})")
    return database_url, redis_url


def mail_server(stack: contextlib.ExitStack, environ: Mapping[str, str]) -> tuple[str, str]:
    """The SMTP URL the auth service sends with (`AUTH_SMTP_URL`, else an embedded server `stack`
    stops), and where the mails go, in words."""
    smtp_url = environ.get("AUTH_SMTP_URL") or ""
    if smtp_url:
        where = f"sent through {mask_url(smtp_url)} (AUTH_SMTP_URL)"
    else:
        server = stack.enter_context(start_smtp(MAIL_DIR))
        smtp_url = str(server.url)
        where = f"kept as .eml files in {server.mail_dir} (embedded SMTP server)"
    say(f"Mail: {where}")
    return smtp_url, where


def migrate(steps: Sequence[Service], stop: StopRequest) -> int | None:
    """Run each service's migrations in turn; None when all succeeded, else the launcher's exit code."""
    for step in steps:
        say(f"Running the {step.name} service's migrations...")
        code = run_step(step.command, step.env, stop)
        if code is None:
            return 0
        if code != 0:
            say(f"The {step.name} service's migrations failed (exit code {code}); nothing was started.")
            return 1
    return None


GATEWAY_NAMES: dict[GatewayKind, str] = {
    "nginx": "nginx",
    "python": "the Python dev gateway (nginx not found or GATEWAY=python)",
}


def banner(port: int, kind: GatewayKind = "python", mail: str = "") -> str:
    """What the developer reads once everything is up: each API and its docs, through the gateway, and
    where the mails go."""
    lines = [f"Serving on {base_url(port)} through {GATEWAY_NAMES[kind]}:"]
    for name, prefix in (("auth", AUTH_API), ("referral", REFERRAL_API)):
        api = f"{base_url(port)}{prefix}/"
        lines.append(f"  {name + ' API':<13} {api} (docs: {api}docs)")
    if mail:
        lines.append(f"  {'mails':<13} {mail}")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def supervise(
    supervisor: Supervisor,
    planned: list[Service],
    port: int,
    stop: StopRequest,
    *,
    kind: GatewayKind = "python",
    mail: str = "",
) -> int:
    """Start the services, wait until they are healthy, then until a stop request or a child exits."""
    for service in planned:
        supervisor.start(service)
    outcome = wait_until_healthy(supervisor, planned, stop)
    if outcome is not None:
        return outcome
    say(banner(port, kind, mail))
    while not stop.wait(POLL_INTERVAL):
        if (gone := supervisor.exited()) is not None:
            service, code = gone
            say(f"{service.name} exited unexpectedly with code {code}; stopping everything.")
            return 1
    say("Stopping...")
    return 0


def run(stop: StopRequest) -> int:
    """Start everything, serve until a stop request or a child's exit, stop everything; the exit code."""
    environ = os.environ
    port = gateway_port(environ)
    trusted_proxies = gateway_trusted_proxies(environ)
    busy = [number for number in (port, AUTH_PORT, REFERRAL_PORT) if port_in_use(number)]
    if busy:
        listed = ", ".join(str(number) for number in busy)
        hint = " (set PORT to move the gateway)" if port in busy else ""
        noun = "Port" if len(busy) == 1 else "Ports"
        say(f"{noun} {listed} on {HOST} already in use; stop whatever uses them{hint}.")
        return 1
    kind = gateway_kind(environ)
    if kind == "nginx":
        try:
            conf = prepare_nginx(port, trusted_proxies=trusted_proxies)
        except NginxConfigError as error:
            say(f"nginx refused the gateway's configuration (GATEWAY=python runs the Python one):\n{error}")
            return 1
        say(f"Gateway: nginx, configuration {conf}")
    else:
        say("Gateway: the Python dev gateway (deploy/local/gateway.py)")
        if trusted_proxies:
            say("GATEWAY_TRUSTED_PROXIES ignored: the Python dev gateway forwards its peer's address only.")
    with contextlib.ExitStack() as stack:  # unwinds in reverse: services first, then embedded servers
        try:
            database_url, redis_url = backing_stores(stack, environ)
            smtp_url, mail_note = mail_server(stack, environ)
        except EmbeddedServerError as error:
            if stop.is_set():  # Ctrl-C reached initdb or pg_ctl too
                return 0
            say(f"Could not start an embedded server: {error}")
            return 1
        if stop.is_set():
            return 0
        created = ensure_signing_key(SIGNING_KEY_FILE)
        say(f"JWT signing key: {SIGNING_KEY_FILE} ({'created' if created else 'existing'})")
        auth = auth_env(
            environ,
            database_url=database_url,
            redis_url=redis_url,
            gateway_port=port,
            signing_key=SIGNING_KEY_FILE,
            smtp_url=smtp_url,
        )
        referral = referral_env(
            environ,
            database_url=database_url,
            redis_url=redis_url,
            auth_public_base_url=auth["AUTH_PUBLIC_BASE_URL"],
        )
        failed = migrate(migrations(auth, referral), stop)
        if failed is not None:
            return failed
        supervisor = Supervisor()
        stack.callback(supervisor.stop)
        return supervise(
            supervisor, services(environ, auth, referral, port, kind), port, stop, kind=kind, mail=mail_note
        )


def main() -> int:
    """Entry point: handle SIGINT/SIGTERM (and SIGHUP) as a stop request, run, and restore the handlers."""
    stop = StopRequest()
    # SIGHUP too: a closed terminal must not leave the services (in their own process groups) running.
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.signal(number, stop) for number in stopping}
    try:
        code = run(stop)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    say("Stopped." if code == 0 else f"Stopped (exit code {code}).")
    return code


if __name__ == "__main__":
    sys.exit(main())
