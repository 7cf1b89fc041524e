"""What the harnesses that run the whole system (e2e, the benchmark) give their services, beyond the
supervisor (deploy/local/processes.py): environments, the shared SMTP server, migrations, pairs.

- `service_pair`: `auth-i` and `referral-i` as supervised services (port 0 unless given).
- `servers_env`, `production_envs`, `LIGHT_AUTH`/`LIGHT_REFERRAL`: the services' environments.
- `harness_smtp`: the SMTP server every stack of a test run sends its mails to.
- `migrate`: the services' own migration CLI on a database.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.local.processes import AUTH_API, HOST, ROOT, HarnessError, Process, service
from services.auth.adapters.signing import generate_pem


def service_pair(
    index: int,
    auth_env: Mapping[str, str],
    referral_env: Mapping[str, str],
    *,
    jwks_url: str,
    log_dir: Path,
    auth_port: int = 0,
    referral_port: int = 0,
) -> tuple[Process, Process]:
    """`auth-i` and `referral-i` (`python -m services.<name> serve`), each on its port (0: its own pick,
    reported), healthy once its /healthz answers; `referral-i` reads the JWKS at `jwks_url`."""
    auth = service(
        f"auth-{index}", "services.auth", auth_env, port_env="AUTH_PORT", port=auth_port, log_dir=log_dir
    )
    referral = service(
        f"referral-{index}",
        "services.referral",
        {**referral_env, "REFERRAL_AUTH_JWKS_URL": jwks_url},
        port_env="REFERRAL_PORT",
        port=referral_port,
        log_dir=log_dir,
    )
    return auth, referral


def jwks_of(process: Process) -> str:
    """The JWKS URL of a running auth instance."""
    return f"{process.url}{AUTH_API}/.well-known/jwks.json"


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
        "AUTH_DENY_LIST_PREFIX": f"{redis_prefix}deny:",
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
        "REFERRAL_DENY_LIST_PREFIX": f"{redis_prefix}deny:",
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
    for name in ("auth", "referral"):
        log_path = log_dir / f"migrate-{name}.log"
        with log_path.open("wb") as log:
            migrated = subprocess.run(
                [sys.executable, "-m", f"services.{name}", "migrate"],
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
            raise HarnessError(f"{name} migrations failed ({migrated.returncode}); {log_path}:\n{tail}")
