"""`/healthz`, `/readyz`, `/metrics` and the request metrics middleware."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from shared.access import public
from shared.appkeys import LIFECYCLE, METRICS_REGISTRY, READINESS_CHECKS
from shared.looplag import loop_lag_ctx
from shared.responses import json_response

READINESS_TIMEOUT = 2.0


@public
async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process runs and its event loop answers."""
    return json_response({"status": "ok"})


@public
async def readyz(request: web.Request) -> web.Response:
    """Readiness: every dependency answers within the timeout, else 503 naming the failed ones.

    503 `stopping` from the moment the process is told to stop (shared/serving.py).
    """
    if request.app[LIFECYCLE].stopping:
        return json_response({"status": "stopping", "checks": {}}, status=503)
    checks = request.app[READINESS_CHECKS]

    async def run(probe_name: str, probe: object) -> tuple[str, str]:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                await probe()  # type: ignore[operator]
        except Exception as error:  # any failure means not ready
            return probe_name, f"unavailable ({type(error).__name__})"
        return probe_name, "ok"

    results = dict(await asyncio.gather(*(run(c.name, c.probe) for c in checks)))
    ready = all(v == "ok" for v in results.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": results}, status=200 if ready else 503
    )


@public
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's registry."""
    body = generate_latest(request.app[METRICS_REGISTRY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _RequestMetrics:
    """The request counter and latency histogram, with each label set's child looked up once.

    `labels()` validates and locks on every call; caching the children per (method, route, status)
    halves what the metrics cost a request. Routes are templates and statuses few: the cache stays small.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests_total", "HTTP requests served", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "OTHER"  # a client's made-up method must not add label sets without bound
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


REQUEST_METRICS = web.AppKey("request_metrics", _RequestMetrics)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count requests and time them per route template (never per raw path: bounded labels)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[REQUEST_METRICS].observe(request.method, route, status, time.perf_counter() - started)


def setup_health(app: web.Application, registry: CollectorRegistry) -> None:
    """Mount the probes and metrics on the service's own root, outside the public prefix."""
    app[METRICS_REGISTRY] = registry
    app.setdefault(READINESS_CHECKS, [])
    app[REQUEST_METRICS] = _RequestMetrics(registry)
    app.middlewares.append(metrics_middleware)
    app.cleanup_ctx.append(loop_lag_ctx(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
