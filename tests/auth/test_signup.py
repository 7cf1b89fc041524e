"""POST /api/v1/auth/signup against the contract in API.md: body shape, errors, malformed input."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

import pytest

from tests.helpers import assert_problem, password_login, signup

SIGNUP = "/api/v1/auth/signup"
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def user_count(db: Any) -> int:
    with db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM auth.users")
        return int(cursor.fetchone()[0])


def stored_emails(db: Any) -> list[str]:
    with db.cursor() as cursor:
        cursor.execute("SELECT email FROM auth.users ORDER BY created_at")
        return [row[0] for row in cursor.fetchall()]


# --- success -------------------------------------------------------------------------------------


async def test_signup_answers_201_with_the_documented_body(auth_client, db):
    response = await auth_client.post(SIGNUP, json={"email": "jane@example.com", "password": "correct horse"})
    assert response.status == 201, await response.text()
    assert response.content_type == "application/json"
    assert "no-store" in response.headers.get("Cache-Control", "")
    assert response.headers.get("X-Request-ID")
    body = await response.json()
    assert set(body) == {"user", "access_token", "refresh_token", "token_type", "expires_in"}
    assert set(body["user"]) == {"id", "email", "email_verified", "created_at", "referrer_id"}
    user = body["user"]
    assert uuid.UUID(user["id"])
    assert user["email"] == "jane@example.com"
    assert user["email_verified"] is False  # until the owner opens the mailed link
    assert user["referrer_id"] is None
    assert RFC3339.fullmatch(user["created_at"]), user["created_at"]
    created = datetime.fromisoformat(user["created_at"])
    assert created.tzinfo is not None and created.utcoffset() is not None
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert isinstance(body["access_token"], str) and body["access_token"].count(".") == 2
    assert isinstance(body["refresh_token"], str) and len(body["refresh_token"]) >= 32
    assert body["refresh_token"] != body["access_token"]
    with db.cursor() as cursor:
        cursor.execute("SELECT id::text, email, referrer_id FROM auth.users")
        rows = cursor.fetchall()
    assert rows == [(user["id"], "jane@example.com", None)]


async def test_signup_tokens_work(auth_client):
    body = await signup(auth_client, "tokens@example.com")
    me = await auth_client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status == 200, await me.text()
    assert (await me.json())["id"] == body["user"]["id"]
    refreshed = await auth_client.post(
        "/api/v1/auth/token", data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    )
    assert refreshed.status == 200, await refreshed.text()


async def test_email_is_stored_trimmed(auth_client, db):
    body = await signup(auth_client, "  \tPadded@Example.com \n")
    assert body["user"]["email"] == "Padded@Example.com"
    assert stored_emails(db) == ["Padded@Example.com"]


@pytest.mark.parametrize(
    "second",
    [
        "jane@example.com",
        "JANE@EXAMPLE.COM",
        "Jane@Example.Com",
        "  jane@example.com  ",
        " JANE@example.com\t",
    ],
)
async def test_existing_email_is_409_whatever_case_and_spaces(auth_client, db, second):
    await signup(auth_client, "Jane@example.com")
    response = await auth_client.post(SIGNUP, json={"email": second, "password": "another password"})
    await assert_problem(response, 409, "email_taken")
    assert user_count(db) == 1


async def test_email_of_254_characters_is_accepted(auth_client):
    email = "a" * (254 - len("@example.com")) + "@example.com"
    assert len(email) == 254
    body = await signup(auth_client, email)
    assert body["user"]["email"] == email


@pytest.mark.parametrize("length", [8, 128])
async def test_password_length_bounds_accepted(auth_client, length):
    password = "p" * length
    await signup(auth_client, f"len{length}@example.com", password)
    response = await password_login(auth_client, f"len{length}@example.com", password)
    assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    "password",
    [
        "\U0001f511\U0001f510\U0001f512\U0001f513\U0001f5dd\U0001f6aa\U0001f3e0\U0001f600",  # emoji
        "e\u0301a\u0300o\u0302u\u0308n\u0303",  # combining marks
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd \u0645\u0631\u062d\u0628\u0627",  # RTL
        "\u202eright-to-left override\u202c",
        "\u00e4\u00f6\u00fc\u00df \u4e2d\u6587\u5bc6\u7801",
    ],
    ids=["emoji", "combining", "rtl", "bidi-controls", "mixed"],
)
async def test_unicode_password_signs_up_and_logs_in(auth_client, password):
    assert 8 <= len(password) <= 128
    email = f"uni-{uuid.uuid4().hex[:8]}@example.com"
    await signup(auth_client, email, password)
    response = await password_login(auth_client, email, password)
    assert response.status == 200, await response.text()
    wrong = await password_login(auth_client, email, password[:-1] + "x")
    assert wrong.status == 400
    assert (await wrong.json())["error"] == "invalid_grant"


# --- referral codes need the referral service -------------------------------------------------------


async def test_referral_code_with_the_referral_service_unreachable_is_503_and_creates_nobody(
    make_auth_client, db
):
    client = await make_auth_client(referral_service_url="http://127.0.0.1:1")
    response = await client.post(
        SIGNUP, json={"email": "ref@example.com", "password": "correct horse", "referral_code": "ABCD1234"}
    )
    body = await assert_problem(response, 503, "referral_service_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert "ABCD1234" not in body["detail"]
    assert user_count(db) == 0
    # The email is still free, and a signup without a code does not need the referral service.
    await signup(client, "ref@example.com")


# --- malformed input -----------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        (b'{"email": "a@example.com", "password": ', JSON, 400, "malformed_json"),
        (b"{'email': 'a@example.com'}", JSON, 400, "malformed_json"),
        (b'{"email": "a@example.com", "password": "correct horse",}', JSON, 400, "malformed_json"),
        (b"[" * 10000, JSON, 400, None),
        (b"[" * 10000 + b"]" * 10000, JSON, 400, None),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON, 400, None),
        (b'{"email": "\xff\xfe@example.com", "password": "correct horse"}', JSON, 400, None),
        (b"\xc3\x28", JSON, 400, None),
        (
            b'{"email": "a@example.com", "password": "correct horse"}',
            {"Content-Type": "text/plain"},
            415,
            None,
        ),
        (
            b"email=a%40example.com&password=correct+horse",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            None,
        ),
        (
            b'{"email": "a@example.com", "password": "correct horse"}',
            {"Content-Type": "application/xml"},
            415,
            None,
        ),
        (b"[]", JSON, 422, None),
        (b'["a@example.com", "correct horse"]', JSON, 422, None),
        (b'"a@example.com"', JSON, 422, None),
        (b"42", JSON, 422, None),
        (b"null", JSON, 422, None),
        (b"true", JSON, 422, None),
        (b"{}", JSON, 422, None),
        (b"", JSON, 422, None),
        (b"   \n", JSON, 422, None),
    ],
    ids=[
        "truncated",
        "single-quotes",
        "trailing-comma",
        "deep-open-brackets",
        "deep-balanced-brackets",
        "deep-objects",
        "invalid-utf8-in-string",
        "invalid-utf8",
        "text-plain",
        "form",
        "xml",
        "empty-array",
        "array",
        "string",
        "number",
        "null",
        "bool",
        "empty-object",
        "empty-body",
        "whitespace-body",
    ],
)
async def test_malformed_bodies_get_their_4xx(auth_client, db, data, headers, status, code):
    response = await auth_client.post(SIGNUP, data=data, headers=headers)
    await assert_problem(response, status, code)
    assert user_count(db) == 0


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
async def test_non_standard_json_constants_are_malformed_json(auth_client, db, constant):
    # RFC 8259 has no NaN or Infinity: such a body is not well-formed JSON (400), wherever it appears.
    whole = await auth_client.post(SIGNUP, data=constant, headers=JSON)
    await assert_problem(whole, 400, "malformed_json")
    inside = await auth_client.post(
        SIGNUP,
        data=b'{"email": "n@example.com", "password": "correct horse", "x": ' + constant + b"}",
        headers=JSON,
    )
    await assert_problem(inside, 400, "malformed_json")
    assert user_count(db) == 0


async def test_body_over_the_limit_is_413_problem(auth_client, db):
    filler = "x" * (64 * 1024)
    response = await auth_client.post(
        SIGNUP, json={"email": "big@example.com", "password": "correct horse", "pad": filler}
    )
    await assert_problem(response, 413)
    assert user_count(db) == 0


async def test_body_just_under_the_limit_is_not_413(auth_client):
    # A large but acceptable body reaches validation (unknown field -> 422), not 413.
    filler = "x" * (60 * 1024)
    response = await auth_client.post(
        SIGNUP, json={"email": "big@example.com", "password": "correct horse", "pad": filler}
    )
    await assert_problem(response, 422)


async def test_unknown_field_is_named(auth_client, db):
    response = await auth_client.post(
        SIGNUP, json={"email": "u@example.com", "password": "correct horse", "is_admin": True}
    )
    body = await assert_problem(response, 422)
    assert "is_admin" in body["errors"], body
    assert user_count(db) == 0


async def test_missing_fields_are_named(auth_client, db):
    for payload, missing in [
        ({"password": "correct horse"}, {"email"}),
        ({"email": "m@example.com"}, {"password"}),
        ({}, {"email", "password"}),
        ({"referral_code": "ABCD1234"}, {"email", "password"}),
    ]:
        response = await auth_client.post(SIGNUP, json=payload)
        body = await assert_problem(response, 422)
        assert missing <= set(body["errors"]), (payload, body)
    assert user_count(db) == 0


WRONG_TYPES = [42, 4.5, None, True, ["a@example.com"], {"value": "a@example.com"}]


@pytest.mark.parametrize("field", ["email", "password"])
async def test_wrong_types_are_422(auth_client, db, field):
    for value in WRONG_TYPES:
        payload: dict[str, Any] = {"email": "t@example.com", "password": "correct horse"}
        payload[field] = value
        response = await auth_client.post(SIGNUP, json=payload)
        body = await assert_problem(response, 422)
        assert field in body["errors"], (value, body)
    assert user_count(db) == 0


@pytest.mark.parametrize(
    "email",
    [
        "no-at-sign.example.com",
        "",
        "   ",
        "@example.com",
        "jane@",
        "jane@@example.com",
        "a" * (255 - len("@example.com")) + "@example.com",
        "a" * 300 + "@example.com",
        "ja ne@example.com",
        "jane@exa mple.com",
        "jane\x01@example.com",
        "ja\x07ne@example.com",
        "jane@exam\x1bple.com",
        "ja\x00ne@example.com",
        "jane@example.com\x00",
        "jane\u200b@example.com\u0000x",
    ],
    ids=[
        "no-at",
        "empty",
        "blank",
        "no-local",
        "no-domain",
        "two-ats",
        "255-chars",
        "very-long",
        "space-in-local",
        "space-in-domain",
        "control-soh",
        "control-bel",
        "control-esc-in-domain",
        "nul-inside",
        "nul-at-end",
        "nul-after-domain",
    ],
)
async def test_bad_emails_are_422(auth_client, db, email):
    response = await auth_client.post(SIGNUP, json={"email": email, "password": "correct horse"})
    body = await assert_problem(response, 422)
    assert "email" in body["errors"], body
    assert user_count(db) == 0


@pytest.mark.parametrize("password", ["p" * 7, "", "\U0001f511" * 7, "p" * 129, "p" * 1000])
async def test_password_out_of_range_is_422(auth_client, db, password):
    response = await auth_client.post(SIGNUP, json={"email": "pw@example.com", "password": password})
    body = await assert_problem(response, 422)
    assert "password" in body["errors"], body
    assert user_count(db) == 0


@pytest.mark.parametrize("value", [42, "", ["ABCD"], {"code": "ABCD"}, "x" * 65])
async def test_malformed_referral_code_is_422_and_creates_nobody(auth_client, db, value):
    response = await auth_client.post(
        SIGNUP, json={"email": "rc@example.com", "password": "correct horse", "referral_code": value}
    )
    await assert_problem(response, 422)
    assert user_count(db) == 0


# --- request ids, unknown paths, wrong methods ---------------------------------------------------


async def test_every_response_carries_a_request_id(auth_client):
    responses = [
        await auth_client.post(SIGNUP, json={"email": "rid@example.com", "password": "correct horse"}),
        await auth_client.post(SIGNUP, json={"email": "rid@example.com", "password": "correct horse"}),
        await auth_client.post(SIGNUP, data=b"{", headers=JSON),
        await auth_client.post(SIGNUP, data=b"x", headers={"Content-Type": "text/plain"}),
        await auth_client.get("/api/v1/auth/nope"),
        await auth_client.get(SIGNUP),
        await auth_client.get("/healthz"),
    ]
    ids = [r.headers.get("X-Request-ID") for r in responses]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


SANE_IDS = ["abc-123", "req.42:part_7", "A" * 128, str(uuid.uuid4())]
INSANE_IDS = [
    "A" * 129,
    "has space",
    "semi;colon",
    'quote"d',
    "new\\line",
    "<script>",
    "x" * 5000,
    "\u00e9t\u00e9",
]


async def test_a_sane_request_id_is_echoed(auth_client):
    for incoming in SANE_IDS:
        ok = await auth_client.post(
            SIGNUP,
            json={"email": f"{uuid.uuid4().hex[:8]}@example.com", "password": "correct horse"},
            headers={"X-Request-ID": incoming},
        )
        assert ok.status == 201
        assert ok.headers["X-Request-ID"] == incoming
        failed = await auth_client.post(SIGNUP, data=b"{", headers={**JSON, "X-Request-ID": incoming})
        assert failed.status == 400
        assert failed.headers["X-Request-ID"] == incoming
        missing = await auth_client.get("/api/v1/auth/nope", headers={"X-Request-ID": incoming})
        assert missing.status == 404
        assert missing.headers["X-Request-ID"] == incoming


async def test_an_insane_request_id_is_replaced(auth_client):
    for incoming in INSANE_IDS:
        headers = {"X-Request-ID": incoming.encode("utf-8").decode("latin-1")}
        response = await auth_client.get("/healthz", headers=headers)
        assert response.status == 200
        echoed = response.headers.get("X-Request-ID")
        assert echoed, incoming
        assert echoed != headers["X-Request-ID"]
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", echoed), echoed
        failed = await auth_client.post(SIGNUP, data=b"{", headers={**JSON, **headers})
        assert failed.status == 400
        assert failed.headers.get("X-Request-ID") not in (None, "", headers["X-Request-ID"]), incoming


async def test_unknown_path_is_404_problem(auth_client):
    response = await auth_client.get("/api/v1/auth/does-not-exist")
    await assert_problem(response, 404)
    response = await auth_client.post("/api/v1/auth/signup/extra", json={})
    await assert_problem(response, 404)


async def test_wrong_method_is_405_problem_with_allow(auth_client):
    for method in ["GET", "PUT", "DELETE", "PATCH"]:
        response = await auth_client.request(method, SIGNUP)
        await assert_problem(response, 405)
        allow = {m.strip().upper() for m in response.headers.get("Allow", "").split(",") if m.strip()}
        assert "POST" in allow, response.headers
        assert method not in allow
