"""The auth service's OpenAPI document, Swagger UI, ReDoc, and /healthz, /readyz, /metrics."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.auth.app import create_app as create_auth_app
from tests.helpers import signup

PREFIX = "/api/v1/auth"
PUBLIC_PATHS = [
    ("post", "/signup"),
    ("post", "/token"),
    ("post", "/revoke"),
    ("get", "/me"),
    ("get", "/.well-known/jwks.json"),
    ("get", "/.well-known/openid-configuration"),
]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PATH_ITEM_KEYS = HTTP_METHODS | {"$ref", "summary", "description", "servers", "parameters"}
OPERATION_KEYS = {
    "tags",
    "summary",
    "description",
    "externalDocs",
    "operationId",
    "parameters",
    "requestBody",
    "responses",
    "callbacks",
    "deprecated",
    "security",
    "servers",
}


@pytest.fixture
async def spec(auth_client) -> dict[str, Any]:
    response = await auth_client.get(f"{PREFIX}/openapi.json")
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return dict(await response.json())


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def walk_refs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(walk_refs(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(walk_refs(value))
    return found


# --- the OpenAPI document ------------------------------------------------------------------------


async def test_spec_is_openapi_3_0(spec):
    assert isinstance(spec["openapi"], str)
    assert spec["openapi"].startswith("3.0")
    assert "swagger" not in spec
    assert isinstance(spec["info"]["title"], str) and spec["info"]["title"]
    assert isinstance(spec["info"]["version"], str) and spec["info"]["version"]
    assert isinstance(spec["paths"], dict) and spec["paths"]


async def test_no_operation_carries_swagger2_keys(spec):
    ops = operations(spec)
    assert ops
    for path, method, operation in ops:
        assert "produces" not in operation, (path, method)
        assert "consumes" not in operation, (path, method)
        for parameter in operation.get("parameters", []):
            assert parameter.get("in") in {"query", "header", "path", "cookie"}, (path, method, parameter)


@pytest.mark.parametrize(("method", "path"), PUBLIC_PATHS)
async def test_every_public_path_is_documented(spec, method, path):
    assert PREFIX + path in spec["paths"], sorted(spec["paths"])
    operation = spec["paths"][PREFIX + path].get(method)
    assert isinstance(operation, dict), spec["paths"][PREFIX + path]
    assert operation.get("summary") or operation.get("description")
    assert operation["responses"]
    assert any(str(code).startswith("2") for code in operation["responses"])


async def test_spec_is_structurally_sane(spec):
    """What openapi-spec-validator would catch, checked by hand (it is not a dependency)."""
    for path, item in spec["paths"].items():
        assert path.startswith("/"), path
        assert set(item) <= PATH_ITEM_KEYS, (path, set(item) - PATH_ITEM_KEYS)
    schemes = spec.get("components", {}).get("securitySchemes", {})
    operation_ids: list[str] = []
    for path, method, operation in operations(spec):
        where = f"{method.upper()} {path}"
        assert set(operation) <= OPERATION_KEYS, (where, set(operation) - OPERATION_KEYS)
        if "operationId" in operation:
            operation_ids.append(operation["operationId"])
        responses = operation["responses"]
        assert isinstance(responses, dict) and responses, where
        for status, response in responses.items():
            assert re.fullmatch(r"[1-5](\d\d|XX)|default", str(status)), (where, status)
            assert isinstance(response.get("description"), str), (where, status)
            for media, content in response.get("content", {}).items():
                assert "/" in media, (where, media)
                assert "schema" in content, (where, status, media)
        body = operation.get("requestBody")
        if body is not None:
            assert isinstance(body.get("content"), dict) and body["content"], where
            for media, content in body["content"].items():
                assert "/" in media, (where, media)
                assert "schema" in content, (where, media)
        for parameter in operation.get("parameters", []):
            assert {"name", "in"} <= set(parameter), (where, parameter)
            if parameter["in"] == "path":
                assert parameter.get("required") is True, (where, parameter)
                assert "{" + parameter["name"] + "}" in path, (where, parameter)
        for requirement in operation.get("security", []):
            for name in requirement:
                assert name in schemes, (where, name)
    assert len(operation_ids) == len(set(operation_ids)), operation_ids
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        assert schema.get("type") == "object" or "$ref" in schema or "allOf" in schema, name
        for required in schema.get("required", []):
            assert required in schema.get("properties", {}), (name, required)


async def test_every_ref_resolves_in_every_app_the_process_builds(aiohttp_client, auth_settings, db):
    # Each app must document itself completely, whether or not another app was built before it
    # (tests, or a process that hosts more than one app).
    for _ in range(2):
        client = await aiohttp_client(create_auth_app(auth_settings))
        response = await client.get(f"{PREFIX}/openapi.json")
        spec = await response.json()
        refs = walk_refs(spec)
        assert "#/components/schemas/Problem" in refs
        for ref in refs:
            resolve(spec, ref)


async def test_oauth2_password_flow_lets_swagger_authorize(spec):
    schemes = spec["components"]["securitySchemes"]
    oauth2 = [s for s in schemes.values() if s.get("type") == "oauth2"]
    assert oauth2, schemes
    password_flows = [s["flows"]["password"] for s in oauth2 if "password" in s.get("flows", {})]
    assert password_flows, oauth2
    assert any(flow.get("tokenUrl") == f"{PREFIX}/token" for flow in password_flows), password_flows
    assert all(isinstance(flow.get("scopes"), dict) for flow in password_flows)
    me = spec["paths"][f"{PREFIX}/me"]["get"]
    oauth2_names = {name for name, s in schemes.items() if s.get("type") == "oauth2"}
    assert any(set(requirement) & oauth2_names for requirement in me.get("security", [])), me


async def test_error_responses_are_documented_as_problems(spec):
    signup_op = spec["paths"][f"{PREFIX}/signup"]["post"]
    for status in ("409", "422"):
        assert status in signup_op["responses"], sorted(signup_op["responses"])
        assert "application/problem+json" in signup_op["responses"][status]["content"]
    me = spec["paths"][f"{PREFIX}/me"]["get"]
    assert "401" in me["responses"]
    token = spec["paths"][f"{PREFIX}/token"]["post"]
    assert "400" in token["responses"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]


async def test_signup_request_body_is_documented_as_required_json(spec):
    body = spec["paths"][f"{PREFIX}/signup"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = resolve(spec, schema["$ref"])
    assert {"email", "password"} <= set(schema["required"])
    assert schema["properties"]["password"].get("minLength") == 8
    assert schema["properties"]["password"].get("maxLength") == 128
    # A signup without a body is refused (422), so the body is not optional.
    assert body.get("required") is True, body


# --- Swagger UI and ReDoc ------------------------------------------------------------------------


async def test_swagger_ui_page_and_its_assets(auth_client):
    response = await auth_client.get(f"{PREFIX}/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    html = await response.text()
    assert "swagger" in html.lower()
    assert f"{PREFIX}/openapi.json" in html
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', html)
    swagger_scripts = [s for s in scripts if s.startswith(f"{PREFIX}/static/swagger/")]
    assert swagger_scripts, scripts
    assert scripts == swagger_scripts, "every script is served locally, no CDN"
    for src in swagger_scripts:
        asset = await auth_client.get(src)
        assert asset.status == 200, src
        assert "javascript" in asset.content_type, (src, asset.content_type)
        assert len(await asset.read()) > 1000, src
    styles = re.findall(r'<link[^>]+href="([^"]+\.css)"', html)
    for href in styles:
        asset = await auth_client.get(href)
        assert asset.status == 200, href


async def test_redoc_page_and_its_script(auth_client):
    response = await auth_client.get(f"{PREFIX}/redoc")
    assert response.status == 200
    assert response.content_type == "text/html"
    html = await response.text()
    assert "redoc" in html.lower()
    assert f"{PREFIX}/openapi.json" in html
    script = await auth_client.get(f"{PREFIX}/static/redoc/redoc.standalone.js")
    assert script.status == 200
    assert "javascript" in script.content_type
    assert len(await script.read()) > 10000


async def test_static_paths_do_not_escape_their_folder(auth_client):
    for path in (
        f"{PREFIX}/static/swagger/../../../../etc/passwd",
        f"{PREFIX}/static/swagger/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"{PREFIX}/static/redoc/..%2f..%2f..%2fetc%2fpasswd",
    ):
        response = await auth_client.get(path)
        assert response.status in (400, 403, 404), (path, response.status)
        assert "root:" not in await response.text()


# --- health probes and metrics -------------------------------------------------------------------


async def test_healthz(auth_client):
    response = await auth_client.get("/healthz")
    assert response.status == 200
    assert response.headers.get("X-Request-ID")


async def test_readyz_with_everything_up(auth_client):
    response = await auth_client.get("/readyz")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_readyz_names_an_unreachable_redis(make_auth_client):
    # The service must start without Redis (login throttling falls back to memory) but not be ready.
    client = await make_auth_client(redis_url="redis://127.0.0.1:1/0")
    health = await client.get("/healthz")
    assert health.status == 200
    response = await client.get("/readyz")
    assert response.status == 503, await response.text()
    body = await response.json()
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"] != "ok"
    assert "redis" in await response.text()


async def test_metrics_count_requests_by_route_template(auth_client):
    await signup(auth_client, "metrics@example.com")
    await auth_client.get(f"{PREFIX}/no-such-thing-{'x' * 8}")
    response = await auth_client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert "# TYPE http_requests_total counter" in text
    line = re.search(
        r'^http_requests_total\{(?=[^}]*method="POST")(?=[^}]*route="/api/v1/auth/signup")'
        r'(?=[^}]*status="201")[^}]*\} (\d+(\.\d+)?)$',
        text,
        re.MULTILINE,
    )
    assert line, text
    assert float(line.group(1)) >= 1
    assert "http_request_duration_seconds_bucket" in text
    # Labels stay bounded: a raw unmatched path never becomes a label value.
    assert "no-such-thing" not in text


async def test_an_unusual_method_is_counted_as_other(auth_client):
    response = await auth_client.request("PROPFIND", f"{PREFIX}/me")
    assert response.status in (401, 405)
    text = await (await auth_client.get("/metrics")).text()
    assert "PROPFIND" not in text
    assert 'method="OTHER"' in text


async def test_swagger_ui_never_sends_the_spec_to_an_online_validator(auth_client):
    """Swagger UI asks validator.swagger.io about the spec from any host but localhost unless told not to."""
    page = await (await auth_client.get("/api/v1/auth/docs")).text()
    assert "validatorUrl: null" in page
    assert "/api/v1/auth/openapi.json" in page
