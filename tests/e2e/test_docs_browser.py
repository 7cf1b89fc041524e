"""Swagger UI and ReDoc of both services, opened through the gateway in headless Chromium.

Each page must render every operation of its service's /openapi.json, log no JavaScript error,
and load everything from the gateway: a failed request, an HTTP error answer or a request to any
other host (a CDN) fails the test. A full-page screenshot of each lands in .artifacts/e2e/.
Playwright drives Debian's Chromium (/usr/bin/chromium); it never downloads a browser.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.e2e.conftest import ARTIFACTS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
RENDER_TIMEOUT_MS = 20_000
PAGES = [
    ("auth", "docs"),
    ("referral", "docs"),
    ("auth", "redoc"),
    ("referral", "redoc"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Trouble:
    """Everything that went wrong while a page loaded and rendered."""

    origin: str
    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", self._console)
        page.on("requestfailed", self._failed)
        page.on("request", self._request)
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console error: {message.text} ({message.location})")

    def _failed(self, request: Request) -> None:
        self.errors.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def _request(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if (
            parts.scheme in ("http", "https", "ws", "wss")
            and f"{parts.scheme}://{parts.netloc}" != self.origin
        ):
            self.errors.append(f"request to another host than the gateway: {request.method} {request.url}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status} for {response.request.method} {response.url}")


def _spec(gateway_url: str, service: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{gateway_url}/api/v1/{service}/openapi.json", timeout=5) as answer:
        assert answer.status == 200
        return dict(json.load(answer))


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


@pytest.mark.parametrize(("service", "ui"), PAGES, ids=[f"{s}-{u}" for s, u in PAGES])
def test_docs_page_renders_every_operation_cleanly(stack, browser, service, ui):
    spec = _spec(stack.gateway_url, service)
    operations = _operations(spec)
    assert operations, spec
    trouble = Trouble(stack.gateway_url)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        trouble.watch(page)
        url = f"{stack.gateway_url}/api/v1/{service}/{ui}"
        response = page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, url
        find_missing = _swagger_missing if ui == "docs" else _redoc_missing
        missing = find_missing(page, operations)
        page.wait_for_load_state("networkidle")
        shot = ARTIFACTS / f"docs-{service}-{ui}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
    finally:
        context.close()
    assert not missing, f"{url} does not list these operations: {missing}"
    assert not trouble.errors, f"{url}:\n" + "\n".join(trouble.errors)


def _swagger_missing(page: Page, operations: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """Swagger UI: one `.opblock` per operation, its method a class, its path the summary's data-path."""
    page.wait_for_selector(".swagger-ui .opblock", timeout=RENDER_TIMEOUT_MS)
    expected = len(operations)
    with contextlib.suppress(PlaywrightTimeout):  # then the caller reports exactly what is missing
        page.wait_for_function(
            f"document.querySelectorAll('.swagger-ui .opblock').length >= {expected}",
            timeout=RENDER_TIMEOUT_MS,
        )
    shown = page.eval_on_selector_all(
        ".swagger-ui .opblock",
        """(blocks, methods) => blocks.map(block => {
            const method = [...block.classList].map(c => c.replace('opblock-', ''))
                .find(c => methods.includes(c));
            const path = block.querySelector('.opblock-summary-path');
            return [method || null,
                    path ? (path.getAttribute('data-path') || path.innerText).replace(/\\u200b/g, '') : null];
        })""",
        list(HTTP_METHODS),
    )
    listed = {(method, path) for method, path in shown}
    assert len(shown) == len(listed), f"an operation is listed twice: {shown}"
    return [f"{method.upper()} {path}" for method, path, _ in operations if (method, path) not in listed]


def _redoc_missing(page: Page, operations: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """ReDoc: each operation has its section (`data-section-id` ends with `paths/<path>/<method>`,
    or `operation/<operationId>`) and its summary (or, without one, its path) appears on the page."""
    needles = {f"{method.upper()} {path}": op.get("summary") or path for method, path, op in operations}
    page.wait_for_selector(".api-content", timeout=RENDER_TIMEOUT_MS)
    check = "needles => needles.every(n => document.body.innerText.includes(n))"
    with contextlib.suppress(PlaywrightTimeout):  # then the caller reports exactly what is missing
        page.wait_for_function(check, arg=list(needles.values()), timeout=RENDER_TIMEOUT_MS)
    text = page.inner_text("body")
    sections = page.eval_on_selector_all(
        "[data-section-id]", "elements => elements.map(e => e.getAttribute('data-section-id'))"
    )
    missing = []
    for method, path, operation in operations:
        pointer = path.replace("~", "~0").replace("/", "~1")
        ids = {f"paths/{pointer}/{method}"} | (
            {f"operation/{operation['operationId']}"} if operation.get("operationId") else set()
        )
        has_section = any(section.endswith(tuple(ids)) for section in sections)
        if not has_section or needles[f"{method.upper()} {path}"] not in text:
            missing.append(f"{method.upper()} {path}")
    return missing


def _signup(gateway_url: str, email: str, password: str) -> None:
    body = json.dumps({"email": email, "password": password}).encode()
    request = urllib.request.Request(
        f"{gateway_url}/api/v1/auth/signup", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 201


def test_a_newcomer_authorizes_in_swagger_ui_and_tries_the_referral_api(stack, browser):
    """Authorize with the OAuth2 password flow on the referral docs, then call GET /codes/me."""
    email, password = f"swagger-{uuid.uuid4().hex[:8]}@example.com", "correct horse"
    _signup(stack.gateway_url, email, password)
    trouble = Trouble(stack.gateway_url)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        trouble.watch(page)
        page.goto(f"{stack.gateway_url}/api/v1/referral/docs", wait_until="load")
        page.wait_for_selector(".opblock", timeout=RENDER_TIMEOUT_MS)
        page.click("button.authorize")
        page.fill("#oauth_username", email)
        page.fill("#oauth_password", password)
        page.locator(".auth-container", has=page.locator("#oauth_username")).locator(
            ".auth-btn-wrapper button.authorize"
        ).click()
        page.wait_for_selector(".modal-ux button:has-text('Logout')", timeout=RENDER_TIMEOUT_MS)
        page.click("button.close-modal")
        block = page.locator(".opblock-get", has_text="/api/v1/referral/codes/me").first
        block.locator(".opblock-summary").click()
        block.locator("button.try-out__btn").click()
        block.locator("button.execute").click()
        status = block.locator(".live-responses-table .response .response-col_status").first
        status.wait_for(timeout=RENDER_TIMEOUT_MS)
        shown = status.inner_text().strip()
        page.screenshot(path=str(ARTIFACTS / "docs-referral-authorized.png"), full_page=False)
    finally:
        context.close()
    # The signed-in user has no code yet: the API's own 404, reached with the token Swagger UI got.
    assert shown.startswith("404"), shown
    unexpected = [e for e in trouble.errors if "/api/v1/referral/codes/me" not in e]  # that 404 is expected
    assert not unexpected, "\n".join(unexpected)
