"""Who may call a route, declared once: every route needs a user's bearer token unless marked.

Closed by default: a handler nobody marked needs the user's access token, so forgetting a mark
makes an endpoint refuse anonymous calls, never accept them. `@public` opens a handler to anyone,
`@service` asks for a service token (the internal API); a static resource is opened with
`add_public_static`. The OpenAPI document's `security` of each operation is derived from the same
marks (shared/openapi.py), so the spec and the behaviour cannot disagree. A route whose mark the
application has no verifier for stops the application at startup.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler as AiohttpHandler

from shared.tokens import CLAIMS, TokenVerifier, bearer_token


class Access(enum.Enum):
    """What a caller must present."""

    USER = "user"  # an access token the auth service issued to a user
    SERVICE = "service"  # a service token (audience and scope of the internal API)
    PUBLIC = "public"  # nothing


# The OpenAPI security requirement of each kind of access (shared/openapi.py documents the schemes).
SECURITY: Mapping[Access, list[dict[str, list[str]]]] = {
    Access.USER: [{"bearerAuth": []}, {"oauth2": []}],
    Access.SERVICE: [{"bearerAuth": []}],
    Access.PUBLIC: [],
}

_ATTRIBUTE = "__route_access__"
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def _mark(access: Access) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        setattr(handler, _ATTRIBUTE, access)
        return handler

    return mark


public = _mark(Access.PUBLIC)
"""Open a handler to anyone."""

service = _mark(Access.SERVICE)
"""A handler of the internal API: only a service token passes."""


@dataclass
class AccessPolicy:
    """The verifier of each kind of token this application takes, and its public static resources."""

    verifiers: Mapping[Access, web.AppKey[TokenVerifier]]
    public_resources: set[web.AbstractResource] = field(default_factory=set)

    def of(self, route: web.AbstractRoute) -> Access:
        """The access a route asks for: its handler's mark, else public if declared so, else USER."""
        marked = getattr(route.handler, _ATTRIBUTE, None)
        if isinstance(marked, Access):
            return marked
        if route.resource is not None and route.resource in self.public_resources:
            return Access.PUBLIC
        return Access.USER


ACCESS_POLICY = web.AppKey("access_policy", AccessPolicy)


def setup_access(
    app: web.Application,
    *,
    user: web.AppKey[TokenVerifier],
    service: web.AppKey[TokenVerifier] | None = None,
) -> None:
    """Check every request against its route's access, before anything else reads the request."""
    verifiers = {Access.USER: user}
    if service is not None:
        verifiers[Access.SERVICE] = service
    app[ACCESS_POLICY] = AccessPolicy(verifiers)
    app.middlewares.append(access_middleware)
    app.on_startup.append(_check_routes)


def add_public_static(app: web.Application, prefix: str, path: Path | str) -> None:
    """Serve a directory of static files to anyone."""
    resource = app.router.add_static(prefix, path)
    app[ACCESS_POLICY].public_resources.add(resource)


def declare_public(app: web.Application, resource: web.AbstractResource) -> None:
    """Open a resource someone else's code added (a library's route) to anyone."""
    app[ACCESS_POLICY].public_resources.add(resource)


def route_access(app: web.Application) -> dict[tuple[str, str], Access]:
    """(canonical path, METHOD) -> access, for every route of the application."""
    policy = app[ACCESS_POLICY]
    return {
        (route.resource.canonical, route.method): policy.of(route)
        for route in app.router.routes()
        if route.resource is not None
    }


async def _check_routes(app: web.Application) -> None:
    """A route asking for a token this application cannot verify is a wiring mistake: stop now."""
    policy = app[ACCESS_POLICY]
    for route in app.router.routes():
        access = policy.of(route)
        if access is not Access.PUBLIC and access not in policy.verifiers:
            where = route.resource.canonical if route.resource is not None else "?"
            raise RuntimeError(f"{route.method} {where} needs a {access.value} token; no verifier for it")


@web.middleware
async def access_middleware(request: web.Request, handler: AiohttpHandler) -> web.StreamResponse:
    """Verify the caller's token for the matched route; claims in `request[CLAIMS]`.

    It runs before body validation, so a request without a valid token gets 401, not 422. A request
    no route matched (404, 405) goes on to be answered as such: there is nothing to protect.
    """
    match = request.match_info
    if match.http_exception is None:
        policy = request.app[ACCESS_POLICY]
        access = policy.of(match.route)
        if access is not Access.PUBLIC:
            verifier = request.app[policy.verifiers[access]]
            request[CLAIMS] = await verifier.verify(bearer_token(request))
    return await handler(request)
