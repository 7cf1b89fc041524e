"""The served OpenAPI document passes a strict OpenAPI 3 validator."""

from __future__ import annotations

from openapi_spec_validator import validate


async def test_auth_spec_is_valid_openapi_3(auth_client):
    response = await auth_client.get("/api/v1/auth/openapi.json")
    assert response.status == 200
    spec = await response.json()
    validate(spec)
    assert spec["openapi"].startswith("3.0")
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "produces" not in operation, (path, method)
            if "requestBody" in operation:
                assert operation["requestBody"]["required"] is True, (path, method)
