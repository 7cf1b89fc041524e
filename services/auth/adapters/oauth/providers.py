"""Sign-in providers: OpenID Connect (any issuer, via discovery) and GitHub (plain OAuth2).

Both speak the authorization-code flow with PKCE S256 over the service's one aiohttp session; every
call (`authorization_url`, `exchange`) runs under one deadline, the provider's `timeout`. authlib
builds the protocol messages (authorization URL, PKCE challenge, token request, client
authentication) and validates the ID token's claims; aiohttp carries them; the ID token's signature
is checked by `shared.jose` against the provider's JWKS, like every JWT the system reads. At an
OpenID Connect token endpoint the client authenticates by the method `choose_client_auth` picks
from what discovery offers and whether a client secret is configured (none: a public client).
Outcomes are a `ProviderIdentity` or a `ProviderError` whose reason is short and holds no secrets,
codes or tokens: mapping it to an HTTP answer is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

# authlib ships no type information. Its OAuth 2.0 client helpers and its OpenID Connect claims
# (built on joserfc in 1.9) are used; never authlib.jose, which 1.9 deprecates.
from authlib.oauth2.auth import ClientAuth  # type: ignore[import-untyped]
from authlib.oauth2.client import DEFAULT_HEADERS  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from authlib.oidc.core.claims import CodeIDToken  # type: ignore[import-untyped]
from joserfc.errors import ClaimError

from services.auth.adapters.oauth.config import GITHUB, OIDC, OAuthProviderSettings
from services.auth.domain.errors import ProviderError
from services.auth.domain.models import ProviderIdentity
from services.auth.domain.ports import IdentityProvider
from shared.jose import Refusal, RemoteJWKS, TokenRefused, verify_signed

log = logging.getLogger(__name__)
T = TypeVar("T")

# Asymmetric algorithms only: never `none`, never an HMAC keyed with something public.
ID_TOKEN_ALGORITHMS = frozenset({"RS256", "ES256", "PS256"})
CLOCK_LEEWAY = 60  # seconds of clock difference tolerated on exp / iat / nbf
ID_TOKEN_MAX_LENGTH = 65536  # ID tokens come from the token endpoint and may carry many claims
MAX_SUBJECT_LENGTH = 255  # OIDC Core 2: sub is at most 255 ASCII characters
PKCE_VERIFIER_BYTES = 48  # 64 characters of base64url, within RFC 7636's 43..128
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")

# Token endpoint authentication methods (OpenID Connect Core 9, RFC 7591 2).
AUTH_BASIC = "client_secret_basic"
AUTH_POST = "client_secret_post"
AUTH_NONE = "none"  # no client authentication: client_id in the form, the code bound by PKCE
# OpenID Connect Discovery 1.0, section 3: an omitted token_endpoint_auth_methods_supported means this.
DEFAULT_CLIENT_AUTH_METHODS = (AUTH_BASIC,)
# With a client secret, in order of preference; `none` only when the provider offers neither.
_SECRET_METHODS = (AUTH_BASIC, AUTH_POST)
_SHOWN_METHODS = 6  # how many of the offered methods a refusal names


def new_pkce() -> tuple[str, str]:
    """A fresh PKCE pair (RFC 7636, S256): (code_verifier, code_challenge)."""
    verifier = secrets.token_urlsafe(PKCE_VERIFIER_BYTES)
    return verifier, str(create_s256_code_challenge(verifier))


def create_provider(settings: OAuthProviderSettings, session: aiohttp.ClientSession) -> IdentityProvider:
    """The provider for one configured entry (its kind decides the class)."""
    if settings.kind == OIDC:
        return OIDCProvider(settings, session)
    if settings.kind == GITHUB:
        return GitHubProvider(settings, session)
    raise ValueError(f"unknown provider kind {settings.kind!r}")


# --- HTTP helpers ---------------------------------------------------------------------------------


def _error_code(body: Any) -> str:
    """The RFC 6749 `error` of a token answer, only when it looks like one (never echo free text)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    return error if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except (ValueError, UnicodeDecodeError):
        return None


async def _get_json(
    session: aiohttp.ClientSession, url: str, what: str, *, headers: Mapping[str, str] | None = None
) -> Any:
    """GET a JSON document; ProviderError unless it answers 200 with JSON."""
    async with session.get(url, headers=headers, allow_redirects=False) as response:
        if response.status != 200:
            raise ProviderError(f"{what}: HTTP {response.status}")
        body = await _json(response)
    if body is None:
        raise ProviderError(f"{what}: not JSON")
    return body


def client_authentication(method: str, client_id: str, client_secret: str | None) -> Any:
    """authlib's ClientAuth that authenticates the client at the token endpoint by `method`.

    One method a request (RFC 6749 2.3): `client_secret_basic` sends the Authorization header only,
    `client_secret_post` client_id and client_secret in the form, `none` client_id in the form and
    never the secret.
    """
    if method == AUTH_NONE:
        return ClientAuth(client_id, None, AUTH_NONE)
    if client_secret is None:
        raise ProviderError(f"client authentication: {method} needs a client secret")
    if method == AUTH_BASIC:
        # RFC 6749 2.3.1: both parts form-urlencoded (UTF-8, then percent-encoded; `:` `+` `%`
        # included) before they are joined and base64-encoded; authlib's client_secret_basic joins
        # them as given, so it is handed them encoded. A space goes as %20, not `+`: every form
        # decoder reads %20 as a space, while servers that percent-decode only (authlib's) would
        # read `+` as `+`.
        return ClientAuth(quote(client_id, safe=""), quote(client_secret, safe=""), AUTH_BASIC)
    if method == AUTH_POST:
        return ClientAuth(client_id, client_secret, AUTH_POST)
    raise ValueError(f"unsupported client authentication method {method!r}")


def token_request_body(*, code: str, redirect_uri: str, code_verifier: str) -> str:
    """The form of an authorization-code token request with its PKCE verifier (RFC 6749 4.1.3)."""
    return str(
        prepare_token_request(
            "authorization_code", redirect_uri=redirect_uri, code=code, code_verifier=code_verifier
        )
    )


async def _token_request(
    session: aiohttp.ClientSession, url: str, body: str, client_auth: Any
) -> Mapping[str, Any]:
    """POST to a token endpoint; the JSON answer, or ProviderError naming only the RFC 6749 error code.

    The answer is read here rather than by authlib's client, which reads a requests-style response
    and carries the provider's free-text error_description: only an RFC 6749-shaped code is kept.
    """
    url, headers, body = client_auth.prepare("POST", url, dict(DEFAULT_HEADERS), body)
    async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
        answer = await _json(response)
        status = response.status
    error = _error_code(answer)
    if error:
        # GitHub answers 200 with {"error": ...}; everyone else 400/401.
        raise ProviderError(f"token endpoint refused the code: {error}")
    if status != 200:
        raise ProviderError(f"token endpoint: HTTP {status}")
    if not isinstance(answer, Mapping):
        raise ProviderError("token endpoint: not a JSON object")
    access_token = answer.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ProviderError("token endpoint: no access_token")
    return answer


def _email(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    email = value.strip()
    return email if 3 <= len(email) <= 254 and "@" in email[1:-1] else None


def _verified(value: Any) -> bool:
    # Some providers send the string "true" (AWS Cognito); anything but true is unverified.
    return value is True or (isinstance(value, str) and value.lower() == "true")


# --- OpenID Connect -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What the OIDC discovery document says, checked."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    algorithms: tuple[str, ...]
    client_auth: str


def _endpoint(document: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = document.get(key)
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value
    if value is None and not required:
        return None
    raise ProviderError(f"discovery: bad or missing {key}")


def _required_endpoint(document: Mapping[str, Any], key: str) -> str:
    value = _endpoint(document, key)
    assert value is not None
    return value


def _offered(methods: Sequence[Any]) -> str:
    """The offered methods for a refusal's reason: only names that look like one (they are logged)."""
    names = [m for m in methods if isinstance(m, str) and _ERROR_CODE.fullmatch(m)]
    shown = ", ".join(names[:_SHOWN_METHODS]) + (", ..." if len(names) > _SHOWN_METHODS else "")
    return shown or "nothing usable"


def choose_client_auth(offered: Any, *, has_client_secret: bool) -> str:
    """The token endpoint authentication method, from discovery's token_endpoint_auth_methods_supported.

    Missing (or null) means `client_secret_basic` (OpenID Connect Discovery 1.0, section 3). With a
    client secret: `client_secret_basic`, else `client_secret_post`, else `none` (the provider takes
    only public clients, so the secret is not sent). Without one: `none` only. Methods this client
    does not speak (private_key_jwt, tls_client_auth, ...) are ignored. ProviderError when none fits.
    """
    methods = DEFAULT_CLIENT_AUTH_METHODS if offered is None else offered
    if not isinstance(methods, list | tuple):
        raise ProviderError("discovery: token_endpoint_auth_methods_supported is not a list")
    if has_client_secret:
        for method in _SECRET_METHODS:
            if method in methods:
                return method
    if AUTH_NONE in methods:
        return AUTH_NONE
    if not has_client_secret and any(method in methods for method in _SECRET_METHODS):
        raise ProviderError(
            "discovery: no client secret is configured and the provider does not accept public clients"
            f" (token endpoint authentication method none); it offers {_offered(methods)}"
        )
    raise ProviderError(
        "discovery: no supported client authentication method"
        f" (client_secret_basic, client_secret_post or none); the provider offers {_offered(methods)}"
    )


def parse_metadata(document: Any, issuer: str, *, has_client_secret: bool) -> ProviderMetadata:
    """Check a discovery document against the configured issuer; ProviderError when it cannot be used.

    `has_client_secret` says whether a client secret is configured: it decides the client
    authentication method (`choose_client_auth`).
    """
    if not isinstance(document, Mapping):
        raise ProviderError("discovery: not a JSON object")
    if document.get("issuer") != issuer:
        raise ProviderError("discovery: issuer does not match the configured issuer")
    offered = document.get("id_token_signing_alg_values_supported", ["RS256"])
    algorithms = tuple(
        sorted(a for a in offered if a in ID_TOKEN_ALGORITHMS) if isinstance(offered, list) else ()
    )
    if not algorithms:
        raise ProviderError("discovery: no supported ID token signing algorithm")
    client_auth = choose_client_auth(
        document.get("token_endpoint_auth_methods_supported"), has_client_secret=has_client_secret
    )
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=_required_endpoint(document, "authorization_endpoint"),
        token_endpoint=_required_endpoint(document, "token_endpoint"),
        jwks_uri=_required_endpoint(document, "jwks_uri"),
        userinfo_endpoint=_endpoint(document, "userinfo_endpoint", required=False),
        algorithms=algorithms,
        client_auth=client_auth,
    )


# How `shared.jose.verify_signed`'s refusals read in a sign-in failure.
_ID_TOKEN_REFUSALS = {
    Refusal.NOT_COMPACT: "not a signed JWT",
    Refusal.MALFORMED: "malformed header",
    Refusal.ALGORITHM: "algorithm not allowed",
    Refusal.TYPE: "typ",
    Refusal.NO_KID: "no kid and not exactly one signing key",
    Refusal.UNKNOWN_KEY: "unknown signing key",
    Refusal.SIGNATURE: "signature",
}


def check_id_token_claims(
    claims: Mapping[str, Any],
    header: Mapping[str, Any],
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    leeway: int,
) -> None:
    """OIDC Core 3.1.3.7 (authlib's CodeIDToken on joserfc's claims registry): iss, aud and azp,
    exp, iat and nbf with `leeway`, nonce, sub; ProviderError naming the claim."""
    options = {
        "iss": {"essential": True, "value": issuer},
        "aud": {"essential": True, "value": client_id},
        "azp": {"value": client_id},  # authlib lets an empty azp pass; refused here
        "sub": {"essential": True, "validate": lambda _claims, sub: len(sub) <= MAX_SUBJECT_LENGTH},
    }
    params = {"nonce": nonce, "client_id": client_id}
    try:
        CodeIDToken(dict(claims), dict(header), options, params).validate(leeway=leeway)
    except ClaimError as error:
        raise ProviderError(f"bad ID token: {error.claim}") from None


class OIDCProvider:
    """An OpenID Connect provider found by discovery; ID tokens verified against its JWKS.

    The discovery document is fetched on first use and kept for `metadata_max_age` seconds (a failed
    fetch is not cached). The JWKS is a `shared.jose.RemoteJWKS`: fetched on first use, again when
    an ID token names a `kid` it lacks (at most once per `min_jwks_refresh` seconds) or when older
    than `jwks_max_age`; a failed fetch keeps the keys already known.
    """

    def __init__(
        self,
        settings: OAuthProviderSettings,
        session: aiohttp.ClientSession,
        *,
        leeway: int = CLOCK_LEEWAY,
        metadata_max_age: float = 3600.0,
        min_jwks_refresh: float = 10.0,
        jwks_max_age: float = 300.0,
    ) -> None:
        if settings.kind != OIDC or not settings.issuer:
            raise ValueError("OIDCProvider needs an oidc provider with an issuer")
        self._settings = settings
        self._issuer = settings.issuer
        self._session = session
        self._timeout = settings.timeout
        self._leeway = leeway
        self._metadata_max_age = metadata_max_age
        self._min_jwks_refresh = min_jwks_refresh
        self._jwks_max_age = jwks_max_age
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = float("-inf")
        self._jwks: RemoteJWKS | None = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def discovery_url(self) -> str:
        return self._issuer.rstrip("/") + "/.well-known/openid-configuration"

    async def _bounded(self, what: str, step: Awaitable[T]) -> T:
        """Run one public step under the deadline; network trouble becomes ProviderError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await step
        except TimeoutError:
            raise ProviderError(f"{what}: the provider did not answer in time") from None
        except aiohttp.ClientError as error:
            raise ProviderError(f"{what}: provider unreachable ({type(error).__name__})") from None

    async def metadata(self) -> ProviderMetadata:
        """The checked discovery document (fetched on first use, refreshed after `metadata_max_age`)."""
        return await self._bounded("discovery", self._load_metadata())

    async def _load_metadata(self) -> ProviderMetadata:
        if self._metadata is not None and time.monotonic() - self._metadata_at < self._metadata_max_age:
            return self._metadata
        async with self._lock:
            if self._metadata is None or time.monotonic() - self._metadata_at >= self._metadata_max_age:
                document = await _get_json(self._session, self.discovery_url, "discovery")
                has_secret = self._settings.client_secret is not None
                metadata = parse_metadata(document, self._issuer, has_client_secret=has_secret)
                if has_secret and metadata.client_auth == AUTH_NONE:
                    previous = self._metadata.client_auth if self._metadata is not None else None
                    if previous != AUTH_NONE:  # once, not at every refresh
                        log.warning(
                            "sign-in provider %s accepts only public clients (token endpoint"
                            " authentication method none): its configured client secret is not sent",
                            self.name,
                        )
                self._metadata = metadata
                self._metadata_at = time.monotonic()
            return self._metadata

    async def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, nonce: str
    ) -> str:
        metadata = await self.metadata()
        return str(
            prepare_grant_uri(
                metadata.authorization_endpoint,
                client_id=self._settings.client_id,
                response_type="code",
                redirect_uri=redirect_uri,
                scope=self._settings.scope,
                state=state,
                code_challenge=code_challenge,
                code_challenge_method="S256",
                nonce=nonce,
            )
        )

    async def exchange(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        return await self._bounded("sign-in", self._exchange(code, redirect_uri, code_verifier, nonce))

    async def _exchange(
        self, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        metadata = await self._load_metadata()
        body = token_request_body(code=code, redirect_uri=redirect_uri, code_verifier=code_verifier)
        client_auth = client_authentication(
            metadata.client_auth, self._settings.client_id, self._settings.client_secret
        )
        tokens = await _token_request(self._session, metadata.token_endpoint, body, client_auth)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise ProviderError("token endpoint: no id_token")
        claims = await self._verify_id_token(id_token, metadata, nonce)
        subject = str(claims["sub"])
        email, verified = _email(claims.get("email")), _verified(claims.get("email_verified"))
        if email is None:
            email, verified = await self._userinfo_email(metadata, str(tokens["access_token"]), subject)
        return ProviderIdentity(subject=subject, email=email, email_verified=verified)

    async def _verify_id_token(self, token: str, metadata: ProviderMetadata, nonce: str) -> Mapping[str, Any]:
        jwks = self._jwks_for(metadata)
        try:
            signed = await verify_signed(
                token,
                jwks,
                algorithms=metadata.algorithms,
                require_kid=False,  # allowed when the JWKS has one key: there is no choice to make
                max_length=ID_TOKEN_MAX_LENGTH,
            )
        except TokenRefused as refused:
            if refused.refusal in (Refusal.UNKNOWN_KEY, Refusal.NO_KID) and jwks.fetch_error is not None:
                raise ProviderError(f"JWKS: {jwks.fetch_error}") from None
            raise ProviderError(f"bad ID token: {_ID_TOKEN_REFUSALS[refused.refusal]}") from None
        check_id_token_claims(
            signed.claims,
            signed.header,
            issuer=metadata.issuer,
            client_id=self._settings.client_id,
            nonce=nonce,
            leeway=self._leeway,
        )
        return signed.claims

    def _jwks_for(self, metadata: ProviderMetadata) -> RemoteJWKS:
        if self._jwks is None or self._jwks.url != metadata.jwks_uri:
            self._jwks = RemoteJWKS(
                metadata.jwks_uri,
                self._session,
                timeout=self._timeout,
                max_age=self._jwks_max_age,
                min_refresh_interval=self._min_jwks_refresh,
            )
        return self._jwks

    async def _userinfo_email(
        self, metadata: ProviderMetadata, access_token: str, subject: str
    ) -> tuple[str, bool]:
        if metadata.userinfo_endpoint is None:
            raise ProviderError("the provider gave no email")
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        info = await _get_json(self._session, metadata.userinfo_endpoint, "userinfo", headers=headers)
        if not isinstance(info, Mapping) or info.get("sub") != subject:
            # OIDC Core 5.3.4: a userinfo answer for another subject must not be used.
            raise ProviderError("userinfo: subject does not match the ID token")
        email = _email(info.get("email"))
        if email is None:
            raise ProviderError("the provider gave no email")
        return email, _verified(info.get("email_verified"))


# --- GitHub ---------------------------------------------------------------------------------------

GITHUB_API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


def primary_verified_email(emails: Any) -> str | None:
    """The address GitHub marks both primary and verified, from `GET /user/emails`."""
    if not isinstance(emails, Sequence):
        return None
    for entry in emails:
        if isinstance(entry, Mapping) and entry.get("primary") is True and entry.get("verified") is True:
            return _email(entry.get("email"))
    return None


class GitHubProvider:
    """GitHub's OAuth2 (no OpenID Connect): the user from `GET /user`, the email from `/user/emails`."""

    def __init__(self, settings: OAuthProviderSettings, session: aiohttp.ClientSession) -> None:
        authorize_url, token_url, api_url = settings.authorize_url, settings.token_url, settings.api_url
        if settings.kind != GITHUB or not (authorize_url and token_url and api_url):
            raise ValueError("GitHubProvider needs a github provider with its URLs")
        if settings.client_secret is None:
            raise ValueError("GitHubProvider needs a client secret (GitHub OAuth apps always have one)")
        self._settings = settings
        self._client_secret = settings.client_secret
        self._authorize_url = authorize_url
        self._token_url = token_url
        self._api = api_url.rstrip("/")
        self._session = session
        self._timeout = settings.timeout

    @property
    def name(self) -> str:
        return self._settings.name

    async def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, nonce: str
    ) -> str:
        """GitHub has no nonce (no ID token): it is not sent."""
        return str(
            prepare_grant_uri(
                self._authorize_url,
                client_id=self._settings.client_id,
                response_type="code",
                redirect_uri=redirect_uri,
                scope=self._settings.scope,
                state=state,
                code_challenge=code_challenge,
                code_challenge_method="S256",
            )
        )

    async def exchange(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._exchange(code, redirect_uri, code_verifier)
        except TimeoutError:
            raise ProviderError("sign-in: GitHub did not answer in time") from None
        except aiohttp.ClientError as error:
            raise ProviderError(f"sign-in: GitHub unreachable ({type(error).__name__})") from None

    async def _exchange(self, code: str, redirect_uri: str, code_verifier: str) -> ProviderIdentity:
        body = token_request_body(code=code, redirect_uri=redirect_uri, code_verifier=code_verifier)
        # GitHub takes the secret in the form.
        client_auth = client_authentication(AUTH_POST, self._settings.client_id, self._client_secret)
        tokens = await _token_request(self._session, self._token_url, body, client_auth)
        headers = {**GITHUB_API_HEADERS, "Authorization": f"Bearer {tokens['access_token']}"}
        user = await _get_json(self._session, f"{self._api}/user", "GitHub user", headers=headers)
        user_id = user.get("id") if isinstance(user, Mapping) else None
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            raise ProviderError("GitHub user: no id")
        emails = await _get_json(self._session, f"{self._api}/user/emails", "GitHub emails", headers=headers)
        email = primary_verified_email(emails)
        if email is None:
            raise ProviderError("GitHub account has no verified primary email")
        return ProviderIdentity(subject=str(user_id), email=email, email_verified=True)
