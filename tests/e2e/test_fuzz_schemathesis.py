"""Property-based fuzzing of both APIs from their own OpenAPI documents, through the gateway.

Schemathesis loads `{gateway}/api/v1/auth/openapi.json` and `{gateway}/api/v1/referral/openapi.json`
from the running e2e stack (lazily, through a fixture), generates requests for every documented
operation, valid and invalid ones (examples, coverage and fuzzing phases), and checks every answer:

- `not_a_server_error`: no input, however malformed, yields a 5xx (API.md);
- `status_code_conformance`: every status answered is documented for that operation;
- `content_type_conformance`: and so is the content type of every answer;
- `response_schema_conformance`: and the body conforms to the documented schema (formats too);
- `negative_data_rejection`: a request the document says is invalid is refused with a 4xx. Besides
  schemathesis' defaults, 413 and 414 count as refusals: a body or URL too large to take is one.

`positive_data_acceptance` is not run: the document cannot be sound and make it pass. Rules no
JSON Schema can state refuse schema-valid input with 422 by design: `expires_at` must lie between
one minute and 365 days from now, a `cursor` must be one the service issued, and so on.

Secured operations get a valid access token of a user signed up through the gateway, taken anew
(refresh-token grant) every 10 minutes, well within its 15. The main gateway's rate limits are
generous and every throttled operation documents its 429, so throttling cannot fail a run; the
login throttle (50 failed logins per address in 5 minutes) sees only a handful from here.

Bounded and reproducible: a fixed number of examples per operation, a fixed seed, no example
database, a timeout per request, a deadline per example and per test. `FUZZ_EXAMPLES` and
`FUZZ_SEED` override the first two for a deeper local run (`FUZZ_EXAMPLES=300 FUZZ_SEED=7 ...`).
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import Stack

AUTH_SPEC = "/api/v1/auth/openapi.json"
REFERRAL_SPEC = "/api/v1/referral/openapi.json"
SIGNUP = "/api/v1/auth/signup"
TOKEN = "/api/v1/auth/token"
PASSWORD = "correct horse battery"
REQUEST_TIMEOUT = 5  # seconds; the services answer in milliseconds
TOKEN_REFRESH = 600  # seconds; access tokens live 900
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("FUZZ_SEED", "20260101"))

CONFIG = f"""
seed = {SEED}
request-timeout = {REQUEST_TIMEOUT}

[generation]
max-examples = {EXAMPLES}
database = "none"

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 414, 415, 422, 428, 429, "5xx"]

[phases.stateful]
enabled = false
"""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class _Tokens:
    """A user signed up through the gateway: its access token, renewed with the refresh-token grant."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_url = gateway_url
        self.refresh_token: str | None = None
        self.lock = threading.Lock()

    def access_token(self) -> str:
        with self.lock:
            if self.refresh_token is not None:
                answer = requests.post(
                    self.gateway_url + TOKEN,
                    data={"grant_type": "refresh_token", "refresh_token": self.refresh_token},
                    timeout=REQUEST_TIMEOUT,
                )
                if answer.status_code == 200:
                    return self._keep(answer.json())
            answer = requests.post(
                self.gateway_url + SIGNUP,
                json={"email": _new_email(), "password": PASSWORD},
                timeout=REQUEST_TIMEOUT,
            )
            assert answer.status_code == 201, answer.text
            return self._keep(answer.json())

    def _keep(self, body: dict[str, Any]) -> str:
        self.refresh_token = str(body["refresh_token"])
        return str(body["access_token"])


def _secured(context: Any) -> bool:
    """Whether the operation declares a security requirement (the document's word, nothing else)."""
    return bool(context.operation.definition.raw.get("security"))


def _load(stack: Stack, spec_path: str) -> Any:
    """One service's document as the gateway serves it, with a bearer token for secured operations."""
    schema = schemathesis.openapi.from_url(
        stack.gateway_url + spec_path, config=SchemathesisConfig.from_str(CONFIG), timeout=REQUEST_TIMEOUT
    )
    schema.config.update(base_url=stack.gateway_url)  # the paths in the documents are the public ones
    tokens = _Tokens(stack.gateway_url)

    class Bearer:
        def get(self, case: Case, context: Any) -> str:
            return tokens.access_token()

        def set(self, case: Case, data: str, context: Any) -> None:
            headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            case.headers = {**headers, "Authorization": f"Bearer {data}"}

    # Only where the document asks for a token: the cached token is the same for every operation,
    # and a public operation's (absent) one must never be what gets cached.
    schema.auth(refresh_interval=TOKEN_REFRESH).apply_to(_secured)(Bearer)
    return schema


@pytest.fixture
def auth_api(stack: Stack) -> Any:
    return _load(stack, AUTH_SPEC)


@pytest.fixture
def referral_api(stack: Stack) -> Any:
    return _load(stack, REFERRAL_SPEC)


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32's lazy loader renames the running node through `node._nodeid`, an attribute
    pytest 9.2 no longer has (node ids are structured now): give it a plain one to rename. What pytest
    reports is unchanged; each operation still gets its own subtest report, labelled with it."""
    request.node._nodeid = request.node.nodeid


auth_schema = schemathesis.pytest.from_fixture("auth_api")
referral_schema = schemathesis.pytest.from_fixture("referral_api")


# A deadline per example (a request, and a token now and then) and per test (every operation). No
# example database here either: under Hypothesis' CI profile these settings would otherwise bring
# the default one back.
DEADLINE = settings(deadline=timedelta(seconds=2 * REQUEST_TIMEOUT), database=None)


@pytest.mark.timeout(90)
@DEADLINE
@auth_schema.parametrize()
def test_auth_api_conforms_to_its_openapi_document(case: Case) -> None:
    case.call_and_validate(checks=CHECKS)


@pytest.mark.timeout(90)
@DEADLINE
@referral_schema.parametrize()
def test_referral_api_conforms_to_its_openapi_document(case: Case) -> None:
    case.call_and_validate(checks=CHECKS)


# --- what the fuzzing found, kept as fixed regressions ---------------------------------------------


def _new_email() -> str:
    return f"fuzz-{uuid.uuid4().hex[:12]}@example.com"


# (what, method, path, requests' keyword arguments, status, the problem's `code` or OAuth `error`)
REGRESSIONS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # A referral code the referral service's router could not route (braces) or store (NUL) made
    # signup answer 503 referral_service_unavailable; no code looks like that: 404 code_not_found.
    ("signup, code with braces", "POST", SIGNUP, {"json": {"referral_code": "ab}cd"}}, 404, "code_not_found"),
    # No JSON string may hold U+0000 (PostgreSQL text cannot): 422 naming the field, before any call out.
    (
        "signup, code with NUL",
        "POST",
        SIGNUP,
        {"json": {"referral_code": "ab\x00cd"}},
        422,
        "validation_failed",
    ),
    # PostgreSQL text cannot hold U+0000: these two were 500s.
    (
        "activate, code with NUL",
        "POST",
        "/api/v1/referral/referrals",
        {"json": {"code": "a\x00b"}},
        422,
        "validation_failed",
    ),
    (
        "password grant, username with NUL",
        "POST",
        TOKEN,
        {"data": {"grant_type": "password", "username": "a\x00@example.com", "password": PASSWORD}},
        400,
        "invalid_grant",
    ),
    # Braces in a path segment: a bare 404 `not_found` before; the id is simply not a UUID.
    (
        "referrals of a braced id",
        "GET",
        "/api/v1/referral/referrers/{x}/referrals",
        {},
        422,
        "validation_failed",
    ),
    # A URL longer than the gateway takes: 414, documented now for every operation with parameters.
    (
        "overlong query",
        "GET",
        "/api/v1/auth/oauth/x/callback",
        {"params": {"code": "é" * 2048}},
        414,
        "uri_too_long",
    ),
]


@pytest.fixture(scope="module")
def fuzz_token(stack: Stack) -> str:
    return _Tokens(stack.gateway_url).access_token()


@pytest.mark.parametrize(
    ("method", "path", "request_kwargs", "status", "code"),
    [pytest.param(*r[1:], id=r[0]) for r in REGRESSIONS],
)
def test_inputs_the_fuzzing_found(
    stack: Stack,
    fuzz_token: str,
    method: str,
    path: str,
    request_kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    kwargs = dict(request_kwargs)
    if path == SIGNUP:
        kwargs["json"] = {"email": _new_email(), "password": PASSWORD, **kwargs["json"]}
    answer = requests.request(
        method,
        stack.gateway_url + path,
        headers={"Authorization": f"Bearer {fuzz_token}"},
        timeout=REQUEST_TIMEOUT,
        **kwargs,
    )
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert code in (body.get("code"), body.get("error")), body
