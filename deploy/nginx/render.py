"""Render the gateway's nginx.conf from `nginx.conf.template`, and run nginx on it.

`render(GatewayConfig(...))` gives the whole configuration as text; `write_runtime` writes it into a
runtime directory (pid and temporary files go there too) for a foreground nginx started with
`nginx_command`, as any user; `check_config` runs `nginx -t` on it. `python -m deploy.nginx.render`
rewrites the committed configurations: `nginx.compose.conf` (docker compose) from `COMPOSE` and
`deploy/k8s/gateway/nginx.conf` (the Kubernetes ConfigMap) from `K8S`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import re
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.openapi import swagger_page  # the Swagger UI page the services serve

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
COMPOSE_CONF = Path(__file__).with_name("nginx.compose.conf")
K8S_CONF = Path(__file__).resolve().parents[1] / "k8s" / "gateway" / "nginx.conf"
CONF_NAME = "nginx.conf"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
CONTAINER_RUNTIME_DIR = "/tmp"  # noqa: S108 (the containers' own writable directory)
CONNECT_TIMEOUT = 5  # seconds, at most: an upstream that does not accept a connection by then is down
CHECK_TIMEOUT = 30.0
INTERNAL_PROBLEMS = "/_gateway/problems/"  # internal locations: a client asking for one gets 404
PROBLEM_TYPE_PREFIX = "urn:referral-system:problem:"  # as in shared/errors.py

_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}")
_UNIX = re.compile(r"unix:/[A-Za-z0-9._/-]+")
_LISTEN = re.compile(r"(?:(\[[0-9A-Fa-f:.]+\]|\*|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):)?[0-9]{1,5}")
_SIZE = re.compile(r"[0-9]+[kKmMgG]?")
_RATE = re.compile(r"([1-9][0-9]*)r/([sm])")
_LOG_PATH = re.compile(r"/[A-Za-z0-9._/-]+")
# An address or network, in characters nginx reads as one (ip_network also takes an IPv6 scope, %eth0).
_NETWORK = re.compile(r"[0-9A-Fa-f:.]+(?:/[0-9]{1,3})?")
ZONES = ("token", "signup", "lookup", "signin", "mail")  # the rate-limit zones: {zone}_rate, {zone}_burst


class NginxConfigError(RuntimeError):
    """nginx refused a configuration (or could not be run); the message is nginx's."""


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """What varies between gateways: upstreams, the listen address, limits, timeouts and logs."""

    auth_upstreams: tuple[str, ...]  # "127.0.0.1:8081", "auth:8081", ...
    referral_upstreams: tuple[str, ...]
    listen: str = "127.0.0.1:8080"
    max_body: str = "64k"  # client_max_body_size
    token_rate: str = "10r/s"  # noqa: S105 (a rate, not a secret): POST /api/v1/auth/token, per client address
    token_burst: int = 20
    signup_rate: str = "5r/s"  # POST /api/v1/auth/signup
    signup_burst: int = 10
    lookup_rate: str = "20r/s"  # GET /api/v1/referral/codes?email=
    lookup_burst: int = 40
    signin_rate: str = "10r/m"  # GET /api/v1/auth/oauth/{provider}/authorize
    signin_burst: int = 10
    mail_rate: str = "5r/m"  # POST /api/v1/auth/password/forgot and /email/verification, one budget
    mail_burst: int = 5
    # Networks of the proxies in front of the gateway ("10.0.0.0/8", "::1", ...): from those, the
    # client address is taken from X-Forwarded-For. Empty: the gateway is the edge.
    trusted_proxies: tuple[str, ...] = ()
    proxy_timeout: int = 30  # seconds to send to / read from an upstream (connect: at most 5 s)
    # Seconds an idle upstream connection is kept: below the services' SHUTDOWN_DRAIN (5 s by default).
    upstream_keepalive_timeout: int = 3
    # Seconds an instance that refused a connection or timed out stays out of the rotation.
    upstream_fail_timeout: int = 3
    # Service to service, for a deployment without a load balancer of its own in front of the referral
    # instances (Kubernetes and compose have their Services): a second listener, never public, that
    # passes only /internal/ to them, with the same failover. None: no such listener.
    internal_listen: str | None = None
    access_log: str = "/dev/stdout"  # a path, or "off"
    error_log: str = "/dev/stderr"  # a path, or "stderr"

    def __post_init__(self) -> None:
        for name in ("auth", "referral"):
            _check_upstreams(name, getattr(self, f"{name}_upstreams"))
        for name in ("listen", "internal_listen"):
            value = getattr(self, name)
            if (value is not None or name == "listen") and not _LISTEN.fullmatch(str(value)):
                raise ValueError(f"{name} is [address:]port, got {value!r}")
        if not _SIZE.fullmatch(self.max_body):
            raise ValueError(f"max_body is a size such as 64k or 1m, got {self.max_body!r}")
        for name in ZONES:
            rate = getattr(self, f"{name}_rate")
            if not _RATE.fullmatch(rate):
                raise ValueError(f"{name}_rate is N r/s or N r/m, such as 10r/s, got {rate!r}")
            _check_integer(f"{name}_burst", getattr(self, f"{name}_burst"), minimum=0)
        for name in ("proxy_timeout", "upstream_keepalive_timeout", "upstream_fail_timeout"):
            _check_integer(name, getattr(self, name), minimum=1)
        check_trusted_proxies(self.trusted_proxies)
        if self.access_log != "off" and not _LOG_PATH.fullmatch(self.access_log):
            raise ValueError(f"access_log is an absolute path or 'off', got {self.access_log!r}")
        if self.error_log != "stderr" and not _LOG_PATH.fullmatch(self.error_log):
            raise ValueError(f"error_log is an absolute path or 'stderr', got {self.error_log!r}")


def _check_upstreams(name: str, upstreams: object) -> None:
    if not isinstance(upstreams, tuple) or not upstreams:
        raise ValueError(f"{name}_upstreams must be a non-empty tuple of host:port, got {upstreams!r}")
    for upstream in upstreams:
        if not isinstance(upstream, str) or not (_HOST_PORT.fullmatch(upstream) or _UNIX.fullmatch(upstream)):
            raise ValueError(f"an upstream is host:port or unix:/path, got {upstream!r}")


def check_trusted_proxies(proxies: object) -> None:
    """Raise ValueError, naming the bad entry, unless `proxies` is a tuple of IP networks or addresses."""
    if not isinstance(proxies, tuple):
        raise ValueError(f"trusted_proxies must be a tuple of networks such as 10.0.0.0/8, got {proxies!r}")
    for proxy in proxies:
        bad = f"a trusted proxy is an IP network such as 10.0.0.0/8 or an address, got {proxy!r}"
        if not isinstance(proxy, str) or not _NETWORK.fullmatch(proxy):
            raise ValueError(bad)
        try:
            ipaddress.ip_network(proxy)  # strict: 10.0.0.1/8 is refused (which network was meant?)
        except ValueError as error:
            raise ValueError(f"{bad}: {error}") from error


def _check_integer(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


# The containers' gateway (docker-compose): `nginx.compose.conf` is render(COMPOSE), kept by a test.
# Compose publishes it directly: it is the edge.
COMPOSE = GatewayConfig(
    auth_upstreams=("auth:8081",), referral_upstreams=("referral:8082",), listen="0.0.0.0:8080"
)
# The Kubernetes gateway (`deploy/k8s/gateway/nginx.conf` is render(K8S), kept by a test): the same,
# behind the Ingress controller, whose X-Forwarded-For it believes. Here any private address, like the
# services' *_TRUSTED_PROXIES in the base: an overlay should narrow it to the ingress controller's pod
# network (its own nginx.conf, rendered from `dataclasses.replace(K8S, trusted_proxies=...)`, in place
# of the `gateway-nginx` ConfigMap), else any pod that reaches the gateway can claim any address.
K8S = dataclasses.replace(COMPOSE, trusted_proxies=("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


@dataclass(frozen=True, slots=True)
class _Problem:
    status: int
    code: str
    title: str
    detail: str
    answer: int | None = None  # the status sent, when nginx's own code is not a real one (494)
    # Errors in the request line come before nginx knows a URI, and a named location needs one
    # ("empty URI in redirect to named location"): those go to an internal location by URI instead.
    by_uri: bool = False


def _problems(config: GatewayConfig) -> tuple[_Problem, ...]:
    return (
        _Problem(400, "bad_request", "Bad request", "The gateway could not parse the request.", by_uri=True),
        _Problem(404, "not_found", "No such resource", "No resource is served at this path."),
        _Problem(
            413,
            "payload_too_large",
            "The request body is too large",
            f"The body must not exceed {config.max_body}B.",
        ),
        _Problem(414, "uri_too_long", "The request target is too long", "The URI is too long.", by_uri=True),
        _Problem(
            494,
            "request_header_fields_too_large",
            "The request headers are too large",
            "A request header, or all of them together, is too large.",
            answer=431,
        ),
        _Problem(
            429,
            "too_many_requests",
            "Too many requests",
            "This client sent too many requests to this endpoint; retry after the time given in Retry-After.",
        ),
        _Problem(
            500,
            "internal_error",
            "Internal server error",
            "The gateway could not complete the request; it has been logged.",
        ),
        _Problem(
            502,
            "bad_gateway",
            "The upstream service is unavailable",
            "The upstream service could not be reached.",
        ),
        _Problem(
            503,
            "service_unavailable",
            "The service is unavailable; retry shortly",
            "The gateway cannot serve the request right now.",
        ),
        _Problem(
            504,
            "gateway_timeout",
            "The upstream service did not answer in time",
            f"No answer within {config.proxy_timeout} s.",
        ),
    )


_COMMON_HEADERS = (
    "add_header X-Request-ID $gateway_response_request_id always;",
    "add_header X-Content-Type-Options nosniff always;",
    "add_header Referrer-Policy no-referrer always;",
    "add_header Content-Security-Policy $gateway_csp always;",
)

# Content-Security-Policy. Every answer but the docs pages' is data (JSON, problem+json, the docs'
# own scripts and styles, loaded as subresources): nothing in it may load or run, nor be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
# The docs pages (Swagger UI at {prefix}/docs, ReDoc at {prefix}/redoc) and their static assets:
# scripts from the gateway only, plus Swagger UI's one inline script by its hash (apigami's
# index.html; it differs per service only by the spec URL). Styles may be inline: both UIs set
# style attributes and ReDoc injects <style> elements (styled-components). Images from the gateway
# and data: URIs (Swagger UI's icons). ReDoc runs its search in a worker made from a blob: URL.
# Requests (the spec, "Try it out", the password flow) go to the gateway only.
DOCS_PREFIXES = ("/api/v1/auth", "/api/v1/referral")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def swagger_inline_scripts(prefix: str) -> list[str]:
    """The inline scripts of the Swagger UI page a service under `prefix` serves (shared/openapi.py)."""
    return _INLINE_SCRIPT.findall(swagger_page(prefix))


def csp_hash(script: str) -> str:
    """A CSP source matching an inline script with exactly this text."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def docs_csp(prefix: str) -> str:
    """The policy of one service's docs pages and their assets."""
    hashes = " ".join(csp_hash(script) for script in swagger_inline_scripts(prefix))
    return (
        "default-src 'self'; "
        f"script-src 'self' {hashes}; "
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; "
        "worker-src 'self' blob:; "
        "connect-src 'self'; "
        "object-src 'none'; "
        "frame-ancestors 'none'; "
        "base-uri 'self'; "
        "form-action 'self'"
    )


# The pages the auth service's mails link to (verify-email, reset-password) and their script and style:
# scripts, styles and requests from the gateway only, no inline script, nothing framed or embedded.
PAGES_PREFIX = "/api/v1/auth/pages/"
PAGES_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def _csp_map() -> list[str]:
    """`map $uri $gateway_csp`: the docs policy on the docs pages and their assets, the pages' policy on
    the mailed links' pages, else API_CSP."""
    lines = ["map $uri $gateway_csp {", f'    "~^{re.escape(PAGES_PREFIX)}" "{PAGES_CSP}";']
    for prefix in DOCS_PREFIXES:
        quoted = re.escape(prefix)
        lines.append(f'    "~^{quoted}/(docs|redoc)$" "{docs_csp(prefix)}";')
        lines.append(f'    "~^{quoted}/static/" "{docs_csp(prefix)}";')
    lines += [f'    default "{API_CSP}";', "}"]
    return lines


def _indent(lines: list[str] | tuple[str, ...], depth: int) -> str:
    return "\n".join(" " * depth + line if line else "" for line in lines)


def _problem_location(problem: _Problem) -> list[str]:
    status = problem.answer or problem.status
    body = json.dumps(
        {
            "type": PROBLEM_TYPE_PREFIX + problem.code,
            "title": problem.title,
            "status": status,
            "detail": problem.detail,
            "code": problem.code,
        }
    )
    # The body goes in a single-quoted nginx string, where `$` would start a variable.
    assert "$" not in body
    quoted = body.replace("\\", "\\\\").replace("'", "\\'")
    lines = [f"location {_target(problem)} {{"]
    if problem.by_uri:
        lines.append("    internal;")
    lines.append("    default_type application/problem+json;")
    if problem.status == 429:
        # add_header here replaces the server's, so all of them again (Retry-After: see the map).
        lines += ["    " + line for line in _COMMON_HEADERS]
        lines.append("    add_header Retry-After $gateway_retry_after always;")
    lines += [f"    return {status} '{quoted}';", "}", ""]
    return lines


def _target(problem: _Problem) -> str:
    return f"= {INTERNAL_PROBLEMS}{problem.code}" if problem.by_uri else f"@{problem.code}"


def _error_page(problem: _Problem) -> str:
    answer = f"={problem.answer} " if problem.answer else ""
    target = _target(problem).removeprefix("= ")
    return f"error_page {problem.status} {answer}{target};"


def _limit(zone: str, burst: int) -> str:
    """limit_req's arguments; nginx refuses `burst=0`, which is what no burst means."""
    return f"zone={zone} burst={burst} nodelay" if burst else f"zone={zone} nodelay"


def _retry_after(rate: str) -> int:
    match = _RATE.fullmatch(rate)
    assert match is not None
    per_second = int(match.group(1)) / (60 if match.group(2) == "m" else 1)
    return max(1, math.ceil(1 / per_second))


def _real_ip(config: GatewayConfig) -> str:
    """The realip directives for the trusted proxies; a comment saying there are none otherwise."""
    if not config.trusted_proxies:
        return "    # (no trusted proxy)"
    lines = [f"set_real_ip_from {proxy};" for proxy in config.trusted_proxies]
    lines += ["real_ip_header X-Forwarded-For;", "real_ip_recursive on;"]
    return _indent(lines, 4)


def _servers(config: GatewayConfig, upstreams: tuple[str, ...]) -> list[str]:
    return [
        f"server {server} max_fails=1 fail_timeout={config.upstream_fail_timeout}s;" for server in upstreams
    ]


def _internal_server(config: GatewayConfig) -> str:
    """The service-to-service listener (GatewayConfig.internal_listen): /internal/ to the referral
    instances, everything else 404; "" without one."""
    if config.internal_listen is None:
        return ""
    lines = [
        "",
        "    # Service to service only (never published): the auth service's calls to the referral",
        "    # service's internal API, spread over its instances with the same failover.",
        "    server {",
        f"        listen {config.internal_listen};",
        "        server_name _;",
        "        merge_slashes off;",
        "        location /internal/ {",
        "            if ($gateway_dot_segment) {",
        "                return 404;",
        "            }",
        "            proxy_pass http://referral_service;",
        "        }",
        "        location / {",
        "            return 404;",
        "        }",
        "    }",
    ]
    return "\n".join(lines) + "\n"


class _Template(string.Template):
    # `{{name}}`: nginx itself uses `$name` and braces, but never two opening braces.
    delimiter = "{{"
    pattern = r"\{\{(?:(?P<named>[a-z_]+)\}\}|(?P<braced>(?!))|(?P<escaped>(?!))|(?P<invalid>))"  # type: ignore[assignment]


def render(config: GatewayConfig, *, runtime_dir: str | None = None) -> str:
    """The whole nginx.conf for `config`; pid and temporary files under `runtime_dir` (default /tmp).

    With a runtime directory (a local, foreground run) started by root, the workers stay root: nginx
    would otherwise switch them to `nobody`, who cannot reach a private runtime directory.
    """
    base = (runtime_dir or CONTAINER_RUNTIME_DIR).rstrip("/") or "/"
    if not base.startswith("/") or not _LOG_PATH.fullmatch(base if base != "/" else "/x"):
        raise ValueError(f"runtime_dir must be an absolute path of plain characters, got {runtime_dir!r}")
    temp = base if runtime_dir is None else f"{base}/temp"
    problems = _problems(config)
    error_pages = [_error_page(problem) for problem in problems]
    values = {
        "user": "user root;\n" if runtime_dir is not None and os.geteuid() == 0 else "",
        "pid": f"{base}/nginx.pid",
        "error_log": config.error_log,
        "temp": temp,
        "access_log": "off" if config.access_log == "off" else f"{config.access_log} gateway",
        "max_body": config.max_body,
        "real_ip": _real_ip(config),
        "auth_servers": _indent(_servers(config, config.auth_upstreams), 8),
        "referral_servers": _indent(_servers(config, config.referral_upstreams), 8),
        "upstream_keepalive_timeout": str(config.upstream_keepalive_timeout),
        "internal_server": _internal_server(config),
        "connect_timeout": str(min(CONNECT_TIMEOUT, config.proxy_timeout)),
        "proxy_timeout": str(config.proxy_timeout),
        "listen": config.listen,
        "common_headers": _indent(_COMMON_HEADERS, 8),
        "csp_map": _indent(_csp_map(), 4),
        "error_pages": _indent(error_pages, 8),
        "problem_locations": _indent([line for p in problems for line in _problem_location(p)][:-1], 8),
    }
    for zone in ZONES:
        rate = getattr(config, f"{zone}_rate")
        values[f"{zone}_rate"] = rate
        values[f"{zone}_limit"] = _limit(zone, getattr(config, f"{zone}_burst"))
        values[f"{zone}_retry_after"] = str(_retry_after(rate))
    return _Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)


def write_runtime(config: GatewayConfig, runtime_dir: Path) -> Path:
    """Create `runtime_dir` with its temp directories, write nginx.conf there; return that file's path."""
    runtime_dir = runtime_dir.resolve()
    for name in TEMP_DIRS:
        (runtime_dir / "temp" / name).mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = runtime_dir / CONF_NAME
    partial = runtime_dir / f".{CONF_NAME}.{os.getpid()}.tmp"
    partial.write_text(render(config, runtime_dir=str(runtime_dir)), encoding="utf-8")
    partial.replace(conf)
    return conf


def nginx_command(conf: Path) -> list[str]:
    """nginx in the foreground on `conf`, its prefix (relative paths, pid) the file's directory."""
    conf = conf.resolve()
    return ["nginx", "-e", "stderr", "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]


def check_config(conf: Path) -> None:
    """Run `nginx -t` on `conf`; raise NginxConfigError with nginx's own message when it fails."""
    command = nginx_command(conf)
    command[1:1] = ["-t", "-q"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT, check=False)
    except FileNotFoundError as error:
        raise NginxConfigError("nginx is not installed (or not on PATH)") from error
    except subprocess.TimeoutExpired as error:
        raise NginxConfigError(f"nginx -t did not finish within {CHECK_TIMEOUT:.0f} s") from error
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise NginxConfigError(f"nginx refused {conf}: {message}")


def main() -> int:
    """Rewrite the committed configurations from COMPOSE and K8S (run after changing the template)."""
    for config, path in ((COMPOSE, COMPOSE_CONF), (K8S, K8S_CONF)):
        path.write_text(render(config), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
