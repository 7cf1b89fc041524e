"""docker-compose.yml and the Dockerfiles, read as data: no Docker engine runs here, so no container starts.

What is checked is what compose would act on: the services and their order, the variables it reads
(each documented in .env.example; the secrets required), the one published port, healthchecks, and
that every container runs the same `python -m services.<name> serve|migrate` the launcher runs.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local import run
from services.auth.adapters.signing import generate_pem
from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings, load_auth_settings
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import describe, load_settings
from shared.outbox import LEASE_MARGIN

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
NGINX_CONF = "deploy/nginx/nginx.compose.conf"
SERVICES = ("auth", "referral")
PORTS = {"auth": 8081, "referral": 8082}
GATEWAY = "gateway"
ONE_SHOT = {"auth-migrate", "referral-migrate"}
EXPECTED = {"postgres", "redis", "auth", "referral", GATEWAY} | ONE_SHOT
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "AUTH_JWT_PRIVATE_KEYS", "AUTH_SMTP_URL")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, $VAR; $$ is a literal $.
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(Exception):
    """Compose's refusal to start: a required (`${VAR:?message}`) variable is unset or empty."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` as compose interpolates it with `env` (the shell's environment and .env)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in ("-", ":-"):
            return arg if unset else str(value)
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        return value or ""

    return _VARIABLE.sub(replace, text)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    """The whole document (or a part of it) interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def strings(node: Any) -> Iterator[str]:
    """Every string value in the document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)


def variables(node: Any) -> dict[str, set[str]]:
    """Each variable the document reads, with the operators it is read with (`""` for none)."""
    found: dict[str, set[str]] = {}
    for text in strings(node):
        for match in _VARIABLE.finditer(text):
            name = match.group("braced") or match.group("bare")
            if name:
                found.setdefault(name, set()).add(match.group("op") or "")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    if not COMPOSE_FILE.is_file():
        pytest.fail(f"{COMPOSE_FILE} is missing")
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict), (
        "docker-compose.yml must be a mapping with `services:`"
    )
    return document


@pytest.fixture(scope="module")
def signing_key() -> str:
    return generate_pem()


@pytest.fixture(scope="module")
def dotenv(signing_key: str) -> dict[str, str]:
    """The smallest .env compose accepts."""
    return {
        "POSTGRES_PASSWORD": "s3cret",
        "AUTH_JWT_PRIVATE_KEYS": signing_key,
        "AUTH_SMTP_URL": "smtp://mailer:pw@mail.example.org:587",
    }


def documented_in_env_example() -> set[str]:
    """Variables .env.example lists, set (`VAR=`) or as a commented example (`# VAR=`)."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


def service_of(name: str, compose: dict[str, Any]) -> dict[str, Any]:
    service = compose["services"].get(name)
    if not isinstance(service, dict):
        pytest.fail(f"docker-compose.yml has no service {name!r}")
    return service


def dockerfile(name: str) -> Path:
    return ROOT / "services" / name / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    parsed = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            parsed.append((keyword.upper(), arguments.strip()))
    return parsed


def dockerfile_cmd(name: str) -> list[str]:
    cmds = [arguments for keyword, arguments in instructions(dockerfile(name)) if keyword == "CMD"]
    assert cmds, f"{dockerfile(name)} has no CMD"
    command = json.loads(cmds[-1])  # exec form only: a shell form would not receive SIGTERM
    assert isinstance(command, list)
    return command


def built_from(service: dict[str, Any]) -> str | None:
    """Which service's Dockerfile builds the image (`auth`, `referral`), or None for a stock image."""
    build = service.get("build")
    if build is None:
        return None
    match = re.fullmatch(r"services/(\w+)/Dockerfile", build.get("dockerfile", ""))
    assert match, f"unexpected build: {build}"
    return match.group(1)


def effective_command(service: dict[str, Any]) -> list[str]:
    name = built_from(service)
    assert name is not None
    command = service.get("command", dockerfile_cmd(name))
    assert isinstance(command, list), "give commands in exec form (a list), as the launcher does"
    return command


def launcher_commands() -> set[tuple[str, ...]]:
    """What `make run` starts, as `python -m services.<name> <verb>` (the interpreter is the image's)."""
    env: dict[str, str] = {}
    planned = [*run.migrations(env, env), *run.services(env, env)]
    commands = set()
    for step in planned:
        if step.command[1:3] and step.command[1] == "-m" and step.command[2].startswith("services."):
            assert step.command[0] == sys.executable
            commands.add(("python", *step.command[1:]))
    assert len(commands) == 4, commands
    return commands


def test_the_services_are_all_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED


def test_every_variable_is_documented_in_env_example(compose: dict[str, Any]) -> None:
    # The rule: whatever compose reads, .env.example names (with a default or a commented example).
    missing = set(variables(compose)) - documented_in_env_example()
    assert not missing, f"document these in .env.example (docker-compose.yml reads them): {sorted(missing)}"


def test_secrets_use_the_required_variable_syntax(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    read = variables(compose)
    for name in REQUIRED_SECRETS:
        assert read.get(name) == {":?"}, f"read {name} only as ${{{name}:?message}}, got {read.get(name)}"
        for missing in ({}, {name: ""}):
            env = {key: value for key, value in dotenv.items() if key != name} | missing
            with pytest.raises(MissingVariable, match=name):
                resolve(compose, env)
    resolve(compose, dotenv)  # and with both set, everything interpolates


def test_only_the_gateway_publishes_a_port(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    for name, service in compose["services"].items():
        assert service.get("network_mode") is None, f"{name}: keep it on the compose network"
        if name != GATEWAY:
            assert "ports" not in service, f"{name} must not publish a port; only the gateway does"
    assert service_of(GATEWAY, compose)["ports"] == ["${GATEWAY_PORT:-8080}:8080"]
    ports = resolve(service_of(GATEWAY, compose)["ports"], dotenv | {"GATEWAY_PORT": "9000"})
    assert ports == ["9000:8080"]
    assert resolve(service_of(GATEWAY, compose)["ports"], dotenv) == ["8080:8080"]


def test_service_replicas_are_configurable(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    for name in SERVICES:
        service = service_of(name, compose)
        variable = f"REPLICAS_{name.upper()}"
        assert service["deploy"]["replicas"] == f"${{{variable}:-2}}"
        assert resolve(service["deploy"]["replicas"], dotenv) == "2"
        assert resolve(service["deploy"]["replicas"], dotenv | {variable: "5"}) == "5"
        assert "container_name" not in service, f"{name}: a fixed container name forbids replicas"


@pytest.mark.parametrize("name", sorted(EXPECTED - {"postgres", "redis", GATEWAY}))
def test_commands_are_the_launchers(name: str, compose: dict[str, Any]) -> None:
    service = service_of(name, compose)
    source = built_from(service)
    assert source in SERVICES, f"{name} must run an image built from services/<name>/Dockerfile"
    verb = "migrate" if name in ONE_SHOT else "serve"
    command = effective_command(service)
    assert command == ["python", "-m", f"services.{source}", verb]
    assert tuple(command) in launcher_commands(), "not a command deploy/local/run.py starts"
    assert importlib.util.find_spec(f"services.{source}.__main__") is not None
    assert service.get("image") == f"referral-system/{source}:latest", "the image name Kubernetes uses"


def test_one_shot_jobs_do_not_restart(compose: dict[str, Any]) -> None:
    for name in ONE_SHOT:
        assert service_of(name, compose).get("restart") == "no"


def test_start_order(compose: dict[str, Any]) -> None:
    expected = {
        "auth-migrate": {"postgres": "service_healthy"},
        "referral-migrate": {"postgres": "service_healthy", "auth-migrate": "service_completed_successfully"},
        "auth": {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "auth-migrate": "service_completed_successfully",
        },
        "referral": {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "referral-migrate": "service_completed_successfully",
        },
        GATEWAY: {"auth": "service_healthy", "referral": "service_healthy"},
    }
    for name, dependencies in expected.items():
        depends_on = service_of(name, compose).get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on with conditions, not a bare list"
        conditions = {dependency: spec.get("condition") for dependency, spec in depends_on.items()}
        assert conditions == dependencies, name


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if name in ONE_SHOT:
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and not service["healthcheck"].get("disable"), f"{name} needs a healthcheck"
    for name in SERVICES:
        test = " ".join(service_of(name, compose)["healthcheck"]["test"])
        assert "urllib.request" in test
        assert f"http://127.0.0.1:{PORTS[name]}/healthz" in test
    gateway_test = service_of(GATEWAY, compose)["healthcheck"]["test"]
    assert "http://127.0.0.1:8080/healthz" in gateway_test


def test_backing_stores_stay_inside(compose: dict[str, Any]) -> None:
    assert service_of("postgres", compose)["image"].startswith("postgres:16")
    assert service_of("redis", compose)["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert "ports" not in service_of(name, compose)


def test_gateway_is_nginx_with_the_rendered_configuration(compose: dict[str, Any]) -> None:
    gateway = service_of(GATEWAY, compose)
    assert re.fullmatch(r"nginx:1\.\d+(\.\d+)?-alpine", gateway["image"]), gateway["image"]
    mounts = [volume.split(":") for volume in gateway["volumes"]]
    assert [f"./{NGINX_CONF}", "/etc/nginx/nginx.conf", "ro"] in mounts
    conf = ROOT / NGINX_CONF
    if not conf.is_file():
        pytest.fail(
            f"{NGINX_CONF} does not exist: the gateway's container configuration (deploy/nginx/) must be"
            " rendered there; docker-compose.yml mounts it as /etc/nginx/nginx.conf"
        )
    text = re.sub(r"#[^\n]*", "", conf.read_text())
    assert re.search(r"listen\s+(0\.0\.0\.0:)?8080\b", text), f"{NGINX_CONF} must listen on 8080"
    for upstream in ("auth:8081", "referral:8082"):
        assert upstream in text, f"{NGINX_CONF} must send to {upstream}, the compose service"
    # The image's command is `nginx -g "daemon off;"`: a `daemon` directive in the file would clash.
    assert not re.search(r"^\s*daemon\s", text, flags=re.MULTILINE), (
        f"{NGINX_CONF}: drop `daemon`; the nginx image's command already passes -g 'daemon off;'"
    )


def known_variables(settings: type[Any], prefix: str) -> set[str]:
    return {name for name, _, _ in describe(settings, prefix)}


def test_service_environments_are_valid_settings(
    compose: dict[str, Any], dotenv: dict[str, str], signing_key: str
) -> None:
    """Each container's environment, as compose would hand it over, loads as the service's settings."""
    public = "https://referrals.example.org"
    for env_in in (dotenv, dotenv | {"AUTH_PUBLIC_BASE_URL": public}):
        resolved = resolve(compose, env_in)["services"]
        auth_env = {key: str(value) for key, value in resolved["auth"]["environment"].items()}
        referral_env = {key: str(value) for key, value in resolved["referral"]["environment"].items()}
        assert resolved["auth-migrate"]["environment"] == resolved["auth"]["environment"]
        assert resolved["referral-migrate"]["environment"] == resolved["referral"]["environment"]

        auth_known = known_variables(AuthSettings, AUTH_PREFIX)
        unknown = {key for key in auth_env if key not in auth_known and not key.startswith("AUTH_OAUTH_")}
        assert not unknown, f"the auth service reads no {sorted(unknown)}"
        unknown = set(referral_env) - known_variables(ReferralSettings, REFERRAL_PREFIX)
        assert not unknown, f"the referral service reads no {sorted(unknown)}"

        auth = load_auth_settings(auth_env)
        referral = load_settings(ReferralSettings, REFERRAL_PREFIX, referral_env)
        assert auth.jwt_private_keys == signing_key
        assert (
            auth.database_url
            == referral.database_url
            == "postgresql://postgres:s3cret@postgres:5432/referral"
        )
        assert auth.redis_url == referral.redis_url == "redis://redis:6379/0"
        assert (auth.host, auth.port) == ("0.0.0.0", PORTS["auth"])
        assert (referral.host, referral.port) == ("0.0.0.0", PORTS["referral"])
        assert auth.referral_service_url == f"http://referral:{PORTS['referral']}"
        assert referral.auth_jwks_url == f"http://auth:{PORTS['auth']}/api/v1/auth/.well-known/jwks.json"
        assert referral.auth_issuer == auth.issuer
        assert auth.public_base_url == env_in.get("AUTH_PUBLIC_BASE_URL", "http://127.0.0.1:8080")
        assert auth.hunter_api_key is None and auth.enrichment_api_key is None and auth.oauth == ()
        networks = [ipaddress.ip_network(proxy) for proxy in auth.trusted_proxies]
        # Docker's default address pools.
        assert any(ipaddress.ip_address("172.18.0.5") in network for network in networks)
        assert any(ipaddress.ip_address("192.168.16.2") in network for network in networks)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"([0-9]+)s", duration)
    assert match, f"a stop_grace_period in whole seconds, got {duration!r}"
    return float(match.group(1))


def test_a_stopping_container_gets_time_to_finish(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    """compose's default 10 s would kill a service in its drain: the grace covers drain, requests in
    flight and cleanup (the same sums as tests/deploy/test_k8s.py, without a preStop pause)."""
    resolved = resolve(compose, dotenv)["services"]
    auth = load_auth_settings({key: str(value) for key, value in resolved["auth"]["environment"].items()})
    referral_env = {key: str(value) for key, value in resolved["referral"]["environment"].items()}
    referral = load_settings(ReferralSettings, REFERRAL_PREFIX, referral_env)
    auth_cleanup = (
        max(auth.referral_timeout, auth.smtp_timeout) + LEASE_MARGIN / 2 + auth.enrichment_shutdown_grace
    )
    needed = {
        "auth": auth.shutdown_drain + auth.shutdown_timeout + auth_cleanup,
        "referral": referral.shutdown_drain + referral.shutdown_timeout,
        GATEWAY: 30,  # nginx's proxy timeout: the image stops it with SIGQUIT, which waits for those
    }
    for name, seconds in needed.items():
        grace = _seconds(service_of(name, compose).get("stop_grace_period", "10s"))
        assert grace >= seconds + 3, (name, grace, seconds)


def test_optional_integrations_pass_through(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    env = dotenv | {
        "AUTH_HUNTER_API_KEY": "hunter-key",
        "AUTH_ENRICHMENT_API_KEY": "enrichment-key",
        "AUTH_OAUTH_PROVIDERS": "google,github",
        "AUTH_OAUTH_GOOGLE_ISSUER": "https://accounts.google.com",
        "AUTH_OAUTH_GOOGLE_CLIENT_ID": "google-id",
        "AUTH_OAUTH_GOOGLE_CLIENT_SECRET": "google-secret",
        "AUTH_OAUTH_GITHUB_CLIENT_ID": "github-id",
        "AUTH_OAUTH_GITHUB_CLIENT_SECRET": "github-secret",
    }
    resolved = resolve(compose, env)["services"]["auth"]["environment"]
    auth = load_auth_settings({key: str(value) for key, value in resolved.items()})
    assert auth.hunter_api_key == "hunter-key"
    assert auth.enrichment_api_key == "enrichment-key"
    assert [(provider.name, provider.kind) for provider in auth.oauth] == [
        ("google", "oidc"),
        ("github", "github"),
    ]


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile(name: str) -> None:
    path = dockerfile(name)
    parsed = instructions(path)
    stages = [arguments for keyword, arguments in parsed if keyword == "FROM"]
    assert len(stages) >= 2, f"{path}: build in one stage, run from a clean one"
    assert re.search(r"\bAS\s+\w+", stages[0], flags=re.IGNORECASE), f"{path}: name the build stage"
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in parsed)
    final = parsed[max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM") :]
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    assert users, f"{path}: the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path}: USER {users[-1]} is root"
    assert user.isdigit(), f"{path}: a numeric USER lets Kubernetes' runAsNonRoot verify it"
    assert dockerfile_cmd(name) == ["python", "-m", f"services.{name}", "serve"]
    assert ("python", "-m", f"services.{name}", "serve") in launcher_commands()
    healthchecks = [arguments for keyword, arguments in final if keyword == "HEALTHCHECK"]
    assert healthchecks and f"http://127.0.0.1:{PORTS[name]}/healthz" in healthchecks[-1]
    assert any(keyword == "EXPOSE" and arguments == str(PORTS[name]) for keyword, arguments in final)
