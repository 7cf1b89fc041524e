"""Idempotent writes through the real apps (API.md "Idempotent writes"): signup, code creation and
activation with an `Idempotency-Key`: executed once, replayed byte for byte, refused when reused."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import unused_port

from services.referral.appkeys import USE_CASES
from shared.db import DatabaseUnavailable
from shared.idempotency import fingerprint
from tests.helpers import assert_problem
from tests.referral.conftest import CODES, REFERRALS, System, auth_header, service_token

SIGNUP = "/api/v1/auth/signup"
KEY = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


@pytest.fixture(autouse=True)
def no_keys(db: Any) -> None:
    with db.cursor() as cursor:
        cursor.execute("TRUNCATE auth.idempotency_keys, referral.idempotency_keys")


def count(db: Any, sql: str, *params: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.fetchone()[0])


def code_body(code: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"expires_at": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
    if code is not None:
        body["code"] = code
    return body


def with_key(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, KEY: key}


async def answers(responses: list[Any]) -> list[tuple[int, bytes, dict[str, str]]]:
    return [(r.status, await r.read(), dict(r.headers)) for r in responses]


async def assert_once(calls: list[Any]) -> tuple[int, bytes]:
    """All at once: one executed; every other answer is that one replayed, or 409 in use."""
    got = await answers(await asyncio.gather(*calls))
    executed = [(status, body) for status, body, headers in got if REPLAYED not in headers and status != 409]
    assert len(executed) == 1, [(s, h.get(REPLAYED)) for s, _, h in got]
    first = executed[0]
    for status, body, headers in got:
        if REPLAYED in headers:
            assert headers[REPLAYED] == "true"
            assert (status, body) == first
        elif status == 409:
            assert json.loads(body)["code"] == "idempotency_key_in_use"
            assert headers["Retry-After"] == "1"
    return first


# --- executed once ---------------------------------------------------------------------------------


async def test_twenty_identical_code_creations_at_once_create_one_code(system: System, db):
    owner = await system.user("owner@example.com")
    body = code_body()  # a generated code: two executions would make two different ones
    calls = [
        system.referral.post(CODES, json=body, headers=with_key(owner.headers, "k-1")) for _ in range(20)
    ]
    status, _ = await assert_once(calls)
    assert status == 201
    assert count(db, "SELECT count(*) FROM referral.codes WHERE owner_id = %s", owner.id) == 1


async def test_twenty_identical_activations_at_once_make_one_link(system: System, db):
    owner = await system.user("owner@example.com")
    assert (await system.create_code(owner, "SHARE123")).status == 201
    joiner = await system.user("joiner@example.com")
    calls = [
        system.referral.post(REFERRALS, json={"code": "SHARE123"}, headers=with_key(joiner.headers, "k-1"))
        for _ in range(20)
    ]
    status, _ = await assert_once(calls)
    assert status == 201
    assert count(db, "SELECT count(*) FROM referral.referrals WHERE referral_id = %s", joiner.id) == 1


async def test_twenty_identical_signups_at_once_create_one_user(system: System, db):
    body = {"email": "once@example.com", "password": "correct horse"}
    calls = [system.auth.post(SIGNUP, json=body, headers={KEY: "signup-1"}) for _ in range(20)]
    status, _ = await assert_once(calls)
    assert status == 201
    assert count(db, "SELECT count(*) FROM auth.users WHERE email = 'once@example.com'") == 1


# --- replayed byte for byte, refused when reused -----------------------------------------------------


async def test_a_retried_code_creation_gets_the_first_answer_byte_for_byte(system: System, db):
    owner = await system.user("owner@example.com")
    body = code_body()
    first = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, "k-1"))
    assert first.status == 201 and REPLAYED not in first.headers
    again = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, "k-1"))
    assert again.status == 201
    assert again.headers[REPLAYED] == "true"
    assert await again.read() == await first.read()
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]  # each exchange its own
    assert count(db, "SELECT count(*) FROM referral.codes WHERE owner_id = %s", owner.id) == 1
    # Without the key, the same body is a new request: the one active code is there already.
    await assert_problem(await system.referral.post(CODES, json=body, headers=owner.headers), 409)


async def test_a_retried_signup_gets_the_same_tokens_and_keeps_no_store(system: System, db):
    body = {"email": "jane@example.com", "password": "correct horse"}
    first = await system.auth.post(SIGNUP, json=body, headers={KEY: "signup-1"})
    assert first.status == 201
    again = await system.auth.post(SIGNUP, json=body, headers={KEY: "signup-1"})
    assert again.status == 201 and again.headers[REPLAYED] == "true"
    assert await again.read() == await first.read()
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"]
    assert "no-store" in again.headers["Cache-Control"]
    assert count(db, "SELECT count(*) FROM auth.users") == 1


async def test_a_client_error_is_kept_and_replayed_too(system: System, db):
    joiner = await system.user("joiner@example.com")
    headers = with_key(joiner.headers, "k-1")
    first = await system.referral.post(REFERRALS, json={"code": "NOSUCH12"}, headers=headers)
    await assert_problem(first, 404, "code_not_found")
    # The code appears meanwhile; the retry still gets the first answer, and links nothing.
    owner = await system.user("owner@example.com")
    assert (await system.create_code(owner, "NOSUCH12")).status == 201
    again = await system.referral.post(REFERRALS, json={"code": "NOSUCH12"}, headers=headers)
    assert again.status == 404 and again.headers[REPLAYED] == "true"
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert await again.read() == await first.read()
    assert count(db, "SELECT count(*) FROM referral.referrals") == 0


async def test_a_kept_problem_is_replayed_with_its_headers(system: System, db):
    # A user token without an email: the handler refuses it (401 with a challenge), a client error.
    subject = "0b9a7c6e-4f4e-4d41-9d53-1f1c2b3a4d5e"
    token = service_token(
        system,
        system.signing_pem,
        audience=system.referral_settings.token_audience,
        scope=(),
        subject=subject,
    )
    headers, body = with_key(auth_header(token), "k-1"), code_body()
    first = await system.referral.post(CODES, json=body, headers=headers)
    await assert_problem(first, 401, "invalid_token")
    again = await system.referral.post(CODES, json=body, headers=headers)
    assert again.status == 401 and again.headers[REPLAYED] == "true"
    assert again.headers["WWW-Authenticate"] == first.headers["WWW-Authenticate"]
    assert count(db, "SELECT count(*) FROM referral.idempotency_keys WHERE scope = %s", subject) == 1


async def test_the_same_key_with_another_body_is_422_and_changes_nothing(system: System, db):
    owner = await system.user("owner@example.com")
    headers = with_key(owner.headers, "k-1")
    assert (await system.referral.post(CODES, json=code_body("FIRST123"), headers=headers)).status == 201
    response = await system.referral.post(CODES, json=code_body("OTHER123"), headers=headers)
    await assert_problem(response, 422, "idempotency_key_reused")
    assert REPLAYED not in response.headers
    # The same key on the other endpoint is another request too.
    response = await system.referral.post(REFERRALS, json={"code": "FIRST123"}, headers=headers)
    await assert_problem(response, 422, "idempotency_key_reused")
    assert count(db, "SELECT count(*) FROM referral.codes") == 1
    first = {"email": "a@example.com", "password": "correct horse"}
    assert (await system.auth.post(SIGNUP, json=first, headers={KEY: "s"})).status == 201
    other = {"email": "b@example.com", "password": "correct horse"}
    response = await system.auth.post(SIGNUP, json=other, headers={KEY: "s"})
    await assert_problem(response, 422, "idempotency_key_reused")
    assert count(db, "SELECT count(*) FROM auth.users WHERE email = 'b@example.com'") == 0


async def test_a_running_request_answers_409_in_use(system: System, db):
    owner = await system.user("owner@example.com")
    raw = json.dumps(code_body("RUNNING1")).encode()
    path_print = fingerprint("POST", CODES, raw)
    with db.cursor() as cursor:  # as a request of this user still running holds it
        cursor.execute(
            "INSERT INTO referral.idempotency_keys (scope, key, fingerprint, claim_id)"
            " VALUES (%s, 'k-1', %s, gen_random_uuid())",
            (owner.id, path_print),
        )
    headers = {**with_key(owner.headers, "k-1"), "Content-Type": "application/json"}
    response = await system.referral.post(CODES, data=raw, headers=headers)
    await assert_problem(response, 409, "idempotency_key_in_use")
    assert response.headers["Retry-After"] == "1"
    assert count(db, "SELECT count(*) FROM referral.codes") == 0
    # Abandoned (its process died): once the lease is over, the retry takes the key over and runs.
    with db.cursor() as cursor:
        cursor.execute("UPDATE referral.idempotency_keys SET locked_at = now() - interval '61 seconds'")
    response = await system.referral.post(CODES, data=raw, headers=headers)
    assert response.status == 201, await response.text()
    assert REPLAYED not in response.headers
    assert count(db, "SELECT count(*) FROM referral.codes") == 1


# --- scopes ----------------------------------------------------------------------------------------


async def test_keys_are_scoped_to_the_caller(system: System, db):
    alice = await system.user("alice@example.com")
    bob = await system.user("bob@example.com")
    body = code_body()
    first = await system.referral.post(CODES, json=body, headers=with_key(alice.headers, "shared"))
    second = await system.referral.post(CODES, json=body, headers=with_key(bob.headers, "shared"))
    assert (first.status, second.status) == (201, 201)
    assert REPLAYED not in first.headers and REPLAYED not in second.headers
    assert (await first.json())["code"] != (await second.json())["code"]
    assert count(db, "SELECT count(*) FROM referral.codes") == 2


# --- server errors are not kept --------------------------------------------------------------------


class FailingOnce:
    """The real unit of work, whose first transaction (a code's creation) finds the database unreachable."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failures = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def begin(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise DatabaseUnavailable("connection refused")
        return self.real.begin()


async def test_a_server_error_is_not_kept_so_the_retry_runs(system: System, db, monkeypatch):
    owner = await system.user("owner@example.com")
    use_cases = system.referral.app[USE_CASES]
    monkeypatch.setattr(use_cases, "uow", FailingOnce(use_cases.uow))
    body = code_body("RETRY123")
    first = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, "k-1"))
    await assert_problem(first, 503, "database_unavailable")
    assert count(db, "SELECT count(*) FROM referral.idempotency_keys") == 0
    again = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, "k-1"))
    assert again.status == 201, await again.text()
    assert REPLAYED not in again.headers
    assert (await again.json())["code"] == "RETRY123"


async def test_a_signup_the_referral_service_could_not_check_runs_again(system: System, make_auth_client, db):
    owner = await system.user("owner@example.com")
    assert (await system.create_code(owner, "INVITE12")).status == 201
    body = {"email": "new@example.com", "password": "correct horse", "referral_code": "INVITE12"}
    # An auth instance whose referral service is down (nothing listens there): 503, nothing kept.
    cut_off = await make_auth_client(referral_service_url=f"http://127.0.0.1:{unused_port()}")
    first = await cut_off.post(SIGNUP, json=body, headers={KEY: "signup-1"})
    await assert_problem(first, 503, "referral_service_unavailable")
    assert count(db, "SELECT count(*) FROM auth.idempotency_keys") == 0
    # The retry, on an instance that reaches it, runs.
    again = await system.auth.post(SIGNUP, json=body, headers={KEY: "signup-1"})
    assert again.status == 201, await again.text()
    assert REPLAYED not in again.headers
    assert (await again.json())["user"]["referrer_id"] == owner.id


# --- the key itself --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_a_malformed_key_is_422_and_runs_nothing(system: System, db, key):
    owner = await system.user("owner@example.com")
    response = await system.referral.post(CODES, json=code_body(), headers=with_key(owner.headers, key))
    problem = await assert_problem(response, 422, "validation_failed")
    assert KEY in problem["errors"]
    response = await system.auth.post(
        SIGNUP, json={"email": "k@example.com", "password": "correct horse"}, headers={KEY: key}
    )
    await assert_problem(response, 422, "validation_failed")
    assert count(db, "SELECT count(*) FROM referral.codes") == 0
    assert count(db, "SELECT count(*) FROM auth.users WHERE email = 'k@example.com'") == 0


async def test_the_longest_and_oddest_printable_keys_work(system: System):
    owner = await system.user("owner@example.com")
    for key in ["~" * 255, " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]:
        body = code_body()
        first = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, key))
        assert first.status in (201, 409)
        again = await system.referral.post(CODES, json=body, headers=with_key(owner.headers, key))
        assert again.headers[REPLAYED] == "true"
        assert await again.read() == await first.read()


# --- the spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "path"),
    [("auth", "/api/v1/auth/signup"), ("referral", CODES), ("referral", REFERRALS)],
)
async def test_the_spec_documents_the_key_the_replay_header_and_the_errors(system: System, service, path):
    client = system.auth if service == "auth" else system.referral
    spec = await (await client.get(f"/api/v1/{service}/openapi.json")).json()
    operation = spec["paths"][path]["post"]
    [parameter] = [p for p in operation["parameters"] if p.get("name") == KEY]
    assert parameter["in"] == "header" and not parameter["required"]
    assert parameter["schema"]["maxLength"] == 255
    assert REPLAYED in operation["responses"]["201"]["headers"]
    assert "idempotency_key_in_use" in operation["responses"]["409"]["description"]
    assert "idempotency_key_reused" in operation["responses"]["422"]["description"]


@pytest.mark.parametrize(
    ("service", "keyed"),
    [("auth", {("/api/v1/auth/signup", "post")}), ("referral", {(CODES, "post"), (REFERRALS, "post")})],
)
async def test_only_the_three_writes_take_the_key(system: System, service, keyed):
    client = system.auth if service == "auth" else system.referral
    spec = await (await client.get(f"/api/v1/{service}/openapi.json")).json()
    taking = {
        (path, method)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and KEY in [p.get("name") for p in operation.get("parameters", [])]
    }
    assert taking == keyed
