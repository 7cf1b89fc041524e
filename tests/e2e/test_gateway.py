"""What the gateway itself guarantees: no /internal/, rate limits, the body limit, request ids.

Rate limits are tested on the second gateway process (`gateway-tight`, the same upstreams with tiny
limits), so flooding it throttles nobody else, whatever order the tests run in; the main gateway
runs with generous limits and is checked not to throttle a burst the tight one refuses.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time

import aiohttp
import pytest

from tests.e2e.api import CODES, SIGNUP, TOKEN, raw_request, unique_email
from tests.helpers import assert_problem

INTERNAL_TARGETS = [
    ("GET", "/internal/v1/codes/ABCDEFGH"),
    ("POST", "/internal/v1/referrals"),
    ("GET", "/internal"),
    ("GET", "/internal/"),
    ("GET", "/internal/v1/codes/ABCDEFGH?x=1"),
    ("GET", "//internal/v1/codes/ABCDEFGH"),
    ("GET", "/%69nternal/v1/codes/ABCDEFGH"),
    ("GET", "/internal%2Fv1%2Fcodes%2FABCDEFGH"),
    ("GET", "/api/v1/referral/../../internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/../../../internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/./../../../internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/auth/../referral/../../../internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/%2e%2e/%2e%2e/%2e%2e/internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/%2E%2E/%2E%2E/%2E%2E/internal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/..%2f..%2f..%2finternal/v1/codes/ABCDEFGH"),
    ("GET", "/api/v1/referral/%2e%2e%2f%2e%2e%2f%2e%2e%2finternal/v1/codes/ABCDEFGH"),
    ("POST", "/api/v1/referral/../../../internal/v1/referrals"),
    ("POST", "/api/v1/referral/%2e%2e/%2e%2e/%2e%2e/internal/v1/referrals"),
]
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


async def test_internal_paths_exist_on_the_service_itself(stack):
    # The control for the test below: directly on the referral service these paths answer 401
    # (they want a service token), so a 404 through the gateway means the gateway stopped them.
    for method, path in (("GET", "/internal/v1/codes/ABCDEFGH"), ("POST", "/internal/v1/referrals")):
        answer = await raw_request(stack.referral_urls[0], path, method, b"{}" if method == "POST" else b"")
        assert answer.status == 401, (path, answer)


@pytest.mark.parametrize(("method", "target"), INTERNAL_TARGETS, ids=[t for _, t in INTERNAL_TARGETS])
async def test_internal_is_not_reachable_through_the_gateway(stack, method, target):
    body = b'{"referral_id": "00000000-0000-0000-0000-000000000000"}' if method == "POST" else b""
    answer = await raw_request(stack.gateway_url, target, method, body)
    answer.problem(404)


async def test_unknown_paths_are_problem_json_404(gateway):
    for path in ("/", "/nope", "/api/v1/nope", "/api/v1/authx/me", "/api/v1/referralx/codes"):
        response = await gateway.get(path)
        await assert_problem(response, 404)


async def test_token_endpoint_is_rate_limited(tight_gateway):
    async def bad_login() -> aiohttp.ClientResponse:
        # Distinct accounts, so the auth service's own per-account lockout never answers.
        form = {"grant_type": "password", "username": unique_email("flood"), "password": "wrong password"}
        response = await tight_gateway.post(TOKEN, data=form)
        await response.read()
        return response

    limited, passed = await _flood(bad_login, 25)
    for response in passed:
        assert response.status == 400, await response.text()
        assert (await response.json())["error"] == "invalid_grant"
    await _assert_throttled(limited)


async def test_email_lookup_is_rate_limited(tight_gateway):
    async def look() -> aiohttp.ClientResponse:
        response = await tight_gateway.get(CODES, params={"email": unique_email("nobody")})
        await response.read()
        return response

    limited, passed = await _flood(look, 25)
    for response in passed:
        await assert_problem(response, 404, "code_not_found")
    await _assert_throttled(limited)


async def test_signup_is_rate_limited(tight_gateway):
    async def bad_signup() -> aiohttp.ClientResponse:
        response = await tight_gateway.post(
            SIGNUP, json={"email": unique_email("flood"), "password": "short"}
        )
        await response.read()
        return response

    limited, passed = await _flood(bad_signup, 25)
    for response in passed:
        await assert_problem(response, 422)
    await _assert_throttled(limited)


async def test_the_main_gateway_lets_a_burst_through(gateway):
    async def look() -> aiohttp.ClientResponse:
        response = await gateway.get(CODES, params={"email": unique_email("nobody")})
        await response.read()
        return response

    responses = await asyncio.gather(*(look() for _ in range(25)))
    assert [r.status for r in responses] == [404] * 25


async def _flood(send, count: int) -> tuple[list[aiohttp.ClientResponse], list[aiohttp.ClientResponse]]:
    """`count` requests at once; (the 429s, the others). Some must pass, some must be refused."""
    responses = await asyncio.gather(*(send() for _ in range(count)))
    limited = [r for r in responses if r.status == 429]
    passed = [r for r in responses if r.status != 429]
    assert passed, "every request was refused: the limit let not even the burst through"
    assert limited, f"{count} requests at once were never throttled: {[r.status for r in responses]}"
    return limited, passed


async def _assert_throttled(limited: list[aiohttp.ClientResponse]) -> None:
    for response in limited:
        await assert_problem(response, 429)
        retry_after = response.headers.get("Retry-After", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, dict(response.headers)


async def test_a_body_over_the_limit_is_refused_with_413(gateway, make_account):
    account = await make_account("big")
    big = json.dumps({"email": unique_email("big"), "password": "x" * (100 * 1024)})
    response = await gateway.post(SIGNUP, data=big, headers={"Content-Type": "application/json"})
    await assert_problem(response, 413)
    response = await gateway.post(
        CODES, data=big, headers={"Content-Type": "application/json", **account.headers}
    )
    await assert_problem(response, 413)
    # The control: a body just under 64 KiB passes the gateway (and is refused for what it says).
    under = json.dumps({"email": unique_email("big"), "password": "x" * (60 * 1024)})
    response = await gateway.post(SIGNUP, data=under, headers={"Content-Type": "application/json"})
    await assert_problem(response, 422)


async def test_request_ids_are_generated_and_kept(stack, gateway):
    targets = [
        ("GET", "/healthz"),
        ("GET", "/nope"),
        ("GET", f"{CODES}?email=nobody%40example.com"),
        ("GET", "/api/v1/auth/me"),
        ("POST", TOKEN),
    ]
    seen: set[str] = set()
    for method, path in targets:
        response = await gateway.request(method, path)
        await response.read()
        generated = response.headers.get("X-Request-ID", "")
        assert REQUEST_ID.fullmatch(generated), (path, dict(response.headers))
        assert generated not in seen, (path, generated)
        seen.add(generated)
    for method, path in targets:
        given = f"e2e-{secrets.token_hex(8)}"
        response = await gateway.request(method, path, headers={"X-Request-ID": given})
        await response.read()
        assert response.headers.getall("X-Request-ID", []) == [given], (path, dict(response.headers))

    # The id reaches the service too (its access log), given or generated by the gateway.
    given = f"e2e-{secrets.token_hex(8)}"
    response = await gateway.get("/api/v1/auth/me", headers={"X-Request-ID": given})
    assert response.status == 401
    generated_response = await gateway.get("/api/v1/auth/me")
    generated = generated_response.headers["X-Request-ID"]
    for request_id in (given, generated):
        await _until_logged(stack.auth, request_id)


async def _until_logged(processes, request_id: str) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        if any(request_id in p.log_path.read_text(errors="replace") for p in processes):
            return
        assert time.monotonic() < deadline, f"request id {request_id} never reached the auth service's logs"
        await asyncio.sleep(0.1)
