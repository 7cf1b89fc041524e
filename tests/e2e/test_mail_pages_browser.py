"""The links the auth service mails, opened in headless Chromium through the gateway, as their owner
would: the mail is the one the SMTP server received; the page reads the token from the URL's
fragment, calls the API and says what happened, under the gateway's Content-Security-Policy (a
refused script or style is a console error, and fails the test like any other)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from deploy.nginx.render import PAGES_CSP
from tests.e2e.test_docs_browser import RENDER_TIMEOUT_MS, Trouble, browser  # noqa: F401 (the fixture)
from tests.harness import harness_smtp
from tests.helpers import Mailbox, text_of


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
            return answer.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def login(gateway_url: str, email: str, password: str) -> int:
    form = f"grant_type=password&username={email}&password={password}".encode()
    request = urllib.request.Request(
        f"{gateway_url}/api/v1/auth/token",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def mailed_link(mailbox: Mailbox, email: str, page: str) -> str:
    """The link of the newest mail to `email` that opens `page`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for message in reversed(mailbox.to(email)):
            found = re.search(rf"(https?://\S+/{page}#token=[A-Za-z0-9_-]+)", text_of(message))
            if found:
                return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no {page} mail to {email}")


def open_link(
    chromium: Any, gateway_url: str, link: str, done: str, fill: dict[str, str] | None = None
) -> str:
    """Open the link, fill and submit the form when asked, wait for `done` in the status; its text."""
    assert link.startswith(gateway_url + "/api/v1/auth/pages/"), link
    trouble = Trouble(gateway_url)
    context = chromium.new_context()
    try:
        page = context.new_page()
        trouble.watch(page)
        response = page.goto(link, wait_until="load")
        assert response is not None and response.status == 200, link
        assert response.headers.get("content-security-policy") == PAGES_CSP  # no inline script allowed
        assert "token=" not in page.url, "the token is taken out of the address bar"
        if fill:
            for selector, value in fill.items():
                page.fill(selector, value)
            page.click("button[type=submit]")
        page.wait_for_function(
            "text => document.getElementById('status').textContent.includes(text)",
            arg=done,
            timeout=RENDER_TIMEOUT_MS,
        )
        status = page.inner_text("#status")
    finally:
        context.close()
    assert not trouble.errors, f"{link}:\n" + "\n".join(trouble.errors)
    return status


def test_the_verification_link_confirms_the_address_in_a_browser(stack, browser):  # noqa: F811
    mailbox = Mailbox(harness_smtp().mail_dir)
    email = f"page-verify-{uuid.uuid4().hex[:8]}@example.com"
    status, body = post(
        f"{stack.gateway_url}/api/v1/auth/signup", {"email": email, "password": "correct horse"}
    )
    assert status == 201 and body["user"]["email_verified"] is False, body
    link = mailed_link(mailbox, email, "verify-email")
    said = open_link(browser, stack.gateway_url, link, "is confirmed")
    assert email in said
    # The link worked once.
    token = link.rsplit("#token=", 1)[1]
    status, problem = post(f"{stack.gateway_url}/api/v1/auth/email/verify", {"token": token})
    assert (status, problem["code"]) == (400, "verification_invalid")


def test_the_reset_link_sets_a_new_password_in_a_browser(stack, browser):  # noqa: F811
    mailbox = Mailbox(harness_smtp().mail_dir)
    email = f"page-reset-{uuid.uuid4().hex[:8]}@example.com"
    status, _ = post(f"{stack.gateway_url}/api/v1/auth/signup", {"email": email, "password": "old password"})
    assert status == 201
    status, _ = post(f"{stack.gateway_url}/api/v1/auth/password/forgot", {"email": email})
    assert status == 202
    link = mailed_link(mailbox, email, "reset-password")
    said = open_link(
        browser,
        stack.gateway_url,
        link,
        "Your password is changed",
        fill={"#password": "brand new password", "#again": "brand new password"},
    )
    assert "signed out" in said
    assert login(stack.gateway_url, email, "brand new password") == 200
    assert login(stack.gateway_url, email, "old password") == 400
