"""Sign-in providers from the environment: `AUTH_OAUTH_PROVIDERS` and `AUTH_OAUTH_<NAME>_*`.

`AUTH_OAUTH_PROVIDERS=google,github` lists the names (lower-case `a-z 0-9 _ -`; they appear in the
callback path). Each name's variables use it upper-cased with `-` turned into `_`:
`AUTH_OAUTH_<NAME>_KIND` (`oidc`, the default, or `github`), `_ISSUER` (OpenID Connect: required),
`_CLIENT_ID`, `_CLIENT_SECRET`, `_SCOPE`, `_TIMEOUT`, and for GitHub `_AUTHORIZE_URL`, `_TOKEN_URL`,
`_API_URL` (GitHub Enterprise, tests). A listed provider without a client id (or, for GitHub, whose
OAuth apps always have one, without a client secret) is not offered: it is skipped with a reason,
logged at startup. An OpenID Connect provider without a client secret is a public client: it signs
in with PKCE alone, which works only with a provider that offers the token endpoint authentication
method `none` (logged at startup). A malformed value raises SettingsError naming the variable, so a
typo never silently turns a provider off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from shared.config import SettingsError, load_settings, setting

log = logging.getLogger(__name__)

PROVIDERS_VARIABLE = "AUTH_OAUTH_PROVIDERS"
OIDC: Literal["oidc"] = "oidc"
GITHUB: Literal["github"] = "github"
ProviderKind = Literal["oidc", "github"]

DEFAULT_SCOPES: Mapping[str, str] = {OIDC: "openid email profile", GITHUB: "read:user user:email"}
GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"  # noqa: S105 (a URL, not a secret)
GITHUB_API_URL = "https://api.github.com"
DEFAULT_TIMEOUT = 5.0

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True, kw_only=True)
class OAuthProviderSettings:
    """One usable sign-in provider. `issuer` is set for OpenID Connect, the three URLs for GitHub.

    `client_secret` is None for a public client (OpenID Connect only); it never appears in a repr.
    """

    name: str
    kind: ProviderKind
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    scope: str
    timeout: float = DEFAULT_TIMEOUT
    issuer: str | None = None
    authorize_url: str | None = None
    token_url: str | None = None
    api_url: str | None = None

    def __post_init__(self) -> None:
        if self.client_secret == "":
            # An empty secret would be sent as one; "no secret" is None, and means a public client.
            raise ValueError("client_secret is None (a public client) or not empty")

    def redirect_uri(self, public_base_url: str, api_prefix: str = "/api/v1/auth") -> str:
        """The callback to register with the provider: base URL + `/api/v1/auth/oauth/<name>/callback`."""
        return f"{public_base_url.rstrip('/')}{api_prefix}/oauth/{self.name}/callback"


@dataclass(frozen=True, slots=True)
class SkippedProvider:
    """A listed provider that is not offered, and why (no secret values in `reason`)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class OAuthProvidersConfig:
    """What `AUTH_OAUTH_*` configures: the providers offered and the ones skipped."""

    providers: tuple[OAuthProviderSettings, ...]
    skipped: tuple[SkippedProvider, ...]


@dataclass(frozen=True, kw_only=True)
class _ProviderVariables:
    """The raw per-provider variables, read by the shared loader under `AUTH_OAUTH_<NAME>_`."""

    kind: str = setting(OIDC, doc="oidc or github")
    issuer: str | None = setting(None, doc="OpenID Connect issuer URL (discovery is read from it)")
    client_id: str | None = setting(None, doc="client id registered with the provider")
    client_secret: str | None = setting(
        None,
        sensitive=True,
        doc="client secret registered with the provider (OpenID Connect: unset for a public client)",
    )
    scope: str | None = setting(None, doc="scopes to ask for (default per kind)")
    timeout: float = setting(DEFAULT_TIMEOUT, doc="seconds one sign-in step may take at the provider")
    authorize_url: str | None = setting(None, doc="GitHub: authorization endpoint")
    token_url: str | None = setting(None, doc="GitHub: token endpoint")
    api_url: str | None = setting(None, doc="GitHub: REST API base")


def provider_prefix(name: str) -> str:
    """`google` -> `AUTH_OAUTH_GOOGLE_`, `my-idp` -> `AUTH_OAUTH_MY_IDP_`."""
    return f"AUTH_OAUTH_{name.upper().replace('-', '_')}_"


def _names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get(PROVIDERS_VARIABLE, "")
    names = [part.strip() for part in raw.split(",") if part.strip()]
    prefixes: dict[str, str] = {}
    for name in names:
        if not _NAME.fullmatch(name):
            raise SettingsError(
                f"{PROVIDERS_VARIABLE}: {name!r} is not a provider name"
                " (1 to 32 of lower-case a-z, 0-9, _ and -, starting with a letter or digit)"
            )
        prefix = provider_prefix(name)
        if prefix in prefixes:
            raise SettingsError(
                f"{PROVIDERS_VARIABLE}: {prefixes[prefix]!r} and {name!r} would share the variables {prefix}*"
            )
        prefixes[prefix] = name
    return names


def _http_url(value: str, variable: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SettingsError(f"{variable} must be an http(s) URL without query or fragment, got {value!r}")
    return value


def _provider(name: str, environ: Mapping[str, str]) -> OAuthProviderSettings | SkippedProvider:
    prefix = provider_prefix(name)
    raw = load_settings(_ProviderVariables, prefix, environ)
    kind = raw.kind.strip().lower()
    if kind not in (OIDC, GITHUB):
        raise SettingsError(f"{prefix}KIND must be {OIDC!r} or {GITHUB!r}, got {raw.kind!r}")
    if not 0 < raw.timeout <= 60:
        raise SettingsError(f"{prefix}TIMEOUT must be more than 0 and at most 60 seconds")
    issuer = raw.issuer.strip() if raw.issuer else None
    if issuer:
        _http_url(issuer, f"{prefix}ISSUER")
    urls = {
        "authorize_url": raw.authorize_url or GITHUB_AUTHORIZE_URL,
        "token_url": raw.token_url or GITHUB_TOKEN_URL,
        "api_url": (raw.api_url or GITHUB_API_URL).rstrip("/"),
    }
    for key, url in urls.items():
        _http_url(url, f"{prefix}{key.upper()}")
    scope = " ".join((raw.scope or DEFAULT_SCOPES[kind]).split())
    if not scope:
        raise SettingsError(f"{prefix}SCOPE must name at least one scope")
    if kind == OIDC and "openid" not in scope.split():
        raise SettingsError(f"{prefix}SCOPE must include 'openid' for an OpenID Connect provider")

    client_id = (raw.client_id or "").strip()
    # Unset and empty are the same (compose passes `${VAR:-}`): no secret, a public client.
    client_secret = raw.client_secret or None
    required: list[tuple[str, str | None]] = [("CLIENT_ID", client_id)]
    if kind == GITHUB:
        required.append(("CLIENT_SECRET", client_secret))
    missing = [f"{prefix}{variable}" for variable, value in required if not value]
    if missing:
        return SkippedProvider(name, f"{' and '.join(missing)} not set")
    if kind == OIDC:
        if not issuer:
            raise SettingsError(f"{prefix}ISSUER is required for an OpenID Connect provider")
        return OAuthProviderSettings(
            name=name,
            kind=OIDC,
            client_id=client_id,
            client_secret=client_secret,
            scope=scope,
            timeout=raw.timeout,
            issuer=issuer,
        )
    return OAuthProviderSettings(
        name=name,
        kind=GITHUB,
        client_id=client_id,
        client_secret=client_secret,
        scope=scope,
        timeout=raw.timeout,
        **urls,
    )


def read_oauth_providers(environ: Mapping[str, str]) -> OAuthProvidersConfig:
    """Usable providers in listed order and skipped ones with a reason; SettingsError when malformed."""
    providers: list[OAuthProviderSettings] = []
    skipped: list[SkippedProvider] = []
    for name in _names(environ):
        outcome = _provider(name, environ)
        if isinstance(outcome, SkippedProvider):
            skipped.append(outcome)
        else:
            providers.append(outcome)
    return OAuthProvidersConfig(tuple(providers), tuple(skipped))


def log_skipped(config: OAuthProvidersConfig) -> None:
    """One warning per listed provider that is not offered (call it once logging is set up)."""
    for skipped in config.skipped:
        log.warning("sign-in provider %s is not offered: %s", skipped.name, skipped.reason)


def log_public_clients(config: OAuthProvidersConfig) -> None:
    """One line per provider configured without a client secret: a forgotten secret shows here."""
    for provider in config.providers:
        if provider.client_secret is None:
            log.info(
                "sign-in provider %s has no %sCLIENT_SECRET: it signs in as a public client (PKCE,"
                " token endpoint authentication method none), which the provider must offer",
                provider.name,
                provider_prefix(provider.name),
            )


def load_oauth_providers(environ: Mapping[str, str]) -> tuple[OAuthProviderSettings, ...]:
    """The usable providers (skipped ones and public clients logged). SettingsError when malformed."""
    config = read_oauth_providers(environ)
    log_skipped(config)
    log_public_clients(config)
    return config.providers
