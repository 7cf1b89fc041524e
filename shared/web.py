"""The middleware stack and response hygiene every service shares, set up in one call."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.access import setup_access
from shared.cors import cors_middlewares
from shared.errors import error_middleware
from shared.health import setup_health
from shared.logs import request_id_middleware
from shared.serving import setup_lifecycle
from shared.tokens import TokenVerifier

SERVER_NAME = "referral-system"


async def _harden(_: web.Request, response: web.StreamResponse) -> None:
    """No framework or version in `Server`; no MIME sniffing of JSON answers."""
    response.headers["Server"] = SERVER_NAME
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def setup_common(
    app: web.Application,
    registry: CollectorRegistry,
    *,
    user_verifier: web.AppKey[TokenVerifier],
    service_verifier: web.AppKey[TokenVerifier] | None = None,
    cors_origins: Iterable[str] = (),
) -> None:
    """Request ids (outermost), metrics, CORS, errors, access; /healthz, /readyz, /metrics; the
    lifecycle a graceful stop reads and sets (shared/serving.py).

    Access (shared/access.py) is closed by default: a route needs a user's token verified by
    `app[user_verifier]` unless its handler is marked `public` (or `service`: `app[service_verifier]`).

    CORS (shared/cors.py) is off unless `cors_origins` lists origins; it sits outside the error
    middleware, so problem+json answers get the grant too, and preflights never reach a handler.
    """
    setup_lifecycle(app)
    app.middlewares.append(request_id_middleware)
    setup_health(app, registry)  # adds the metrics middleware, so it sees the final status
    app.middlewares.extend(cors_middlewares(app, cors_origins))
    app.middlewares.append(error_middleware)
    setup_access(app, user=user_verifier, service=service_verifier)  # before body validation
    app.on_response_prepare.append(_harden)
