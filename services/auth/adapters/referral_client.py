"""The referral service's internal API, as the auth service calls it: reserve (and release) a use of a
code for a signup, record a link, say a user's address is proven, read a user's records for the export,
erase a user's data there.

Every call carries a service token the auth service signs for itself (`sub` auth-service, `aud` the
referral service, scope `referrals:internal`), cached and reissued well before it expires, and is
bounded by one timeout. Outcomes are plain values or the exceptions below; mapping them to HTTP
answers or retries is the callers' business.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from services.auth.adapters.signing import AccessTokenIssuer
from services.auth.domain.errors import ExhaustedCode, InactiveCode, ReferralServiceError, UnknownCode
from services.auth.domain.models import (
    ExportedCode,
    ExportedLink,
    ReferralCode,
    ReferralLink,
    ReferralRecords,
)

log = logging.getLogger(__name__)

SERVICE_SUBJECT = "auth-service"
INTERNAL_SCOPE = "referrals:internal"
SERVICE_TOKEN_TTL = 300
# Reissue the cached token when less than this is left, so a token never expires in flight.
SERVICE_TOKEN_RENEW_BEFORE = 60
_PERMANENT_LINK_STATUSES = frozenset({409, 422})


class LinkRefused(Exception):
    """The referral service refused the link for good (409 already_referred, 422): never retry it."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status = status
        self.code = code


class ServiceToken:
    """The auth service's own bearer token for the referral service, signed once per lifetime."""

    def __init__(
        self,
        issuer: AccessTokenIssuer,
        *,
        audience: str,
        ttl: int = SERVICE_TOKEN_TTL,
        renew_before: int = SERVICE_TOKEN_RENEW_BEFORE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl
        self._renew_before = min(renew_before, ttl // 2)
        self._clock = clock
        self._token = ""
        self._renew_at = float("-inf")

    def bearer(self) -> str:
        """The current token, reissued when it is close to its expiry."""
        now = self._clock()
        if now >= self._renew_at:
            issued = self._issuer.issue(
                SERVICE_SUBJECT,
                email=None,
                audience=self._audience,
                scope=(INTERNAL_SCOPE,),
                ttl=self._ttl,
            )
            self._token = issued.token
            self._renew_at = now + issued.expires_in - self._renew_before
        return self._token


async def _problem_code(response: aiohttp.ClientResponse) -> str:
    """The `code` of a problem+json answer, or "" when there is none."""
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError, UnicodeDecodeError):
        return ""
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) else ""


def _parse_code(body: Any) -> ReferralCode:
    if not isinstance(body, dict):
        raise ReferralServiceError("code reservation: the answer is not a JSON object")
    try:
        expires_at = datetime.fromisoformat(str(body["expires_at"]))
        owner_id = uuid.UUID(str(body["owner_id"]))
        return ReferralCode(code=str(body["code"]), owner_id=owner_id, expires_at=expires_at)
    except (KeyError, ValueError):
        raise ReferralServiceError("code reservation: code, owner_id or expires_at missing") from None


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("a time is not text")
    return datetime.fromisoformat(value)


def _optional_time(value: Any) -> datetime | None:
    return None if value is None else _time(value)


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not text")
    return value


def _parse_link(body: Any) -> ExportedLink:
    email = body["email"]
    return ExportedLink(
        referrer_id=uuid.UUID(_text(body["referrer_id"])),
        referral_id=uuid.UUID(_text(body["referral_id"])),
        email=None if email is None else _text(email),
        code=_text(body["code"]),
        status=_text(body["status"]),
        created_at=_time(body["created_at"]),
        confirmed_at=_optional_time(body["confirmed_at"]),
    )


def _parse_code_record(body: Any) -> ExportedCode:
    uses = _optional_int(body["uses"])
    return ExportedCode(
        code=_text(body["code"]),
        status=_text(body["status"]),
        created_at=_time(body["created_at"]),
        expires_at=_time(body["expires_at"]),
        deleted_at=_optional_time(body["deleted_at"]),
        max_uses=_optional_int(body["max_uses"]),
        uses=uses if uses is not None else 0,
    )


def _parse_records(body: Any) -> ReferralRecords:
    """The export's JSON, checked field by field; ReferralServiceError for anything else."""
    try:
        referrer = body["referrer"]
        return ReferralRecords(
            codes=[_parse_code_record(code) for code in body["codes"]],
            referrer=None if referrer is None else _parse_link(referrer),
            referrals=[_parse_link(link) for link in body["referrals"]],
            email_verified_at=_optional_time(body["email_verified_at"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ReferralServiceError("user export: the answer is not the expected document") from None


class ReferralClient:
    """Calls to the referral service's `/internal/v1` endpoints over the service's one HTTP session."""

    def __init__(
        self, session: aiohttp.ClientSession, *, base_url: str, token: ServiceToken, timeout: float
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.bearer()}", "Accept": "application/json"}

    async def reserve_code(self, code: str, referral_id: uuid.UUID) -> ReferralCode:
        """Take a use of the active code for the user about to be created with `referral_id`; the
        code and its owner. UnknownCode, InactiveCode, ExhaustedCode, or ReferralServiceError."""
        if not code.strip(".") or "/" in code:
            raise UnknownCode()  # no code looks like this, and such a path would not reach the endpoint
        url = URL(f"{self._base}/internal/v1/codes/{quote(code, safe='')}/reservations", encoded=True)
        body = {"referral_id": str(referral_id)}
        try:
            async with asyncio.timeout(self._timeout):
                # One retry when a kept-alive connection turns out closed by the peer (a restart, an
                # idle timeout on its side): the reservation is idempotent by referral id, and the
                # deadline covers both.
                for attempt in (1, 2):
                    try:
                        async with self._session.post(url, json=body, headers=self._headers()) as response:
                            if response.status in (200, 201):
                                return _parse_code(await response.json(content_type=None))
                            problem = await _problem_code(response)
                            # 422: the referral service says no code can look like this one.
                            if (response.status == 404 and problem == "code_not_found") or (
                                response.status == 422 and problem == "validation_failed"
                            ):
                                raise UnknownCode()
                            if response.status == 410:
                                raise InactiveCode()
                            if response.status == 409 and problem == "code_exhausted":
                                raise ExhaustedCode()
                            status = f"HTTP {response.status} {problem}".strip()
                            raise ReferralServiceError(f"code reservation: {status}")
                    except aiohttp.ServerDisconnectedError:
                        if attempt == 2:
                            raise
                raise AssertionError("unreachable")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ReferralServiceError(f"code reservation: {type(error).__name__}") from None

    async def release_code(self, code: str, referral_id: uuid.UUID) -> None:
        """Give back the use reserved for `referral_id` (idempotent); ReferralServiceError."""
        url = URL(
            f"{self._base}/internal/v1/codes/{quote(code, safe='')}/reservations/{referral_id}", encoded=True
        )
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.delete(url, headers=self._headers()) as response,
            ):
                if response.status in (200, 204):
                    return
                problem = await _problem_code(response)
                raise ReferralServiceError(f"code release: HTTP {response.status} {problem}".strip())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ReferralServiceError(f"code release: {type(error).__name__}") from None

    async def record_referral(self, link: ReferralLink) -> bool:
        """Record the link (idempotent by referral id); True when recorded now, False when it was already.

        LinkRefused on 409/422; ReferralServiceError for everything worth retrying.
        """
        body = {
            "referral_id": str(link.referral_id),
            "referrer_id": str(link.referrer_id),
            "referral_email": link.referral_email,
            "code": link.code,
        }
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.post(
                    f"{self._base}/internal/v1/referrals", json=body, headers=self._headers()
                ) as response,
            ):
                if response.status in (200, 201):
                    return response.status == 201
                problem = await _problem_code(response)
                if response.status in _PERMANENT_LINK_STATUSES:
                    raise LinkRefused(response.status, problem)
                raise ReferralServiceError(f"HTTP {response.status} {problem}".strip())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ReferralServiceError(type(error).__name__) from None

    async def confirm_user(self, user_id: uuid.UUID) -> None:
        """Tell the referral service the user's address is proven (idempotent); ReferralServiceError
        for anything worth retrying."""
        url = f"{self._base}/internal/v1/users/{user_id}/verified"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.post(url, headers=self._headers()) as response,
            ):
                if response.status in (200, 204):
                    return
                problem = await _problem_code(response)
                raise ReferralServiceError(f"HTTP {response.status} {problem}".strip())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ReferralServiceError(type(error).__name__) from None

    async def export_user(self, user_id: uuid.UUID) -> ReferralRecords:
        """Everything the referral service holds about the user; ReferralServiceError when it cannot
        answer (unreachable, timeout, any status but 200, an unexpected document)."""
        url = f"{self._base}/internal/v1/users/{user_id}/export"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.get(url, headers=self._headers()) as response,
            ):
                if response.status != 200:
                    problem = await _problem_code(response)
                    raise ReferralServiceError(f"user export: HTTP {response.status} {problem}".strip())
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as error:
            raise ReferralServiceError(f"user export: {type(error).__name__}") from None
        return _parse_records(body)

    async def erase_user(self, user_id: uuid.UUID, replacement_id: uuid.UUID) -> None:
        """Have the referral service erase the user, re-keying their place in the referral trees to
        `replacement_id` (idempotent); ReferralServiceError for anything but 204."""
        url = URL(f"{self._base}/internal/v1/users/{user_id}", encoded=True).with_query(
            replacement_id=str(replacement_id)
        )
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._session.delete(url, headers=self._headers()) as response,
            ):
                if response.status == 204:
                    return
                problem = await _problem_code(response)
                raise ReferralServiceError(f"erasure: HTTP {response.status} {problem}".strip())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ReferralServiceError(f"erasure: {type(error).__name__}") from None
