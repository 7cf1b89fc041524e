"""The referral service's OpenAPI document, Swagger UI, ReDoc, /healthz and /metrics."""

from __future__ import annotations

import re
from typing import Any

import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "/api/v1/referral"
SPEC_URL = f"{PREFIX}/openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PROBLEM_REF = "#/components/schemas/Problem"

# (method, path, success statuses, error statuses the contract names)
OPERATIONS = [
    ("post", f"{PREFIX}/codes", {"201"}, {"400", "401", "403", "409", "415", "422"}),
    ("get", f"{PREFIX}/codes/me", {"200"}, {"401", "404"}),
    ("delete", f"{PREFIX}/codes/me", {"204"}, {"401", "404"}),
    ("get", f"{PREFIX}/codes", {"200"}, {"404", "422"}),
    ("post", f"{PREFIX}/referrals", {"201"}, {"400", "401", "404", "409", "410", "415", "422"}),
    ("get", f"{PREFIX}/referrers/{{referrer_id}}/referrals", {"200"}, {"401", "422"}),
]
PUBLIC = ("get", f"{PREFIX}/codes")
USER_SECURED = [(m, p) for m, p, _, _ in OPERATIONS if p.startswith(PREFIX) and (m, p) != PUBLIC]


@pytest.fixture
async def spec(system) -> dict[str, Any]:
    response = await system.referral.get(SPEC_URL)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return dict(await response.json())


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for escaped in ref[2:].split("/"):
        part = escaped.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def walk_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [
            ref
            for key, value in node.items()
            for ref in ([value] if key == "$ref" and isinstance(value, str) else walk_refs(value))
        ]
    if isinstance(node, list):
        return [ref for value in node for ref in walk_refs(value)]
    return []


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def schema_of(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return dict(resolve(spec, schema["$ref"])) if "$ref" in schema else schema


# --- the OpenAPI document ------------------------------------------------------------------------


async def test_spec_is_valid_openapi_3(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert "swagger" not in spec
    assert spec["info"]["title"] and spec["info"]["version"]


async def test_no_swagger2_keys_and_every_body_required(spec):
    ops = operations(spec)
    assert ops
    bodies = 0
    for path, method, operation in ops:
        assert "produces" not in operation, (path, method)
        assert "consumes" not in operation, (path, method)
        if "requestBody" in operation:
            bodies += 1
            assert operation["requestBody"].get("required") is True, (path, method)
            assert "application/json" in operation["requestBody"]["content"], (path, method)
    assert bodies >= 2  # create code, activate


@pytest.mark.parametrize(
    ("method", "path", "successes", "errors"), OPERATIONS, ids=[f"{m} {p}" for m, p, _, _ in OPERATIONS]
)
async def test_every_path_is_documented_with_its_error_responses(spec, method, path, successes, errors):
    assert path in spec["paths"], sorted(spec["paths"])
    operation = spec["paths"][path].get(method)
    assert isinstance(operation, dict), spec["paths"][path]
    assert operation.get("summary") or operation.get("description")
    responses = {str(status): response for status, response in operation["responses"].items()}
    assert successes <= set(responses), sorted(responses)
    assert errors <= set(responses), (sorted(errors - set(responses)), sorted(responses))
    for status in errors:
        content = responses[status].get("content", {})
        assert "application/problem+json" in content, (status, responses[status])
        schema = content["application/problem+json"]["schema"]
        assert schema.get("$ref") == PROBLEM_REF, schema


async def test_every_route_of_the_app_is_in_the_spec(spec):
    documented = {(method, path) for path, method, _ in operations(spec)}
    assert {(m, p) for m, p, _, _ in OPERATIONS} <= documented, documented


async def test_request_and_response_schemas(spec):
    create = spec["paths"][f"{PREFIX}/codes"]["post"]
    body = schema_of(spec, create["requestBody"]["content"]["application/json"]["schema"])
    assert set(body["properties"]) == {"expires_at", "code", "max_uses"}
    assert body.get("required") == ["expires_at"]
    max_uses = body["properties"]["max_uses"]
    assert (max_uses.get("minimum"), max_uses.get("maximum")) == (1, 1_000_000), max_uses
    assert body["properties"]["code"].get("pattern") == r"^[A-Za-z0-9_-]{4,32}$"
    created = schema_of(spec, create["responses"]["201"]["content"]["application/json"]["schema"])
    assert set(created["properties"]) == {"code", "expires_at", "created_at", "owner_id", "max_uses", "uses"}
    lookup = spec["paths"][f"{PREFIX}/codes"]["get"]
    email = [p for p in lookup.get("parameters", []) if p["name"] == "email"]
    assert email and email[0]["in"] == "query" and email[0].get("required") is True, lookup
    public = schema_of(spec, lookup["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(public["properties"]) == {"code", "expires_at"}
    listing = spec["paths"][f"{PREFIX}/referrers/{{referrer_id}}/referrals"]["get"]
    params = {(p["in"], p["name"]): p for p in listing["parameters"]}
    assert params[("path", "referrer_id")].get("required") is True
    assert {("query", "limit"), ("query", "cursor")} <= set(params)


async def test_link_statuses_and_counts_are_in_the_schemas(spec):
    activate = spec["paths"][f"{PREFIX}/referrals"]["post"]
    link = schema_of(spec, activate["responses"]["201"]["content"]["application/json"]["schema"])
    assert set(link["properties"]) == {"referrer_id", "referral_id", "created_at", "status"}
    assert set(link["required"]) == set(link["properties"])
    assert link["properties"]["status"]["enum"] == ["pending", "confirmed"]
    assert "email_verified" in activate["description"]
    listing = spec["paths"][f"{PREFIX}/referrers/{{referrer_id}}/referrals"]["get"]
    page = schema_of(spec, listing["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(page["properties"]) == {"referrer_id", "total", "confirmed", "items", "next_cursor"}
    assert set(page["required"]) == set(page["properties"])
    item = schema_of(spec, page["properties"]["items"]["items"])
    assert set(item["properties"]) == {"referral_id", "email", "joined_at", "status"}
    assert item["properties"]["status"]["enum"] == ["pending", "confirmed"]
    create = spec["paths"][f"{PREFIX}/codes"]["post"]
    assert "email_unverified" in create["description"]


async def test_every_ref_resolves_in_every_app_the_process_builds(make_system):
    for _ in range(2):
        system = await make_system()
        spec = await (await system.referral.get(SPEC_URL)).json()
        refs = walk_refs(spec)
        assert PROBLEM_REF in refs
        for ref in refs:
            resolve(spec, ref)


async def test_oauth2_password_flow_on_the_auth_token_endpoint(spec):
    schemes = spec["components"]["securitySchemes"]
    oauth2 = {name: s for name, s in schemes.items() if s.get("type") == "oauth2"}
    assert oauth2, schemes
    flows = [s["flows"]["password"] for s in oauth2.values() if "password" in s.get("flows", {})]
    assert flows, oauth2
    assert any(flow.get("tokenUrl") == "/api/v1/auth/token" for flow in flows), flows
    for method, path in USER_SECURED:
        requirements = spec["paths"][path][method].get("security", [])
        assert any(set(r) & set(oauth2) for r in requirements), (method, path, requirements)
    lookup = spec["paths"][f"{PREFIX}/codes"]["get"]
    assert not [r for r in lookup.get("security", []) if r], "the email lookup is public"
    # The service-to-service endpoints are not public: the gateway answers 404 for /internal/.
    assert not [path for path in spec["paths"] if path.startswith("/internal/")]
    assert not [path for path, item in spec["paths"].items() if "head" in item]


# --- Swagger UI and ReDoc ------------------------------------------------------------------------


async def test_swagger_ui_page_and_its_assets(system):
    response = await system.referral.get(f"{PREFIX}/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    html = await response.text()
    assert "swagger" in html.lower()
    assert SPEC_URL in html
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', html)
    styles = re.findall(r'<link[^>]+href="([^"]+)"', html)
    assert scripts, html
    assert all(s.startswith(f"{PREFIX}/static/") for s in scripts + styles), (scripts, styles)
    for src in scripts:
        asset = await system.referral.get(src)
        assert asset.status == 200, src
        assert "javascript" in asset.content_type, (src, asset.content_type)
        assert len(await asset.read()) > 1000, src
    assert any(href.endswith(".css") for href in styles), styles
    for href in styles:
        asset = await system.referral.get(href)
        assert asset.status == 200, href
        if href.endswith(".css"):
            assert asset.content_type == "text/css", (href, asset.content_type)


async def test_redoc_page_and_its_script(system):
    response = await system.referral.get(f"{PREFIX}/redoc")
    assert response.status == 200
    assert response.content_type == "text/html"
    html = await response.text()
    assert SPEC_URL in html
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', html)
    assert scripts == [f"{PREFIX}/static/redoc/redoc.standalone.js"], scripts
    script = await system.referral.get(scripts[0])
    assert script.status == 200
    assert "javascript" in script.content_type
    assert len(await script.read()) > 10000


# --- health and metrics --------------------------------------------------------------------------


async def test_healthz(system):
    response = await system.referral.get("/healthz")
    assert response.status == 200
    assert response.headers.get("X-Request-ID")
    assert await response.json() == {"status": "ok"}


async def test_metrics_count_http_requests(system):
    assert (await system.referral.get(f"{PREFIX}/codes", params={"email": "x@example.com"})).status == 404
    response = await system.referral.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = [
        sample
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
        if sample.name == "http_requests_total"
    ]
    assert samples
    lookup = [
        s for s in samples if s.labels.get("route") == f"{PREFIX}/codes" and s.labels.get("status") == "404"
    ]
    assert lookup and lookup[0].value >= 1, samples
    assert lookup[0].labels["method"] == "GET"
