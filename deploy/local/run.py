"""Run the whole system locally in the foreground until Ctrl-C: `python -m deploy.local.run` (`make run`).

Its defaults are fixed and known to the developer: the gateway on 127.0.0.1:8080, the auth service on
8081, the referral service on 8082, everything it keeps under `.data/`. `PORT`, `RUN_AUTH_PORT`,
`RUN_REFERRAL_PORT` and `RUN_DATA_DIR` move them (the README's examples are run by a test against a
launcher started this way, on free ports and a temporary folder: tests/e2e/test_readme_examples.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from deploy.local import requirements
from deploy.local.embedded import EmbeddedServerError, start_postgres, start_redis, start_smtp
from deploy.local.processes import HarnessError, Process, base_url, http_status, nginx_gateway, stop_all
from deploy.nginx.render import check_trusted_proxies
from services.auth.adapters.signing import generate_pem

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / ".data"  # RUN_DATA_DIR overrides it
GATEWAY_DIR = DATA_DIR / "gateway"  # nginx's rendered configuration, pid and temporary files
MAIL_DIR = DATA_DIR / "mail"  # the embedded SMTP server's mails, one .eml file each
HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # the gateway's; PORT overrides it
# The services' ports under `make run`: fixed, known to the developer (the harnesses of the tests and
# the benchmark start services on port 0 instead); checked free before anything starts.
# RUN_AUTH_PORT and RUN_REFERRAL_PORT override them.
AUTH_PORT = 8081
REFERRAL_PORT = 8082
AUTH_API = "/api/v1/auth"
REFERRAL_API = "/api/v1/referral"
HEALTH_TIMEOUT = 30.0
STOP_GRACE = 10.0
POLL_INTERVAL = 0.2
# The gateway sets X-Forwarded-For to its peer, so the auth service believes the gateway (on loopback).
TRUSTED_PROXIES = HOST
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def say(message: str) -> None:
    """Print one plain line for the developer, at once."""
    print(message, flush=True)


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


@dataclass(frozen=True)
class Layout:
    """Where the launcher puts the system: the gateway's and the services' ports on 127.0.0.1, and
    the folder it keeps everything in (the embedded servers' data, the mails, the dev signing key,
    nginx's runtime files)."""

    port: int = DEFAULT_PORT
    auth_port: int = AUTH_PORT
    referral_port: int = REFERRAL_PORT
    data_dir: Path = DATA_DIR

    @property
    def signing_key(self) -> Path:
        return self.data_dir / "dev" / "jwt-signing-key.pem"

    @property
    def gateway_dir(self) -> Path:
        return self.data_dir / "gateway"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"


def port_setting(environ: Mapping[str, str], name: str, default: int) -> int:
    """The TCP port in the launcher's variable `name`, else `default`; SystemExit (one line) if malformed."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"{name} must be a TCP port number, got {raw!r}")
    return int(raw)


def gateway_port(environ: Mapping[str, str], services: tuple[int, int] = (AUTH_PORT, REFERRAL_PORT)) -> int:
    """The gateway's port: `PORT` from the launcher's environment, else 8080 (not a service's port)."""
    port = port_setting(environ, "PORT", DEFAULT_PORT)
    if port in services:
        raise SystemExit(f"PORT must not be {services[0]} or {services[1]}: the services listen there")
    return port


def layout(environ: Mapping[str, str]) -> Layout:
    """The launcher's ports and folder: `PORT` (the gateway, 8080), `RUN_AUTH_PORT` (8081),
    `RUN_REFERRAL_PORT` (8082) and `RUN_DATA_DIR` (`.data/` in the repository) from its environment;
    SystemExit with one line for a malformed value or two ports alike."""
    auth_port = port_setting(environ, "RUN_AUTH_PORT", AUTH_PORT)
    referral_port = port_setting(environ, "RUN_REFERRAL_PORT", REFERRAL_PORT)
    if auth_port == referral_port:
        raise SystemExit(f"RUN_AUTH_PORT and RUN_REFERRAL_PORT must differ, both are {auth_port}")
    raw_dir = environ.get("RUN_DATA_DIR", "").strip()
    return Layout(
        port=gateway_port(environ, (auth_port, referral_port)),
        auth_port=auth_port,
        referral_port=referral_port,
        data_dir=Path(raw_dir).resolve() if raw_dir else DATA_DIR,
    )


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


def auth_env(
    environ: Mapping[str, str],
    *,
    database_url: str,
    redis_url: str,
    gateway_port: int,
    signing_key: Path,
    smtp_url: str,
    auth_port: int = AUTH_PORT,
    referral_port: int = REFERRAL_PORT,
) -> dict[str, str]:
    """The auth service's environment: the launcher's, plus the dev settings."""
    env = dict(environ)
    env.update(
        {
            "AUTH_ENV": "dev",
            "AUTH_HOST": HOST,
            "AUTH_PORT": str(auth_port),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "AUTH_JWT_PRIVATE_KEYS_FILE": str(signing_key),
            "AUTH_REFERRAL_SERVICE_URL": base_url(referral_port),
            "AUTH_TRUSTED_PROXIES": TRUSTED_PROXIES,
            "AUTH_SMTP_URL": smtp_url,
        }
    )
    env.setdefault("AUTH_PUBLIC_BASE_URL", base_url(gateway_port))
    # Webhook receivers of a local run are local too (AUTH_WEBHOOK_URLS, if the launcher's env sets it).
    env.setdefault("AUTH_WEBHOOK_ALLOW_PRIVATE", "true")
    return env


def referral_env(
    environ: Mapping[str, str],
    *,
    database_url: str,
    redis_url: str,
    auth_public_base_url: str,
    auth_port: int = AUTH_PORT,
    referral_port: int = REFERRAL_PORT,
) -> dict[str, str]:
    """The referral service's environment: the launcher's, plus the dev settings (auth's JWKS and issuer)."""
    env = dict(environ)
    env.update(
        {
            "REFERRAL_ENV": "dev",
            "REFERRAL_HOST": HOST,
            "REFERRAL_PORT": str(referral_port),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "REFERRAL_AUTH_JWKS_URL": f"{base_url(auth_port)}{AUTH_API}/.well-known/jwks.json",
            # The same value as the auth service's `iss` (AuthSettings.issuer).
            "REFERRAL_AUTH_ISSUER": auth_public_base_url.rstrip("/") + AUTH_API,
        }
    )
    env.setdefault("REFERRAL_WEBHOOK_ALLOW_PRIVATE", "true")  # local receivers, as for the auth service
    return env


def migrations(auth: Mapping[str, str], referral: Mapping[str, str]) -> list[Process]:
    """The one-off migration steps, in order: auth's schema, then referral's (output to the terminal)."""
    return [
        Process(name, [sys.executable, "-m", f"services.{name}", "migrate"], dict(env), log_dir=None)
        for name, env in (("auth", auth), ("referral", referral))
    ]


def services(auth: Mapping[str, str], referral: Mapping[str, str]) -> list[Process]:
    """The two services on the ports their environments name (else 8081 and 8082), their output on the
    terminal."""
    return [
        Process(
            name,
            [sys.executable, "-m", f"services.{name}", "serve"],
            dict(env),
            port=int(env.get(f"{name.upper()}_PORT", default)),
            port_env=f"{name.upper()}_PORT",
            log_dir=None,
        )
        for name, env, default in (("auth", auth, AUTH_PORT), ("referral", referral, REFERRAL_PORT))
    ]


def gateway(
    environ: Mapping[str, str],
    port: int,
    trusted_proxies: tuple[str, ...] = (),
    runtime_dir: Path = GATEWAY_DIR,
    *,
    auth_port: int = AUTH_PORT,
    referral_port: int = REFERRAL_PORT,
) -> Process:
    """nginx on 127.0.0.1:`port`, in the foreground on the configuration rendered into `runtime_dir`
    (and checked with `nginx -t`: HarnessError with nginx's message if refused), in front of the two
    services, believing the X-Forwarded-For of `trusted_proxies` (see gateway_trusted_proxies)."""
    return nginx_gateway(
        "gateway",
        port,
        [auth_port],
        [referral_port],
        runtime_dir.resolve(),
        log_dir=None,
        environ=environ,
        trusted_proxies=trusted_proxies,
    )


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def run_step(step: Process, stop: StopRequest) -> int | None:
    """Run a one-off command to completion; its exit code, or None if a stop request cut it short."""
    step.start()
    assert step.popen is not None
    try:
        while (code := step.popen.poll()) is None:
            if stop.wait(POLL_INTERVAL):
                return None
        return code
    finally:
        if step.popen.poll() is None:
            step.stop(STOP_GRACE)


def wait_until_healthy(started: Sequence[Process], stop: StopRequest) -> int | None:
    """Poll the processes' health URLs; None once all answer, else the launcher's exit code."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    pending = list(started)
    while pending:
        if stop.is_set():
            return 0
        if (gone := exited(started)) is not None:
            code = gone.popen.returncode if gone.popen else None
            say(f"{gone.name} exited with code {code} before it was ready; stopping.")
            return 1
        pending = [process for process in pending if http_status(process.health_url) != 200]
        if not pending:
            break
        if time.monotonic() >= deadline:
            names = ", ".join(process.name for process in pending)
            say(f"Not ready after {HEALTH_TIMEOUT:.0f} s: {names}; stopping.")
            return 1
        stop.wait(POLL_INTERVAL)
    return None


def exited(started: Sequence[Process]) -> Process | None:
    """The first process that has exited (on its own), None while all run."""
    return next((process for process in started if not process.running), None)


def backing_stores(
    stack: contextlib.ExitStack, environ: Mapping[str, str], data_dir: Path = DATA_DIR
) -> tuple[str, str]:
    """The database and Redis URLs: from the environment, else from embedded servers `stack` will stop
    (their data under `data_dir`)."""
    database_url = environ.get("DATABASE_URL") or ""
    if database_url:
        say(f"Database: {mask_url(database_url)} (from DATABASE_URL)")
    else:
        postgres = stack.enter_context(start_postgres(data_dir / "postgres"))
        database_url = postgres.url
        say(f"Database: {database_url} (embedded PostgreSQL, data in {postgres.data_dir})")
    redis_url = environ.get("REDIS_URL") or ""
    if redis_url:
        say(f"Redis: {mask_url(redis_url)} (from REDIS_URL)")
    else:
        redis = stack.enter_context(start_redis(data_dir / "redis"))
        redis_url = redis.url
        say(f"Redis: {redis_url} (embedded Redis, data in {redis.data_dir})")
    return database_url, redis_url


def mail_server(
    stack: contextlib.ExitStack, environ: Mapping[str, str], mail_dir: Path = MAIL_DIR
) -> tuple[str, str]:
    """The SMTP URL the auth service sends with (`AUTH_SMTP_URL`, else an embedded server `stack`
    stops, keeping the mails in `mail_dir`), and where the mails go, in words."""
    smtp_url = environ.get("AUTH_SMTP_URL") or ""
    if smtp_url:
        where = f"sent through {mask_url(smtp_url)} (AUTH_SMTP_URL)"
    else:
        server = stack.enter_context(start_smtp(mail_dir))
        smtp_url = str(server.url)
        where = f"kept as .eml files in {server.mail_dir} (embedded SMTP server)"
    say(f"Mail: {where}")
    return smtp_url, where


def migrate(steps: Sequence[Process], stop: StopRequest) -> int | None:
    """Run each service's migrations in turn; None when all succeeded, else the launcher's exit code."""
    for step in steps:
        say(f"Running the {step.name} service's migrations...")
        code = run_step(step, stop)
        if code is None:
            return 0
        if code != 0:
            say(f"The {step.name} service's migrations failed (exit code {code}); nothing was started.")
            return 1
    return None


def banner(port: int, mail: str = "") -> str:
    """What the developer reads once everything is up: each API and its docs, through the gateway, and
    where the mails go."""
    lines = [f"Serving on {base_url(port)} through nginx:"]
    for name, prefix in (("auth", AUTH_API), ("referral", REFERRAL_API)):
        api = f"{base_url(port)}{prefix}/"
        lines.append(f"  {name + ' API':<13} {api} (docs: {api}docs)")
    if mail:
        lines.append(f"  {'mails':<13} {mail}")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def supervise(
    started: list[Process], planned: Sequence[Process], port: int, stop: StopRequest, mail: str = ""
) -> int:
    """Start the processes, wait until they are healthy, then until a stop request or a child exits."""
    for process in planned:
        process.start()
        started.append(process)
    outcome = wait_until_healthy(started, stop)
    if outcome is not None:
        return outcome
    say(banner(port, mail))
    while not stop.wait(POLL_INTERVAL):
        if (gone := exited(started)) is not None:
            code = gone.popen.returncode if gone.popen else None
            say(f"{gone.name} exited unexpectedly with code {code}; stopping everything.")
            return 1
    say("Stopping...")
    return 0


def stop_everything(started: list[Process]) -> None:
    """SIGTERM each process (newest first), wait, and say what went wrong (an exit code, a leftover)."""
    for problem in stop_all(started):
        say(problem)
    started.clear()


def run(stop: StopRequest) -> int:
    """Start everything, serve until a stop request or a child's exit, stop everything; the exit code."""
    environ = os.environ
    where = layout(environ)
    port = where.port
    trusted_proxies = gateway_trusted_proxies(environ)
    busy = [number for number in (port, where.auth_port, where.referral_port) if port_in_use(number)]
    if busy:
        listed = ", ".join(str(number) for number in busy)
        hints = ["set PORT to move the gateway"] if port in busy else []
        if set(busy) - {port}:
            hints.append("RUN_AUTH_PORT and RUN_REFERRAL_PORT move the services")
        hint = f" ({'; '.join(hints)})"
        noun = "Port" if len(busy) == 1 else "Ports"
        say(f"{noun} {listed} on {HOST} already in use; stop whatever uses them{hint}.")
        return 1
    if absent := requirements.missing(["nginx"], environ):
        say(requirements.advice(absent))  # `make run` installs it first
        return 1
    try:
        nginx = gateway(
            environ,
            port,
            trusted_proxies,
            where.gateway_dir,
            auth_port=where.auth_port,
            referral_port=where.referral_port,
        )
    except HarnessError as error:
        say(f"nginx refused the gateway's configuration:\n{error}")
        return 1
    say(f"Gateway: nginx, configuration {where.gateway_dir / 'nginx.conf'}")
    with contextlib.ExitStack() as stack:  # unwinds in reverse: services first, then embedded servers
        try:
            database_url, redis_url = backing_stores(stack, environ, where.data_dir)
            smtp_url, mail_note = mail_server(stack, environ, where.mail_dir)
        except EmbeddedServerError as error:
            if stop.is_set():  # Ctrl-C reached initdb or pg_ctl too
                return 0
            say(f"Could not start an embedded server: {error}")
            return 1
        if stop.is_set():
            return 0
        created = ensure_signing_key(where.signing_key)
        say(f"JWT signing key: {where.signing_key} ({'created' if created else 'existing'})")
        auth = auth_env(
            environ,
            database_url=database_url,
            redis_url=redis_url,
            gateway_port=port,
            signing_key=where.signing_key,
            smtp_url=smtp_url,
            auth_port=where.auth_port,
            referral_port=where.referral_port,
        )
        referral = referral_env(
            environ,
            database_url=database_url,
            redis_url=redis_url,
            auth_public_base_url=auth["AUTH_PUBLIC_BASE_URL"],
            auth_port=where.auth_port,
            referral_port=where.referral_port,
        )
        failed = migrate(migrations(auth, referral), stop)
        if failed is not None:
            return failed
        started: list[Process] = []
        stack.callback(stop_everything, started)
        return supervise(started, [*services(auth, referral), nginx], port, stop, mail_note)


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
