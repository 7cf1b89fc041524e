"""Soak: many concurrent clients on the main gateway, then the invariants checked in the database.

Bounded twice, whichever comes first: a fixed budget of requests (`SOAK_REQUESTS`, 3,000) and a
wall-clock cap (`SOAK_SECONDS`, 60 s). `SOAK_WORKERS` (32) asyncio workers draw operations from a
seeded (`SOAK_SEED`) weighted mix: signups with and without a code (valid, deleted, unknown), code
creation (generated, vanity, a taken vanity, two at once) and deletion, activations (valid ones and
ones that must fail: own code, already referred, a cycle, a deleted or unknown code, two users on each
other's codes at once, one user on two codes at once), lookups by email (known and unknown), password
logins (a few bad ones, and one account driven into its lockout) and refreshes (plain, two workers on
the same token at once, a rotated token presented again).

Every response is recorded. The test fails on any 5xx or transport error (listed with method, path,
status and request id), on an answer the contract forbids given what was known when the request was
sent (a 201 for a deleted code, a lookup that returns a deleted code, two 201s for one refresh token,
...), on an answer outside the ones allowed for that operation, and on any broken invariant in the
database once the referral outbox has settled. Expected 4xx are only counted. The printed summary
(also written to `.artifacts/e2e/soak-summary.txt`) is information, never a timing assertion.

The client-side model is exact where it can be: a user's code is created and deleted only under that
user's lock, and a refresh token is used by one worker at a time except in the deliberate races.
Failed logins are few on purpose: the auth service counts them per client address too (50 per
5 minutes by default), and every request of the e2e package comes from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg2
import pytest

from tests.e2e.api import AUTH, CODES, MY_CODE, PASSWORD, REFERRALS, SIGNUP, TOKEN, bearer, client, rfc3339
from tests.e2e.conftest import ARTIFACTS
from tests.harness import harness_smtp
from tests.helpers import Mailbox

SEED = int(os.environ.get("SOAK_SEED", "20260501"))
REQUEST_BUDGET = int(os.environ.get("SOAK_REQUESTS", "3000"))
WALL_CLOCK = float(os.environ.get("SOAK_SECONDS", "60"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "32"))
REQUEST_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
# Bad passwords and unknown emails, besides the one account driven into its lockout (5 failures; 10
# at most should the auth replicas count apart, in their Redis fallback).
MAX_BAD_LOGINS = 6
LOCKOUT_AFTER = 5  # AUTH_LOGIN_MAX_FAILURES_PER_ACCOUNT_ADDRESS's default (one address: the gateway's peer)
MIN_USERS = 8

pytestmark = pytest.mark.timeout(int(WALL_CLOCK) + 240)


class OutOfBudget(Exception):
    """The request budget or the wall clock is spent: the worker stops."""


@dataclass
class Record:
    op: str
    method: str
    path: str
    status: int  # 0: no HTTP answer (connection error or timeout)
    request_id: str
    code: str  # the problem's `code`, or the OAuth2 `error`, or ""

    def line(self) -> str:
        answer = f"{self.status} {self.code}".strip()
        return f"{self.method} {self.path} -> {answer} (request id {self.request_id}, {self.op})"


@dataclass(eq=False)
class SoakUser:
    id: str
    email: str
    access_token: str
    referrer_id: str | None  # the link the soak saw made (signup with a code, or an activation's 201)
    code: str | None = None  # the active code as the soak knows it (created and deleted under `lock`)
    version: int = 0  # bumped on every change of `code`
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tokens: dict[int, str] = field(default_factory=dict)  # family key -> live refresh token, when free
    rotated: list[tuple[int, str]] = field(default_factory=list)  # (family key, a token already rotated)
    bad_password_tried: bool = False
    verified: bool = False  # the address proven, and its access token says so
    verifying: bool = False  # between the proof and the new token: either answer may come

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.access_token)


def _flip_case(code: str, rng: random.Random) -> str:
    """The same code as a user may type it: codes are case-insensitive."""
    return rng.choice((code, code.lower(), code.upper(), code.swapcase()))


class Soak:
    """The shared state of the workers: the model of what exists, and every answer."""

    def __init__(self, session: aiohttp.ClientSession, mailbox: Mailbox) -> None:
        self.session = session
        self.mailbox = mailbox  # the mails the stack sends from now on
        self.reserved = 0
        self.sent = 0
        self.deadline = float("inf")
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.users: list[SoakUser] = []
        self.by_id: dict[str, SoakUser] = {}
        self.code_owner: dict[str, str] = {}  # lower(code) -> owner id, for every code the soak created
        self.deleted: set[str] = set()  # lower(code) of codes answered 204 on delete
        self.unknown_probed: list[str] = []  # code texts answered 404 (then maybe claimed as vanity codes)
        self.signup_links: list[tuple[str, str, str]] = []  # (referral id, referrer id, code)
        self.plain_signups: list[str] = []
        self.activations: list[tuple[str, str, str]] = []  # (referral id, referrer id, code) answered 201
        self.uncertain_users: set[str] = set()  # a link request got no answer or a 5xx: unknown outcome
        self.bad_logins = 0
        self.lockout_done = False
        self.lockout_failures: int | None = None  # failed logins before the lockout account got 429
        self.family_keys = 0

    # --- budget and requests ---------------------------------------------------------------------

    def reserve(self, count: int) -> None:
        """Claim `count` requests of the budget, or stop the worker when it or the time is spent."""
        if self.reserved + count > REQUEST_BUDGET or time.monotonic() >= self.deadline:
            raise OutOfBudget
        self.reserved += count

    async def call(
        self, op: str, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[Record, Any]:
        """Send one request (already reserved); record the answer; return it with its JSON body."""
        self.sent += 1
        request_id = f"soak-{SEED}-{self.sent:05d}"
        try:
            response = await self.session.request(
                method,
                path,
                headers={"X-Request-ID": request_id, **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                **kwargs,
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            record = Record(op, method, path, 0, request_id, type(error).__name__)
            self.records.append(record)
            self.problems.append(f"no answer: {record.line()}: {error!r}")
            return record, None
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = None
        code = ""
        if isinstance(body, dict):
            code = str(body.get("code") or body.get("error") or "")
        record = Record(op, method, path, response.status, response.headers.get("X-Request-ID", "-"), code)
        self.records.append(record)
        if response.status >= 500:
            self.problems.append(f"5xx: {record.line()}")
        return record, body

    def expect(self, record: Record, *allowed: int | tuple[int, str]) -> bool:
        """The answer is one of `allowed` (a status, or a status with its code); else a problem."""
        if record.status == 0 or record.status >= 500:
            return False  # already listed
        for want in allowed:
            if record.status == want or (record.status, record.code) == want:
                return True
        self.problems.append(f"unexpected answer: {record.line()}, allowed {allowed}")
        return False

    def violation(self, record: Record, why: str) -> None:
        self.problems.append(f"contract violated: {why}: {record.line()}")

    # --- the model ---------------------------------------------------------------------------------

    def add_user(self, body: dict[str, Any], email: str) -> SoakUser:
        user_body = body["user"]
        user = SoakUser(user_body["id"], email, body["access_token"], user_body["referrer_id"])
        self.family_keys += 1
        user.tokens[self.family_keys] = body["refresh_token"]
        self.users.append(user)
        self.by_id[user.id] = user
        return user

    def ancestors(self, user_id: str) -> list[str]:
        """The referrers above `user_id` as the soak knows them, nearest first."""
        chain: list[str] = []
        current = self.by_id[user_id].referrer_id if user_id in self.by_id else None
        while current is not None and current not in chain and len(chain) <= len(self.users):
            chain.append(current)
            current = self.by_id[current].referrer_id if current in self.by_id else None
        return chain

    def linked(self, referral: SoakUser, referrer_id: str, code: str, *, signup: bool) -> None:
        if signup:
            self.signup_links.append((referral.id, referrer_id, code))
        else:
            self.activations.append((referral.id, referrer_id, code))
        if referral.referrer_id is not None and referral.referrer_id != referrer_id:
            self.problems.append(
                f"contract violated: user {referral.id} linked twice: "
                f"to {referral.referrer_id}, then to {referrer_id}"
            )
        referral.referrer_id = referrer_id

    def with_code(self, rng: random.Random, *, exclude: SoakUser | None = None) -> SoakUser | None:
        owners = [u for u in self.users if u.code is not None and u is not exclude]
        return rng.choice(owners) if owners else None

    def code_usable(self, owner: SoakUser, code: str) -> bool:
        """Whether `code` is certainly still `owner`'s active code (no change of it under way)."""
        return owner.code == code and not owner.lock.locked()

    # --- operations --------------------------------------------------------------------------------

    async def signup_plain(self, rng: random.Random) -> None:
        self.reserve(1)
        email = f"soak-{rng.getrandbits(64):016x}@example.com"
        record, body = await self.call("signup", "POST", SIGNUP, json={"email": email, "password": PASSWORD})
        if self.expect(record, 201):
            user = self.add_user(body, email)
            self.plain_signups.append(user.id)
            if user.referrer_id is not None:
                self.violation(record, "a signup without a code has a referrer")

    async def signup_with_code(self, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.12 and self.deleted:
            await self._signup_refused(rng, rng.choice(sorted(self.deleted)), "signup deleted code", 404, 410)
            return
        if roll < 0.2:
            text = f"nope{rng.getrandbits(40):010x}"
            await self._signup_refused(rng, text, "signup unknown code", (404, "code_not_found"))
            self.unknown_probed.append(text)
            return
        owner = self.with_code(rng)
        if owner is None or owner.code is None:
            await self.signup_plain(rng)
            return
        self.reserve(1)
        code, version = owner.code, owner.version
        email = f"soak-{rng.getrandbits(64):016x}@example.com"
        record, body = await self.call(
            "signup with code",
            "POST",
            SIGNUP,
            json={"email": email, "password": PASSWORD, "referral_code": _flip_case(code, rng)},
        )
        if record.status == 201:
            user = self.add_user(body, email)
            if user.referrer_id != owner.id:
                self.violation(record, f"signup with {owner.id}'s code gave referrer {user.referrer_id}")
            user.referrer_id = None
            self.linked(user, owner.id, code, signup=True)
        elif (
            self.expect(record, (410, "code_expired"))
            and owner.version == version
            and self.code_usable(owner, code)
        ):
            self.violation(record, f"the active code {code} was refused")

    async def _signup_refused(self, rng: random.Random, text: str, op: str, *allowed: Any) -> None:
        self.reserve(1)
        email = f"soak-{rng.getrandbits(64):016x}@example.com"
        body = {"email": email, "password": PASSWORD, "referral_code": _flip_case(text, rng)}
        record, answer = await self.call(op, "POST", SIGNUP, json=body)
        if record.status == 201:
            self.violation(record, f"signup accepted the code {text} known to be unusable")
            user = self.add_user(answer, email)
            self.uncertain_users.add(user.id)
        else:
            self.expect(record, *allowed)

    async def create_code(self, rng: random.Random) -> None:
        if len(self.users) < MIN_USERS:
            await self.signup_plain(rng)
            return
        user = rng.choice(self.users)
        roll = rng.random()
        if roll < 0.15:
            await self._create_two_at_once(user)
            return
        vanity: str | None = None
        taken = False
        if roll < 0.3 and self.code_owner:
            vanity, taken = _flip_case(rng.choice(sorted(self.code_owner)), rng), True
        elif roll < 0.4 and self.unknown_probed:
            vanity = self.unknown_probed.pop()  # was answered 404 (and cached as unknown): now it exists
        elif roll < 0.6:
            vanity = f"soak_{rng.getrandbits(48):012x}"
        self.reserve(1)
        async with user.lock:
            payload: dict[str, str] = {"expires_at": rfc3339(datetime.now(UTC) + timedelta(days=7))}
            if vanity is not None:
                payload["code"] = vanity
            record, body = await self.call("create code", "POST", CODES, json=payload, headers=user.headers)
            if user.verifying and record.status == 403:
                return  # the proof is on its way: the token used here may predate it
            if not user.verified and not user.verifying:  # a 201 would be a code for an unproven address
                self.expect(record, (403, "email_unverified"))
                return
            if user.code is not None:
                if taken:
                    self.expect(record, (409, "active_code_exists"), (409, "code_taken"))
                else:
                    self.expect(record, (409, "active_code_exists"))
                if record.status == 201:
                    self.violation(record, f"a second active code for {user.id}")
            elif taken:
                self.expect(record, (409, "code_taken"))
            elif self.expect(record, 201):
                self._created(user, record, body, vanity)

    async def _create_two_at_once(self, user: SoakUser) -> None:
        if not user.verified:
            return
        self.reserve(2)
        async with user.lock:
            payload = {"expires_at": rfc3339(datetime.now(UTC) + timedelta(days=3))}
            answers = await asyncio.gather(
                *(
                    self.call("create code x2", "POST", CODES, json=payload, headers=user.headers)
                    for _ in "ab"
                )
            )
            created = [(r, b) for r, b in answers if r.status == 201]
            for record, _ in answers:
                if record.status != 201:
                    self.expect(record, (409, "active_code_exists"))
            if len(created) > 1 or (created and user.code is not None):
                self.violation(created[-1][0], f"two active codes for {user.id} (concurrent creation)")
            if created:
                self._created(user, *created[0], None)
            elif user.code is None and all(r.status < 500 and r.status for r, _ in answers):
                self.violation(answers[0][0], f"neither of two concurrent creations for {user.id} succeeded")

    def _created(self, user: SoakUser, record: Record, body: dict[str, Any], vanity: str | None) -> None:
        code = str(body["code"])
        if body.get("owner_id") != user.id:
            self.violation(record, f"code owner {body.get('owner_id')} instead of {user.id}")
        if vanity is not None and code.lower() != vanity.lower():
            self.violation(record, f"vanity code {vanity!r} came back as {code!r}")
        if code.lower() in self.code_owner:
            self.violation(record, f"code {code} handed out twice")
        self.code_owner[code.lower()] = user.id
        user.code = code
        user.version += 1

    async def delete_code(self, rng: random.Random) -> None:
        owner = self.with_code(rng) if rng.random() < 0.85 else None
        if owner is None:
            if not self.users:
                await self.signup_plain(rng)
                return
            owner = rng.choice(self.users)
        self.reserve(1)
        async with owner.lock:
            record, _ = await self.call("delete code", "DELETE", MY_CODE, headers=owner.headers)
            if owner.code is None:
                self.expect(record, (404, "code_not_found"))
            elif self.expect(record, 204):
                self.deleted.add(owner.code.lower())
                owner.code = None
                owner.version += 1

    async def activate(self, rng: random.Random) -> None:
        if len(self.users) < MIN_USERS:
            await self.signup_plain(rng)
            return
        roll = rng.random()
        variants: list[Callable[[random.Random], Awaitable[bool]]] = []
        if roll < 0.4:
            variants.append(self._activate_valid)
        elif roll < 0.5:
            variants.append(self._activate_own)
        elif roll < 0.6:
            variants.append(self._activate_already_referred)
        elif roll < 0.7:
            variants.append(self._activate_cycle)
        elif roll < 0.78:
            variants.append(self._activate_deleted)
        elif roll < 0.82:
            variants.append(self._activate_unknown)
        elif roll < 0.91:
            variants.append(self._activate_each_other)
        else:
            variants.append(self._activate_two_codes)
        variants.append(self._activate_valid)
        for variant in variants:
            if await variant(rng):
                return
        await self.signup_plain(rng)

    async def _activation(
        self, op: str, user: SoakUser, owner: SoakUser | None, code: str, rng: random.Random
    ) -> Record:
        """POST the activation (reserved); a 201 is checked and recorded as a link."""
        record, body = await self.call(
            op, "POST", REFERRALS, json={"code": _flip_case(code, rng)}, headers=user.headers
        )
        if record.status == 0 or record.status >= 500:
            self.uncertain_users.add(user.id)  # the link may or may not have been written
        if record.status == 201:
            expected = owner.id if owner else self.code_owner.get(code.lower())
            if body.get("referral_id") != user.id or body.get("referrer_id") != expected:
                self.violation(record, f"activation body {body} for {user.id} with {expected}'s code")
            status = "confirmed" if user.verified else "pending"
            if body.get("status") != status and not user.verifying:
                self.violation(record, f"activation of {user.id} (verified: {user.verified}): {body}")
            self.linked(user, str(body.get("referrer_id")), code, signup=False)
        return record

    async def _activate_valid(self, rng: random.Random) -> bool:
        user = rng.choice(self.users)
        owner = self.with_code(rng, exclude=user)
        if owner is None or owner.code is None:
            return False
        self.reserve(1)
        code, version = owner.code, owner.version
        already = user.referrer_id is not None
        cycle = user.id in self.ancestors(owner.id)
        record = await self._activation("activate", user, owner, code, rng)
        if record.status == 201 and (already or cycle):
            self.violation(
                record, "activation accepted for a user already referred" if already else "a cycle"
            )
        allowed = (201, (409, "already_referred"), (422, "referral_cycle"), (410, "code_expired"))
        refused = self.expect(record, *allowed) and record.status == 410
        if refused and owner.version == version and self.code_usable(owner, code):
            self.violation(record, f"the active code {code} was refused")
        return True

    async def _activate_own(self, rng: random.Random) -> bool:
        user = self.with_code(rng)
        if user is None or user.code is None:
            return False
        self.reserve(1)
        code = user.code
        record = await self._activation("activate own code", user, user, code, rng)
        if record.status == 201:
            self.violation(record, "a user became their own referral")
        self.expect(record, (422, "self_referral"), (410, "code_expired"))
        return True

    async def _activate_already_referred(self, rng: random.Random) -> bool:
        referred = [u for u in self.users if u.referrer_id is not None]
        if not referred:
            return False
        user = rng.choice(referred)
        owner = self.with_code(rng, exclude=user)
        if owner is None or owner.code is None:
            return False
        self.reserve(1)
        record = await self._activation("activate already referred", user, owner, owner.code, rng)
        if record.status == 201:
            self.violation(record, f"{user.id}, already referred, was linked again")
        self.expect(record, (409, "already_referred"), (410, "code_expired"))
        return True

    async def _activate_cycle(self, rng: random.Random) -> bool:
        """The root of a known tree activates the code of someone below it: 422 referral_cycle."""
        pairs = []
        for owner in self.users:
            if owner.code is not None and owner.referrer_id is not None:
                root = self.ancestors(owner.id)[-1]
                if root in self.by_id:
                    pairs.append((self.by_id[root], owner))
        if not pairs:
            return False
        user, owner = rng.choice(pairs)
        if owner.code is None:
            return False
        self.reserve(1)
        record = await self._activation("activate cycle", user, owner, owner.code, rng)
        if record.status == 201:
            self.violation(record, f"{user.id} became the referral of {owner.id}, who is below them")
        self.expect(record, (422, "referral_cycle"), (409, "already_referred"), (410, "code_expired"))
        return True

    async def _activate_deleted(self, rng: random.Random) -> bool:
        if not self.deleted:
            return False
        user = rng.choice(self.users)
        code = rng.choice(sorted(self.deleted))
        self.reserve(1)
        # The code's state is checked first today (410); refusing for another reason would do too.
        others: list[tuple[int, str]] = [(409, "already_referred")] if user.referrer_id else []
        if self.code_owner.get(code) == user.id:
            others.append((422, "self_referral"))
        record = await self._activation("activate deleted code", user, None, code, rng)
        if record.status == 201:
            self.violation(record, f"the deleted code {code} was accepted")
        self.expect(record, (410, "code_expired"), (404, "code_not_found"), *others)
        return True

    async def _activate_unknown(self, rng: random.Random) -> bool:
        user = rng.choice(self.users)
        code = f"nope{rng.getrandbits(40):010x}"
        self.reserve(1)
        record = await self._activation("activate unknown code", user, None, code, rng)
        if self.expect(record, (404, "code_not_found")):
            self.unknown_probed.append(code)
        return True

    async def _activate_each_other(self, rng: random.Random) -> bool:
        """Two roots with codes activate each other's code at once: at most one may succeed."""
        roots = [u for u in self.users if u.referrer_id is None and u.code is not None]
        if len(roots) < 2:
            return False
        a, b = rng.sample(roots, 2)
        if a.code is None or b.code is None:
            return False
        self.reserve(2)
        records = await asyncio.gather(
            self._activation("activate each other", a, b, b.code, rng),
            self._activation("activate each other", b, a, a.code, rng),
        )
        if all(r.status == 201 for r in records):
            self.violation(records[1], f"{a.id} and {b.id} became each other's referral")
        for record in records:
            self.expect(
                record, 201, (422, "referral_cycle"), (409, "already_referred"), (410, "code_expired")
            )
        return True

    async def _activate_two_codes(self, rng: random.Random) -> bool:
        """One user activates two codes at once: at most one may succeed."""
        free = [u for u in self.users if u.referrer_id is None]
        owners = [u for u in self.users if u.code is not None]
        if not free or len(owners) < 3:
            return False
        user = rng.choice(free)
        first, second = rng.sample([o for o in owners if o is not user], 2)
        if first.code is None or second.code is None:
            return False
        self.reserve(2)
        records = await asyncio.gather(
            self._activation("activate two codes", user, first, first.code, rng),
            self._activation("activate two codes", user, second, second.code, rng),
        )
        if all(r.status == 201 for r in records):
            self.violation(records[1], f"{user.id} was linked by two concurrent activations")
        for record in records:
            self.expect(
                record, 201, (422, "referral_cycle"), (409, "already_referred"), (410, "code_expired")
            )
        return True

    async def lookup(self, rng: random.Random) -> None:
        self.reserve(1)
        if not self.users or rng.random() < 0.2:
            email = f"nobody-{rng.getrandbits(64):016x}@example.com"
            record, _ = await self.call("lookup unknown", "GET", CODES, params={"email": email})
            self.expect(record, (404, "code_not_found"))
            return
        user = (rng.random() < 0.5 and self.with_code(rng)) or rng.choice(self.users)
        email = rng.choice((user.email, user.email.upper(), f"  {user.email} "))
        code, version, settled = user.code, user.version, not user.lock.locked()
        deleted_before = set(self.deleted)
        record, body = await self.call("lookup", "GET", CODES, params={"email": email})
        if not self.expect(record, 200, (404, "code_not_found")):
            return
        stable = settled and version == user.version and not user.lock.locked()
        if record.status == 200:
            found = str(body.get("code"))
            if found.lower() in deleted_before:
                self.violation(record, f"lookup of {user.email} returned the deleted code {found}")
            elif self.code_owner.get(found.lower(), user.id) != user.id:
                self.violation(record, f"lookup of {user.email} returned someone else's code {found}")
            elif stable and (code is None or found.lower() != code.lower()):
                self.violation(record, f"lookup of {user.email} returned {found}, its code is {code}")
        elif stable and code is not None:
            self.violation(record, f"lookup of {user.email} found nothing; its active code is {code}")

    async def login(self, rng: random.Random) -> None:
        if len(self.users) < MIN_USERS:
            await self.signup_plain(rng)
            return
        if not self.lockout_done and self.sent > REQUEST_BUDGET // 10:
            self.lockout_done = True
            await self._lockout(rng)
            return
        roll = rng.random()
        if roll < 0.1 and self.bad_logins < MAX_BAD_LOGINS:
            self.reserve(1)
            self.bad_logins += 1
            candidates = [u for u in self.users if not u.bad_password_tried]
            if rng.random() < 0.5 and candidates:
                user = rng.choice(candidates)
                user.bad_password_tried = True  # one bad try per account: never near its lockout
                form = {"grant_type": "password", "username": user.email, "password": "wrong password"}
            else:
                email = f"nobody-{rng.getrandbits(64):016x}@example.com"
                form = {"grant_type": "password", "username": email, "password": PASSWORD}
            record, _ = await self.call("login bad", "POST", TOKEN, data=form)
            self.expect(record, (400, "invalid_grant"), 429)
            return
        user = rng.choice(self.users)
        self.reserve(1)
        form = {
            "grant_type": "password",
            "username": rng.choice((user.email, user.email.upper())),
            "password": PASSWORD,
        }
        record, body = await self.call("login", "POST", TOKEN, data=form)
        if self.expect(record, 200, 429) and record.status == 200:
            self.family_keys += 1
            user.tokens[self.family_keys] = body["refresh_token"]

    async def _lockout(self, rng: random.Random) -> None:
        """One account, bad passwords in a row: after the limit, 429 (then even for the right password).

        With Redis up, both auth replicas share the count, so the attempt after the limit is refused.
        Were an instance counting in memory (its Redis fallback), each replica would count on its own:
        up to replicas x limit failures then, and the right password may still pass on the other one.
        """
        self.reserve(2 * LOCKOUT_AFTER + 3)
        email = f"soak-lockout-{rng.getrandbits(64):016x}@example.com"
        record, _ = await self.call("lockout", "POST", SIGNUP, json={"email": email, "password": PASSWORD})
        if not self.expect(record, 201):
            return
        bad = {"grant_type": "password", "username": email, "password": "not the password"}
        failures = 0
        for _ in range(2 * LOCKOUT_AFTER + 1):
            record, _ = await self.call("lockout", "POST", TOKEN, data=bad)
            if record.status == 429 or not self.expect(record, (400, "invalid_grant")):
                break
            failures += 1
        if record.status != 429:
            self.violation(record, f"no lockout after {failures} failed logins of one account")
            return
        self.lockout_failures = failures
        record, _ = await self.call("lockout", "POST", TOKEN, data={**bad, "password": PASSWORD})
        if failures == LOCKOUT_AFTER:  # counted together: the account is locked on every replica
            self.expect(record, 429)
        else:
            self.expect(record, 200, 429)

    async def refresh(self, rng: random.Random) -> None:
        holders = [u for u in self.users if u.tokens]
        if not holders:
            await self.signup_plain(rng)
            return
        user = rng.choice(holders)
        key = rng.choice(sorted(user.tokens))
        roll = rng.random()
        if roll < 0.12 and any(k in user.tokens for k, _ in user.rotated):
            await self._present_rotated(user, rng)
            return
        live = user.tokens.pop(key)
        if roll < 0.3:
            await self._refresh_twice_at_once(user, key, live)
            return
        try:
            self.reserve(1)
        except OutOfBudget:
            user.tokens[key] = live
            raise
        form = {"grant_type": "refresh_token", "refresh_token": live}
        record, body = await self.call("refresh", "POST", TOKEN, data=form)
        if self.expect(record, 200) and record.status == 200:
            user.rotated.append((key, live))
            user.tokens[key] = body["refresh_token"]

    async def _refresh_twice_at_once(self, user: SoakUser, key: int, live: str) -> None:
        """Two workers present the same refresh token at once: at most one 200, then the family is dead."""
        self.reserve(3)
        form = {"grant_type": "refresh_token", "refresh_token": live}
        answers = await asyncio.gather(*(self.call("refresh x2", "POST", TOKEN, data=form) for _ in "ab"))
        granted = [body for record, body in answers if record.status == 200]
        for record, _ in answers:
            self.expect(record, 200, (400, "invalid_grant"))
        if len(granted) > 1:
            self.violation(answers[1][0], "one refresh token was rotated twice")
        user.rotated.append((key, live))
        if granted:
            # The reuse revoked the family, the token just issued included.
            child = {"grant_type": "refresh_token", "refresh_token": granted[0]["refresh_token"]}
            record, _ = await self.call("refresh after reuse", "POST", TOKEN, data=child)
            if record.status == 200:
                self.violation(record, "a token issued in a family revoked for reuse still works")
            self.expect(record, (400, "invalid_grant"))

    async def _present_rotated(self, user: SoakUser, rng: random.Random) -> None:
        """A rotated token presented again: invalid_grant, and its family's live token is revoked."""
        # Only a family no other worker holds (its live token is free): it is about to be revoked.
        key, old = rng.choice([(k, token) for k, token in user.rotated if k in user.tokens])
        live = user.tokens.pop(key)
        self.reserve(2)
        record, _ = await self.call(
            "refresh rotated", "POST", TOKEN, data={"grant_type": "refresh_token", "refresh_token": old}
        )
        if record.status == 200:
            self.violation(record, "a rotated refresh token was accepted")
        self.expect(record, (400, "invalid_grant"))
        record, _ = await self.call(
            "refresh revoked", "POST", TOKEN, data={"grant_type": "refresh_token", "refresh_token": live}
        )
        if record.status == 200:
            self.violation(record, "the live token of a family revoked for reuse still works")
        self.expect(record, (400, "invalid_grant"))

    async def verify(self, rng: random.Random) -> None:
        """A user proves their address from the mailed link (once: a second try is refused), then logs
        in again for a token that says so."""
        unproven = [
            u for u in self.users if not (u.verified or u.verifying) and u.id not in self.uncertain_users
        ]
        if len(self.users) < MIN_USERS or not unproven:
            await self.signup_plain(rng)
            return
        user = rng.choice(unproven)
        # Taken before the first await: another worker choosing meanwhile must not pick this user and
        # spend the same proof (one of the two would get 400, rightly). Other workers may use the user
        # meanwhile, with the token it had.
        user.verifying = True
        proof = await self.mailbox.token(user.email, "verify-email", timeout=SETTLE_TIMEOUT)
        self.reserve(3)
        record, _ = await self.call("verify", "POST", f"{AUTH}/email/verify", json={"token": proof})
        if not self.expect(record, 200):
            return  # left `verifying`: the database decides at the end
        record, _ = await self.call("verify again", "POST", f"{AUTH}/email/verify", json={"token": proof})
        self.expect(record, (400, "verification_invalid"))
        form = {"grant_type": "password", "username": user.email, "password": PASSWORD}
        record, body = await self.call("login verified", "POST", TOKEN, data=form)
        if self.expect(record, 200):
            user.access_token = body["access_token"]
            self.family_keys += 1
            user.tokens[self.family_keys] = body["refresh_token"]
            user.verified, user.verifying = True, False

    # --- the run -----------------------------------------------------------------------------------

    async def worker(self, index: int) -> None:
        rng = random.Random(SEED * 1000 + index)
        ops = [
            (self.signup_plain, 10),
            (self.signup_with_code, 12),
            (self.create_code, 10),
            (self.delete_code, 4),
            (self.activate, 16),
            (self.lookup, 14),
            (self.login, 8),
            (self.refresh, 12),
            (self.verify, 6),
        ]
        functions, weights = zip(*ops, strict=True)
        try:
            while True:
                await rng.choices(functions, weights)[0](rng)
        except OutOfBudget:
            return

    async def run(self) -> float:
        start = time.monotonic()
        self.deadline = start + WALL_CLOCK
        await asyncio.gather(*(self.worker(i) for i in range(WORKERS)))
        return time.monotonic() - start


# --- the database -----------------------------------------------------------------------------------


def _rows(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


def _settle(conn: Any, table: str) -> None:
    """Wait (bounded) until no row of the outbox `table` is pending."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    sql = f"SELECT count(*) FROM {table} WHERE delivered_at IS NULL AND failed_at IS NULL"
    while _rows(conn, sql)[0][0] and time.monotonic() < deadline:
        time.sleep(0.2)


def _settle_outbox(conn: Any) -> list[tuple[Any, ...]]:
    """Wait (bounded) until no outbox row is pending; the rows still pending then."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    pending_sql = (
        "SELECT referral_id::text, attempts, last_error FROM auth.referral_outbox "
        "WHERE delivered_at IS NULL AND failed_at IS NULL"
    )
    while True:
        pending = _rows(conn, pending_sql)
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.2)


CYCLES = """
WITH RECURSIVE walk(start_id, current_id, depth) AS (
    SELECT u.id, r.referrer_id, 1
    FROM auth.users u JOIN referral.referrals r ON r.referral_id = u.id
    UNION ALL
    SELECT w.start_id, r.referrer_id, w.depth + 1
    FROM walk w JOIN referral.referrals r ON r.referral_id = w.current_id
    WHERE w.current_id <> w.start_id AND w.depth < %(bound)s
)
SELECT start_id, max(depth) FROM walk
WHERE current_id = start_id OR depth >= %(bound)s
GROUP BY start_id
"""


def check_database(database_url: str, soak: Soak) -> tuple[list[str], dict[str, int]]:
    """Every invariant, read from the database itself; the broken ones, and a few counts."""
    problems: list[str] = []
    conn = psycopg2.connect(database_url, connect_timeout=5)
    conn.autocommit = True
    try:
        # Other tests of the package share the stack: only the soak's own rows must have settled.
        mine = {user.id for user in soak.users}
        pending = _settle_outbox(conn)
        if own_pending := [row for row in pending if row[0] in mine]:
            problems.append(f"outbox not settled after {SETTLE_TIMEOUT:.0f} s: {own_pending[:10]}")

        for label, sql in (
            (
                "owners with more than one active code",
                "SELECT owner_id, array_agg(code) FROM referral.codes "
                "WHERE deleted_at IS NULL AND expires_at > now() GROUP BY owner_id HAVING count(*) > 1",
            ),
            (
                "owners with more than one open code",
                "SELECT owner_id, array_agg(code) FROM referral.codes "
                "WHERE deleted_at IS NULL GROUP BY owner_id HAVING count(*) > 1",
            ),
            (
                "code texts given out twice",
                "SELECT lower(code), count(*) FROM referral.codes GROUP BY lower(code) HAVING count(*) > 1",
            ),
            (
                "users linked more than once",
                "SELECT referral_id, count(*) FROM referral.referrals "
                "GROUP BY referral_id HAVING count(*) > 1",
            ),
            (
                "duplicate (referrer, referral) links",
                "SELECT referrer_id, referral_id, count(*) FROM referral.referrals "
                "GROUP BY referrer_id, referral_id HAVING count(*) > 1",
            ),
            ("self-links", "SELECT referral_id FROM referral.referrals WHERE referral_id = referrer_id"),
            ("users who are their own referrer", "SELECT id FROM auth.users WHERE referrer_id = id"),
            (
                "refresh-token families with two live tokens",
                "SELECT family_id, count(*) FROM auth.refresh_tokens "
                "WHERE rotated_at IS NULL AND revoked_at IS NULL GROUP BY family_id HAVING count(*) > 1",
            ),
        ):
            found = _rows(conn, sql)
            if found:
                problems.append(f"{label}: {found[:10]}")

        (links,) = _rows(conn, "SELECT count(*) FROM referral.referrals")[0]
        cycles = _rows(conn, CYCLES, {"bound": links + 2})
        if cycles:
            problems.append(f"referral cycles (start, depth): {cycles[:10]}")

        referrals = dict(_rows(conn, "SELECT referral_id::text, referrer_id::text FROM referral.referrals"))
        user_referrer = dict(_rows(conn, "SELECT id::text, referrer_id::text FROM auth.users"))
        for referral_id, referrer_id, code in soak.signup_links:
            if referrals.get(referral_id) != referrer_id:
                problems.append(
                    f"signup of {referral_id} with {referrer_id}'s code {code} (201): "
                    f"referral.referrals has {referrals.get(referral_id)}"
                )
            if user_referrer.get(referral_id) != referrer_id:
                problems.append(
                    f"signup of {referral_id} with {referrer_id}'s code {code} (201): "
                    f"auth.users.referrer_id is {user_referrer.get(referral_id)}"
                )
        for user_id in soak.plain_signups:
            if user_referrer.get(user_id) is not None:
                problems.append(f"signup of {user_id} without a code: referrer_id {user_referrer[user_id]}")
        for referral_id, referrer_id, code in soak.activations:
            if referrals.get(referral_id) != referrer_id:
                problems.append(
                    f"activation of {referral_id} with {referrer_id}'s code {code} (201): "
                    f"referral.referrals has {referrals.get(referral_id)}"
                )
        # No link the soak's answers did not announce (a refused request that wrote one anyway).
        announced = {r: p for r, p, _ in soak.signup_links} | {r: p for r, p, _ in soak.activations}
        for user in soak.users:
            stored = referrals.get(user.id)
            if user.id not in soak.uncertain_users and stored != announced.get(user.id):
                problems.append(
                    f"user {user.id}: link to {stored} in the database, answers said {announced.get(user.id)}"
                )

        # The codes as the soak knows them.
        codes = {
            text: (owner, deleted)
            for text, owner, deleted in _rows(
                conn, "SELECT lower(code), owner_id::text, deleted_at IS NOT NULL FROM referral.codes"
            )
        }
        for text, owner_id in soak.code_owner.items():
            stored = codes.get(text)
            if stored is None or stored[0] != owner_id:
                problems.append(f"code {text} (201 for {owner_id}): database has {stored}")
            elif stored[1] != (text in soak.deleted):
                problems.append(
                    f"code {text}: deleted in the database {stored[1]}, answers said {text in soak.deleted}"
                )

        # Every proven user's link confirmed (once the notices have arrived), every other one pending.
        _settle(conn, "auth.verified_outbox")
        statuses = dict(_rows(conn, "SELECT referral_id::text, status FROM referral.referrals"))
        proven = {
            user_id for (user_id,) in _rows(conn, "SELECT id::text FROM auth.users WHERE email_verified")
        }
        for user in soak.users:
            if user.id in statuses and user.id not in soak.uncertain_users:
                want = "confirmed" if user.id in proven else "pending"
                seen = user.verified or user.verifying  # a proof that got no answer may have landed
                if (
                    statuses[user.id] != want
                    or (user.verified and user.id not in proven)
                    or (not seen and user.id in proven)
                ):
                    problems.append(
                        f"user {user.id} (verified as the soak saw it: {user.verified}, in auth:"
                        f" {user.id in proven}): link {statuses[user.id]}, expected {want}"
                    )
        wrong_totals = _rows(
            conn,
            "SELECT t.referrer_id, t.total, t.confirmed, count(r.*), count(r.*) FILTER (WHERE r.status ="
            " 'confirmed') FROM referral.referrer_totals t LEFT JOIN referral.referrals r USING (referrer_id)"
            " GROUP BY t.referrer_id, t.total, t.confirmed"
            " HAVING t.total <> count(r.*)"
            " OR t.confirmed <> count(r.*) FILTER (WHERE r.status = 'confirmed')",
        )
        if wrong_totals:
            problems.append(
                f"referrer_totals off from the links (referrer, total, confirmed, ...): {wrong_totals}"
            )

        failed = _rows(
            conn,
            "SELECT referral_id::text, referrer_id::text, code, last_error FROM auth.referral_outbox "
            "WHERE failed_at IS NOT NULL",
        )
        unexpected_failures = [row for row in failed if row[0] in mine]  # no refusal is expected for them
        if unexpected_failures:
            problems.append(f"outbox rows refused for good: {unexpected_failures[:10]}")
        counts = {
            "links in the database": links,
            "outbox rows failed (all tests)": len(failed),
            "outbox rows pending (other tests)": len(pending) - len(own_pending),
            "active codes": _rows(
                conn, "SELECT count(*) FROM referral.codes WHERE deleted_at IS NULL AND expires_at > now()"
            )[0][0],
        }
    finally:
        conn.close()
    return problems, counts


def summary(soak: Soak, elapsed: float, counts: dict[str, int]) -> str:
    statuses = Counter(r.status for r in soak.records)
    by_code = Counter(f"{r.status} {r.code}".strip() for r in soak.records if 400 <= r.status < 500)
    by_op = Counter(f"{r.op} -> {r.status}" for r in soak.records)
    lines = [
        f"soak: seed {SEED}, {WORKERS} workers, budget {REQUEST_BUDGET} requests / {WALL_CLOCK:.0f} s",
        f"  {len(soak.records)} requests in {elapsed:.1f} s ({len(soak.records) / max(elapsed, 1e-9):.0f}/s)",
        f"  statuses: {dict(sorted(statuses.items()))}",
        f"  4xx by code: {dict(sorted(by_code.items()))}",
        f"  users {len(soak.users)}, signup links {len(soak.signup_links)}, "
        f"activations {len(soak.activations)}, codes created {len(soak.code_owner)}, "
        f"deleted {len(soak.deleted)}, bad logins {soak.bad_logins}, "
        f"lockout after {soak.lockout_failures} failures",
        f"  database: {counts}",
        "  by operation:",
        *(f"    {key}: {value}" for key, value in sorted(by_op.items())),
    ]
    return "\n".join(lines)


async def test_soak_mixed_load_keeps_every_invariant(stack):
    async with client(stack.gateway_url) as session:
        soak = Soak(session, Mailbox(harness_smtp().mail_dir))
        elapsed = await soak.run()

    db_problems, counts = await asyncio.to_thread(check_database, stack.database_url, soak)
    report = summary(soak, elapsed, counts)
    print(report)
    (ARTIFACTS / "soak-summary.txt").write_text(report + "\n")

    problems = ["database: " + line for line in db_problems] + soak.problems
    assert soak.records, "the soak sent nothing"
    assert not problems, failure_report(problems) + "\n\n" + report


def failure_report(problems: list[str]) -> str:
    """The problems by kind (database first, then contract, 5xx, ...), at most 25 lines of each."""
    kinds: dict[str, list[str]] = {}
    for line in problems:
        kinds.setdefault(line.split(":", 1)[0], []).append(line)
    order = ["database", "contract violated", "5xx", "no answer", "unexpected answer"]
    lines = [f"{len(problems)} problem(s):"]
    for kind in sorted(kinds, key=lambda k: order.index(k) if k in order else len(order)):
        found = kinds[kind]
        lines.append(f"  {kind}: {len(found)}")
        lines += [f"    {line}" for line in found[:25]]
        if len(found) > 25:
            lines.append(f"    ... and {len(found) - 25} more")
    return "\n".join(lines)
