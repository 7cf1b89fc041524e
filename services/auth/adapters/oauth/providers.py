"""Sign-in providers: OpenID Connect (any issuer, via discovery) and GitHub (plain OAuth2).

Both speak the authorization-code flow with PKCE S256 over the service's one aiohttp session; every
call (`authorization_url`, `exchange`) runs under one deadline, the provider's `timeout`. At an
OpenID Connect token endpoint the client authenticates by the method `choose_client_auth` picks
from what discovery offers and whether a client secret is configured (none: a public client).
Outcomes are a `ProviderIdentity` or a `ProviderError` whose reason is short and holds no secrets,
codes or tokens: mapping it to an HTTP answer is the caller's business.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar
from urllib.parse import quote

import aiohttp

# authlib ships no type information; only its two protocol helpers are used here.
from authlib.common.urls import add_params_to_uri  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from services.auth.adapters.oauth.config import GITHUB, OIDC, OAuthProviderSettings
from services.auth.domain.errors import ProviderError
from services.auth.domain.models import ProviderIdentity
from services.auth.domain.ports import IdentityProvider

log = logging.getLogger(__name__)
T = TypeVar("T")

# Asymmetric algorithms only: never `none`, never an HMAC keyed with something public.
ID_TOKEN_ALGORITHMS = frozenset({"RS256", "ES256", "PS256"})
CLOCK_LEEWAY = 60  # seconds of clock difference tolerated on exp / iat / nbf
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


def _basic_auth(client_id: str, client_secret: str) -> str:
    # RFC 6749 2.3.1: both parts form-urlencoded (UTF-8, then percent-encoded; `:` `+` `%` included)
    # before they are joined and base64-encoded. A space goes as %20, not `+`: every form decoder
    # reads %20 as a space, while servers that percent-decode only (authlib's) would read `+` as `+`.
    raw = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def client_authentication(
    method: str, client_id: str, client_secret: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """(form fields, headers) that authenticate the client at the token endpoint by `method`.

    One method a request (RFC 6749 2.3): `client_secret_basic` sends the Authorization header only,
    `client_secret_post` client_id and client_secret in the form, `none` client_id in the form and
    never the secret.
    """
    if method == AUTH_NONE:
        return {"client_id": client_id}, {}
    if client_secret is None:
        raise ProviderError(f"client authentication: {method} needs a client secret")
    if method == AUTH_BASIC:
        return {}, {"Authorization": _basic_auth(client_id, client_secret)}
    if method == AUTH_POST:
        return {"client_id": client_id, "client_secret": client_secret}, {}
    raise ValueError(f"unsupported client authentication method {method!r}")


async def _token_request(
    session: aiohttp.ClientSession,
    url: str,
    form: Mapping[str, str],
    *,
    headers: Mapping[str, str] | None = None,
) -> Mapping[str, Any]:
    """POST to a token endpoint; the JSON answer, or ProviderError naming only the RFC 6749 error code."""
    request_headers = {"Accept": "application/json", **(headers or {})}
    async with session.post(url, data=dict(form), headers=request_headers, allow_redirects=False) as response:
        body = await _json(response)
        status = response.status
    error = _error_code(body)
    if error:
        # GitHub answers 200 with {"error": ...}; everyone else 400/401.
        raise ProviderError(f"token endpoint refused the code: {error}")
    if status != 200:
        raise ProviderError(f"token endpoint: HTTP {status}")
    if not isinstance(body, Mapping):
        raise ProviderError("token endpoint: not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ProviderError("token endpoint: no access_token")
    return body


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


SigningKey = RSAKey | ECKey


def parse_signing_keys(document: Any) -> tuple[dict[str, SigningKey], list[SigningKey]]:
    """(keys by kid, every key) of a JWKS: RSA and EC signing keys; others and broken ones are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ProviderError("JWKS: not a key set")
    by_kid: dict[str, SigningKey] = {}
    every: list[SigningKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC"):
            continue
        try:
            key: SigningKey = (
                RSAKey.import_key(dict(entry)) if kty == "RSA" else ECKey.import_key(dict(entry))
            )
        except (JoseError, ValueError, TypeError):
            continue
        every.append(key)
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid[kid] = key
    return by_kid, every


def _segment(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def _token_header(token: str) -> Mapping[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ProviderError("bad ID token: not a signed JWT")
    try:
        header = _segment(parts[0])
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ProviderError("bad ID token: malformed header") from None
    if not isinstance(header, dict):
        raise ProviderError("bad ID token: malformed header")
    return header


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_id_token_claims(
    claims: Mapping[str, Any], *, issuer: str, client_id: str, nonce: str, now: float, leeway: int
) -> None:
    """OIDC Core 3.1.3.7: iss, aud (and azp), exp, iat, nbf, nonce, sub; ProviderError naming the claim."""
    if claims.get("iss") != issuer:
        raise ProviderError("bad ID token: iss")
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or client_id not in audiences:
        raise ProviderError("bad ID token: aud")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise ProviderError("bad ID token: azp")
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not _is_number(exp) or exp <= now - leeway:
        raise ProviderError("bad ID token: exp")
    if not _is_number(iat) or iat > now + leeway:
        raise ProviderError("bad ID token: iat")
    if nbf is not None and (not _is_number(nbf) or nbf > now + leeway):
        raise ProviderError("bad ID token: nbf")
    sent = claims.get("nonce")
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), nonce.encode()):
        raise ProviderError("bad ID token: nonce")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= 255:
        raise ProviderError("bad ID token: sub")


class OIDCProvider:
    """An OpenID Connect provider found by discovery; ID tokens verified against its JWKS.

    The discovery document is fetched on first use and kept for `metadata_max_age` seconds (a failed
    fetch is not cached). The JWKS is kept until an ID token names a `kid` it lacks; then it is
    fetched again, at most once per `min_jwks_refresh` seconds.
    """

    def __init__(
        self,
        settings: OAuthProviderSettings,
        session: aiohttp.ClientSession,
        *,
        leeway: int = CLOCK_LEEWAY,
        metadata_max_age: float = 3600.0,
        min_jwks_refresh: float = 10.0,
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
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = float("-inf")
        self._keys: dict[str, SigningKey] = {}
        self._all_keys: list[SigningKey] = []
        self._keys_at = float("-inf")
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
        params = [
            ("response_type", "code"),
            ("client_id", self._settings.client_id),
            ("redirect_uri", redirect_uri),
            ("scope", self._settings.scope),
            ("state", state),
            ("code_challenge", code_challenge),
            ("code_challenge_method", "S256"),
            ("nonce", nonce),
        ]
        return str(add_params_to_uri(metadata.authorization_endpoint, params))

    async def exchange(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        return await self._bounded("sign-in", self._exchange(code, redirect_uri, code_verifier, nonce))

    async def _exchange(
        self, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> ProviderIdentity:
        metadata = await self._load_metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        fields, headers = client_authentication(
            metadata.client_auth, self._settings.client_id, self._settings.client_secret
        )
        form |= fields
        tokens = await _token_request(self._session, metadata.token_endpoint, form, headers=headers)
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
        header = _token_header(token)
        algorithm = header.get("alg")
        if algorithm not in metadata.algorithms:
            raise ProviderError("bad ID token: algorithm not allowed")
        key = await self._key_for(header.get("kid"), metadata)
        try:
            claims = jwt.decode(token, key, algorithms=[str(algorithm)]).claims
        except (JoseError, ValueError, TypeError):
            raise ProviderError("bad ID token: signature") from None
        check_id_token_claims(
            claims,
            issuer=metadata.issuer,
            client_id=self._settings.client_id,
            nonce=nonce,
            now=time.time(),
            leeway=self._leeway,
        )
        return claims

    async def _key_for(self, kid: Any, metadata: ProviderMetadata) -> SigningKey:
        if not (isinstance(kid, str) and kid in self._keys):
            never_fetched = self._keys_at == float("-inf")
            if never_fetched or time.monotonic() - self._keys_at >= self._min_jwks_refresh:
                document = await _get_json(self._session, metadata.jwks_uri, "JWKS")
                self._keys, self._all_keys = parse_signing_keys(document)
                self._keys_at = time.monotonic()
        if isinstance(kid, str) and kid:
            key = self._keys.get(kid)
            if key is None:
                raise ProviderError("bad ID token: unknown signing key")
            return key
        if len(self._all_keys) == 1:  # no kid: allowed only when there is no choice to make
            return self._all_keys[0]
        raise ProviderError("bad ID token: no kid and not exactly one signing key")

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
        params = [
            ("response_type", "code"),
            ("client_id", self._settings.client_id),
            ("redirect_uri", redirect_uri),
            ("scope", self._settings.scope),
            ("state", state),
            ("code_challenge", code_challenge),
            ("code_challenge_method", "S256"),
        ]
        return str(add_params_to_uri(self._authorize_url, params))

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
        form = {
            "grant_type": "authorization_code",
            "client_id": self._settings.client_id,
            "client_secret": self._client_secret,
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        tokens = await _token_request(self._session, self._token_url, form)
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
