"""Traffic for the end-to-end tests that break things (tests/e2e/test_faults.py, test_restarts.py):
one request as an `Outcome` whatever happens, the usual requests, and checks on the database
afterwards (through anything with a `query` method)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp

from tests.e2e.api import CODES, PASSWORD, SIGNUP, TOKEN, Account, prove, rfc3339, unique_email
from tests.harness import harness_smtp
from tests.helpers import Mailbox


class Queries(Protocol):
    """A stack whose database the tests read directly."""

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]: ...


@dataclass
class Outcome:
    """One request's answer (status None: no answer at all, `error` says why) and how long it took."""

    op: str
    status: int | None
    elapsed: float
    content_type: str = ""
    retry_after: str | None = None
    body: str = ""
    error: str | None = None
    location: str = ""

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"{self.op}: {self.status} in {self.elapsed:.2f} s {self.error or self.body[:300]}"


async def call(
    session: aiohttp.ClientSession,
    op: str,
    method: str,
    url: str,
    record: list[Outcome] | None = None,
    **kwargs: Any,
) -> Outcome:
    """One request; its outcome (also appended to `record`). A timeout is an outcome, not an exception."""
    started = time.monotonic()
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as response:
            body = await response.text()
            outcome = Outcome(
                op,
                response.status,
                time.monotonic() - started,
                response.headers.get("Content-Type", "").split(";")[0].strip(),
                response.headers.get("Retry-After"),
                body,
                location=response.headers.get("Location", ""),
            )
    except (TimeoutError, aiohttp.ClientError) as error:
        outcome = Outcome(op, None, time.monotonic() - started, error=repr(error))
    if record is not None:
        record.append(outcome)
    return outcome


def assert_unavailable(outcome: Outcome) -> None:
    """A 503 as the contract wants it: problem+json with Retry-After."""
    assert outcome.status == 503, str(outcome)
    assert outcome.content_type == "application/problem+json", str(outcome)
    assert outcome.retry_after and int(outcome.retry_after) >= 1, str(outcome)
    body = outcome.json()
    assert body["status"] == 503 and body["code"], body


def assert_answers(outcomes: list[Outcome], allowed: dict[str, set[int]]) -> None:
    """Each outcome is an allowed status for its operation or a well-formed 503: no other 5xx, no silence."""
    bad = []
    for outcome in outcomes:
        if outcome.status == 503:
            try:
                assert_unavailable(outcome)
            except AssertionError:
                bad.append(outcome)
        elif outcome.status not in allowed[outcome.op]:
            bad.append(outcome)
    assert not bad, "unexpected answers:\n" + "\n".join(str(o) for o in bad[:20])


def signup_body(email: str, code: str | None = None) -> dict[str, str]:
    body = {"email": email, "password": PASSWORD}
    if code is not None:
        body["referral_code"] = code
    return body


async def new_user(
    session: aiohttp.ClientSession, tag: str, *, code: str | None = None, verified: bool = True
) -> Account:
    """A new user; `verified`: with the address proven from the mailed link, and tokens that say so."""
    email = unique_email(tag)
    mailbox = Mailbox(harness_smtp().mail_dir)
    outcome = await call(session, "signup", "POST", SIGNUP, json=signup_body(email, code))
    assert outcome.status == 201, str(outcome)
    body = outcome.json()
    user = body["user"]
    if verified:
        await prove(session, mailbox, email)
        form = {"grant_type": "password", "username": email, "password": PASSWORD}
        granted = await call(session, "password", "POST", TOKEN, data=form)
        assert granted.status == 200, str(granted)
        body = granted.json()
    return Account(
        user["id"], email, PASSWORD, body["access_token"], body["refresh_token"], user["referrer_id"]
    )


def code_body(days: float = 7) -> dict[str, str]:
    return {"expires_at": rfc3339(datetime_now() + timedelta(days=days))}


def datetime_now() -> datetime:
    return datetime.now(UTC)


async def new_code(session: aiohttp.ClientSession, account: Account) -> str:
    outcome = await call(session, "code_create", "POST", CODES, json=code_body(), headers=account.headers)
    assert outcome.status == 201, str(outcome)
    return str(outcome.json()["code"])


async def lookup_code(session: aiohttp.ClientSession, email: str) -> Outcome:
    return await call(session, "lookup", "GET", CODES, params={"email": email})


def assert_writes_whole(db: Queries) -> None:
    """No write half-done: every user has a refresh token, and every referred user an outbox row."""
    orphans = db.query(
        "SELECT u.email FROM auth.users u WHERE NOT EXISTS"
        " (SELECT 1 FROM auth.refresh_tokens t WHERE t.user_id = u.id)"
    )
    assert not orphans, f"users without a refresh token: {orphans}"
    unlinked = db.query(
        "SELECT u.email FROM auth.users u WHERE u.referrer_id IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM auth.referral_outbox o WHERE o.referral_id = u.id)"
    )
    assert not unlinked, f"referred users without their link in the outbox: {unlinked}"
    doubled = db.query(
        "SELECT owner_id FROM referral.codes WHERE deleted_at IS NULL GROUP BY owner_id HAVING count(*) > 1"
    )
    assert not doubled, f"owners with two open codes: {doubled}"


def user_ids(db: Queries, emails: list[str]) -> dict[str, uuid.UUID]:
    rows = db.query(
        "SELECT lower(email), id FROM auth.users WHERE lower(email) = ANY(%s)", ([e.lower() for e in emails],)
    )
    return dict(rows)


def linked(db: Queries, ids: list[str]) -> dict[str, tuple[str, int]]:
    """referral.referrals rows of these referral ids: id -> (referrer id, how many rows)."""
    rows = db.query(
        "SELECT referral_id::text, min(referrer_id::text), count(*) FROM referral.referrals"
        " WHERE referral_id = ANY(%s::uuid[]) GROUP BY referral_id",
        (ids,),
    )
    return {rid: (referrer, count) for rid, referrer, count in rows}
