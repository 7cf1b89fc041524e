"""OpenAPI 3 through aiohttp-apigami: the spec, Swagger UI and ReDoc per service, and the body parser.

The spec is served at `{prefix}/openapi.json`, Swagger UI at `{prefix}/docs` and ReDoc at
`{prefix}/redoc`, all from assets inside installed packages (no CDN). apigami leaves Swagger-2 keys
(`produces`, `consumes`) on operations; they are stripped before the spec is served. The parser
turns webargs' errors into problem+json: 415 for a body that is not JSON, 400 for malformed JSON,
422 with flat `errors` for validation failures.
"""

from __future__ import annotations

import functools
import json
import string
import warnings
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn

import marshmallow as ma
import openapi_ui_bundles.redoc
from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec, validation_middleware
from aiohttp_apigami.constants import APISPEC_PARSER, SWAGGER_DICT
from aiohttp_apigami.swagger_ui import NAME_SWAGGER_SPEC, SWAGGER_UI_STATIC_FILES
from webargs import core
from webargs.aiohttpparser import AIOHTTPParser

from shared.access import SECURITY, Access, add_public_static, declare_public, public, route_access
from shared.problems import MalformedJson, UnsupportedMediaType, ValidationProblem


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details, as every error (but the OAuth2 endpoints') is answered."""

    type = ma.fields.String(required=True)
    title = ma.fields.String(required=True)
    status = ma.fields.Integer(required=True)
    detail = ma.fields.String(required=True)
    code = ma.fields.String(required=True, metadata={"description": "stable machine-readable name"})
    errors = ma.fields.Dict(
        keys=ma.fields.String(),
        values=ma.fields.List(ma.fields.String()),
        metadata={"description": "per-field messages, for validation failures"},
    )


def problem_responses(*statuses: int) -> dict[int, dict[str, Any]]:
    """OpenAPI `responses` entries for problem+json errors."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {"application/problem+json": {"schema": ProblemSchema}},
        }
        for status in statuses
    }


_SWAGGER2_OPERATION_KEYS = ("produces", "consumes")
_REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def swagger_page(prefix: str) -> str:
    """Swagger UI's page for the service under `prefix`: apigami's bundled page (spec at
    `{prefix}/openapi.json`, assets under `{prefix}/static/swagger`), with the online validator off:
    Swagger UI would otherwise send the spec's URL to validator.swagger.io from any real host name.
    The gateway's CSP allows this page's one inline script by its hash (deploy/nginx/render.py)."""
    template = (SWAGGER_UI_STATIC_FILES / "index.html").read_text(encoding="utf-8")
    page = string.Template(template).substitute(
        path=f"{prefix}/openapi.json", static=f"{prefix}/static/swagger", layout="StandaloneLayout"
    )
    marker = 'layout: "StandaloneLayout",'
    assert marker in page, "apigami's Swagger UI page changed: review swagger_page"
    return page.replace(marker, f"{marker}\n        validatorUrl: null,")


@functools.cache
def _redoc_bundle() -> str:
    """ReDoc's standalone script from the installed package, read once per process."""
    return (Path(openapi_ui_bundles.redoc.static_path) / "redoc.standalone.js").read_text(encoding="utf-8")


_MAX_JSON_DEPTH = 32


def _flatten(messages: Any) -> dict[str, list[str]]:
    """webargs nests errors under the location (`{"json": {...}}`): keep one level, field -> messages."""
    if (
        isinstance(messages, Mapping)
        and len(messages) == 1
        and next(iter(messages))
        in (
            "json",
            "query",
            "querystring",
            "form",
            "match_info",
            "path",
            "headers",
        )
    ):
        messages = next(iter(messages.values()))
    flat: dict[str, list[str]] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            flat.setdefault(prefix or "_body", []).extend(value)
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(f"{prefix}.{index}", inner)
        else:
            flat.setdefault(prefix or "_body", []).append(str(value))

    walk("", messages)
    return flat


def _depth_ok(raw: str) -> bool:
    """Refuse absurd nesting before json.loads can hit the recursion limit."""
    depth = 0
    for char in raw:
        if char in "[{":
            depth += 1
            if depth > _MAX_JSON_DEPTH:
                return False
        elif char in "]}":
            depth -= 1
    return True


def _check_strings(document: Any) -> None:
    """Refuse text no layer below can carry: lone UTF-16 surrogates (`"\\ud800"` is well-formed JSON
    but no Unicode text: 400) and U+0000 (PostgreSQL text cannot hold it: 422 naming the field)."""
    bad_fields: dict[str, list[str]] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedJson("The body holds an escaped lone surrogate, which is not text.") from None
            if "\x00" in value:
                bad_fields.setdefault(path or "_body", []).append("Must not contain U+0000.")
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(key, path)
                walk(inner, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for index, inner in enumerate(value):
                walk(inner, f"{path}.{index}" if path else str(index))

    walk(document, "")
    if bad_fields:
        raise ValidationProblem("One or more fields are not valid.", errors=bad_fields)


def _refuse_constant(name: str) -> NoReturn:
    raise MalformedJson(f"{name} is not JSON (RFC 8259).")


class ProblemParser(AIOHTTPParser):
    """webargs' aiohttp parser with problem+json errors and a strict content type for JSON bodies."""

    async def load_json(self, req: web.Request, schema: ma.Schema) -> Any:
        if not req.body_exists:
            return core.missing
        if not core.is_json(req.content_type):
            raise UnsupportedMediaType(f"Send the body as application/json, not {req.content_type!r}.")
        body = await req.read()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedJson("The body is not valid UTF-8.") from None
        if not text.strip():
            return core.missing
        if not _depth_ok(text):
            raise MalformedJson("The JSON body is nested too deeply.")
        try:
            document = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as error:
            raise MalformedJson(f"The body is not well-formed JSON: {error.args[0]}") from None
        _check_strings(document)
        return document

    def handle_error(
        self,
        error: ma.ValidationError,
        req: web.Request,
        schema: ma.Schema,
        *,
        error_status_code: int | None,
        error_headers: Mapping[str, str] | None,
    ) -> NoReturn:
        raise ValidationProblem("One or more fields are not valid.", errors=_flatten(error.messages))


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _document_routing_answers(operation: dict[str, Any]) -> None:
    """Answers that come before any handler, for what an operation's URL carries: a path parameter
    the router cannot route (empty, `.` or `..`) is 404, and a URL longer than the gateway takes
    (parameters can make it so) is 414."""
    locations = {parameter.get("in") for parameter in operation.get("parameters", [])}
    statuses = []
    if "path" in locations:
        statuses.append(404)
    if locations & {"path", "query"}:
        statuses.append(414)
    responses = operation.setdefault("responses", {})
    documented = {str(status) for status in responses}
    for status in statuses:
        if str(status) not in documented:
            responses[str(status)] = {
                "description": HTTPStatus(status).phrase,
                "content": {"application/problem+json": {"schema": dict(_PROBLEM_REF)}},
            }


def _secure(spec: dict[str, Any], access: Mapping[tuple[str, str], Access]) -> None:
    """Each operation's `security` is what its route asks for (shared/access.py), never declared twice."""
    for path, path_item in spec.get("paths", {}).items():
        for method, operation in path_item.items():
            if not isinstance(operation, dict):
                continue
            route = access.get((path, method.upper()))
            if route is None:
                raise RuntimeError(f"the OpenAPI document has {method.upper()} {path}, which no route serves")
            if "security" in operation:
                raise RuntimeError(f"{method.upper()} {path} declares `security`: mark its handler instead")
            if route is not Access.PUBLIC:
                operation["security"] = SECURITY[route]


def _clean(spec: dict[str, Any], hidden_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Strip Swagger-2 leftovers, the HEAD twins aiohttp adds to every GET, and service-to-service
    paths the gateway does not serve; every body this system takes is required; document the
    answers routing gives before any handler runs."""
    paths = spec.get("paths", {})
    for path in [p for p in paths if p.startswith(hidden_prefixes)]:
        del paths[path]
    for path_item in paths.values():
        path_item.pop("head", None)
        for operation in path_item.values():
            if isinstance(operation, dict):
                for key in _SWAGGER2_OPERATION_KEYS:
                    operation.pop(key, None)
                if "requestBody" in operation:
                    operation["requestBody"]["required"] = True
                _document_routing_answers(operation)
    return spec


_REDOC_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><redoc spec-url="{spec_url}"></redoc><script src="{script}"></script></body></html>
"""


def setup_openapi(
    app: web.Application,
    *,
    prefix: str,
    title: str,
    version: str,
    description: str,
    token_url: str,
    hidden_prefixes: tuple[str, ...] = ("/internal/",),
    components: Mapping[str, Any] | None = None,
    schemas: Mapping[str, type[ma.Schema]] | None = None,
) -> None:
    """Document every route decorated with apigami's `docs`; validate bodies with `ProblemParser`.

    Schemas named in `responses` of `docs(...)` are registered here by name: apispec rewrites those
    shared dicts into `$ref`s in place, so a second app in the same process would otherwise never
    see the component defined.
    """
    spec_url = f"{prefix}/openapi.json"
    # apigami 0.9 keeps the spec under a plain string key (an AppKey is on its 1.x list).
    warnings.filterwarnings("ignore", category=web.NotAppKeyWarning, module="aiohttp_apigami")
    apispec = setup_aiohttp_apispec(
        app,
        title=title,
        version=version,
        url=spec_url,
        swagger_path=None,  # the page is ours (below): apigami's asks a third party to validate the spec
        openapi_version="3.0.3",
        info={"description": description},
    )
    for name, schema in {"Problem": ProblemSchema, **(schemas or {})}.items():
        apispec.spec.components.schema(name, schema=schema)
    app[APISPEC_PARSER] = ProblemParser()
    app.middlewares.append(validation_middleware)

    # Bearer tokens, which Swagger UI's Authorize button can fetch with the OAuth2 password flow.
    security = {
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "oauth2": {"type": "oauth2", "flows": {"password": {"tokenUrl": token_url, "scopes": {}}}},
        }
    }

    async def finish_spec(app_: web.Application) -> None:
        spec = _clean(app_[SWAGGER_DICT], hidden_prefixes)
        _secure(spec, route_access(app_))
        for section, entries in [*security.items(), *(components or {}).items()]:
            spec.setdefault("components", {}).setdefault(section, {}).update(entries)

    app.on_startup.append(finish_spec)

    redoc_page = _REDOC_PAGE.format(
        title=title, spec_url=spec_url, script=f"{prefix}/static/redoc/redoc.standalone.js"
    )

    @public
    async def redoc(_: web.Request) -> web.Response:
        return web.Response(text=redoc_page, content_type="text/html")

    # The bundle draws its logo from Redocly's CDN; the same logo ships beside it, so point there.
    redoc_script = _redoc_bundle().replace(_REDOC_CDN_LOGO, f"{prefix}/static/redoc/logo-mini.svg")

    @public
    async def redoc_bundle(_: web.Request) -> web.Response:
        return web.Response(
            text=redoc_script,
            content_type="application/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    page = swagger_page(prefix)

    @public
    async def swagger(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    declare_public(app, app.router[NAME_SWAGGER_SPEC])
    app.router.add_get(f"{prefix}/docs", swagger)
    add_public_static(app, f"{prefix}/static/swagger", SWAGGER_UI_STATIC_FILES)
    app.router.add_get(f"{prefix}/redoc", redoc)
    app.router.add_get(f"{prefix}/static/redoc/redoc.standalone.js", redoc_bundle)
    add_public_static(app, f"{prefix}/static/redoc", openapi_ui_bundles.redoc.static_path)
