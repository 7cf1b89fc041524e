"""The benchmark's scenarios for every endpoint that S0-S9, S-STATS and S-LEADERBOARD leave out.

`SCENARIOS` is their table (scenarios.py registers it); `PassPlans.plan` writes each wrk run's request
file. Each scenario is a class of the issue's targets: an authenticated read (≤ 200 µs of service
CPU per request), a public read (≤ 150 µs), or a write; `password_hashing` marks the argon2-bound
ones (exempt from the p99 target, like S8).

Reads go round robin (`mode=cycle`) over a fixed file. A write that can run only once per subject
(a signup, a verification, a reset, a session's end, a code made or deleted ...) goes `mode=once`
over subjects made for that very run: rows written straight into the benchmark's database with the
values the services would write (users, mail tokens whose raw value only the benchmark and the
token's digest know, refresh-token families, verified users without a code, codes), as many as the
run may send at the rate expected for it (its fastest run so far x ONCE_SLACK, else the pass's S0
ceiling, else a first guess) plus the connections. Rows are cheap (one COPY per table), logins and
signups through the API are not (argon2): that is why the subjects are written, not made.

The idempotent replays (`A-SIGNUP-REPLAY`, `R-CODE-CREATE-REPLAY`) make their keyed requests once
through the gateway before the runs (201 each), then replay them: every answer is the kept one.

`WEBHOOK-RELAY` runs in a topology of its own (`topology_groups`), started once the pass's other
scenarios are done, with both services' webhooks on (`*_WEBHOOK_URLS` to `WebhookReceiver`, an
aiohttp server of the benchmark's on 127.0.0.1 answering 204, `*_WEBHOOK_ALLOW_PRIVATE=true`):
everywhere else webhooks stay off, as by default, so no other figure pays for events. It drives S7's
activations (each writes a `referral.created` event); after each run `WebhookMeter` waits until the
relay has delivered what the run wrote (`referral_webhook_deliveries_total{outcome="delivered"}` on
every referral instance's /metrics) and records deliveries per second (run start to last delivery)
and the relay's CPU per delivery: the referral processes' CPU after wrk stopped, while only the relay
works, over the deliveries made then (with how many that was: when the relay kept up during the run,
few are left for this figure).

Left out, and why: `GET /oauth/{provider}/callback` needs a provider's token endpoint and signed ID
tokens (a whole fake provider), so only `/authorize` is measured, against a provider whose discovery
document a tiny server of the benchmark's serves on 127.0.0.1 (`DiscoveryServer`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import secrets
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg2

from deploy.local.processes import AUTH_API, REFERRAL_API, HarnessError
from services.auth.domain.ownership import hash_mail_token
from services.auth.domain.use_cases import hash_refresh_token
from services.referral.domain.codes import ALPHABET
from tests.perf import topology as topologies
from tests.perf import wrk
from tests.perf.report import AUTH_READ, PUBLIC_READ, WRITE

if TYPE_CHECKING:
    from tests.perf.runplans import PassContext

ONCE_SLACK = 3.0  # subjects for a once-only run: its fastest run so far x this
FIRST_GUESS = 3000.0  # req/s of a fast write when nothing was measured yet (no S0, no earlier run)
HASHING_FIRST_GUESS = 60.0  # req/s of an argon2-bound write (S8 reaches ~20 on 2 cores)
REPLAY_KEYS = 64  # keyed requests made once, then replayed (R-CODE-CREATE-REPLAY)
SIGNUP_REPLAY_KEYS = 16  # A-SIGNUP-REPLAY's: each first signup costs an argon2 hash (~0.2 s of CPU)
SESSIONS_PER_USER = 3  # live logins of each A-SESSIONS user
SESSION_USERS = 256  # users A-SESSIONS cycles over
SIGNOUT_SESSIONS = 2  # live logins each A-SIGNOUT-ALL user ends at once
COPIES = 64  # lines of a file that repeats one request (every wrk thread needs one)
SETUP_WORKERS = 8  # concurrent requests when making the replays' first answers
SETUP_TIMEOUT = 60.0
NEW_PASSWORD = "bench new password, battery staple"  # A-RESET and A-CHANGE set this one
PROVIDER = "bench"  # A-AUTHORIZE's sign-in provider
REFRESH_TTL = timedelta(days=30)
MAIL_TOKEN_TTL = timedelta(hours=24)
CODE_TTL = timedelta(days=30)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}

Kind = Literal["authenticated read", "public read", "write"]


@dataclass(frozen=True)
class EndpointScenario:
    """A scenario of this module: scenarios.py's Scenario fields."""

    key: str
    title: str
    service: str  # auth | referral: whose CPU is the service's
    expect_status: int
    kind: Kind
    password_hashing: bool = False
    min_seconds: int = 0  # the shortest run that sees answers (two hashes queued per connection)


SCENARIOS: tuple[EndpointScenario, ...] = (
    EndpointScenario("R-CODE-ME", "GET /codes/me: my active code", "referral", 200, AUTH_READ),
    EndpointScenario("R-CODE-CREATE", "POST /codes: a new code (201 each)", "referral", 201, WRITE),
    EndpointScenario(
        "R-CODE-CREATE-REPLAY", "POST /codes replayed (201 from the kept answer)", "referral", 201, WRITE
    ),
    EndpointScenario("R-CODE-DELETE", "DELETE /codes/me (204 each)", "referral", 204, WRITE),
    EndpointScenario("A-JWKS", "GET /.well-known/jwks.json", "auth", 200, PUBLIC_READ),
    EndpointScenario("A-DISCOVERY", "GET /.well-known/openid-configuration", "auth", 200, PUBLIC_READ),
    EndpointScenario(
        "A-AUTHORIZE", "GET /oauth/bench/authorize (302 to the provider)", "auth", 302, PUBLIC_READ
    ),
    EndpointScenario("A-SESSIONS", "GET /sessions (3 live logins each)", "auth", 200, AUTH_READ),
    EndpointScenario("A-EXPORT", "GET /me/export (asks the referral service)", "auth", 200, AUTH_READ),
    EndpointScenario("A-SIGNUP", "POST /signup (argon2id, a verification mail)", "auth", 201, WRITE, True),
    EndpointScenario(
        "A-SIGNUP-REPLAY", "POST /signup replayed (201 from the kept answer)", "auth", 201, WRITE
    ),
    EndpointScenario("A-REVOKE", "POST /revoke: a live refresh token's login", "auth", 200, WRITE),
    EndpointScenario("A-VERIFY-REQUEST", "POST /email/verification (a mail each)", "auth", 202, WRITE),
    EndpointScenario("A-VERIFY", "POST /email/verify: a mailed token", "auth", 200, WRITE),
    EndpointScenario("A-FORGOT", "POST /password/forgot (a reset mail each)", "auth", 202, WRITE),
    EndpointScenario("A-RESET", "POST /password/reset (argon2id, a new login)", "auth", 200, WRITE, True),
    EndpointScenario("A-CHANGE", "POST /password/change (argon2id x2)", "auth", 204, WRITE, True, 8),
    EndpointScenario("A-SESSION-DELETE", "DELETE /sessions/{id}: one login ended", "auth", 204, WRITE),
    EndpointScenario(
        "A-ERASE", "DELETE /me: erasure (argon2id check, deny-list, referral part)", "auth", 204, WRITE, True
    ),
    EndpointScenario("A-SIGNOUT-ALL", "DELETE /sessions: 2 logins ended at once", "auth", 204, WRITE),
    EndpointScenario(
        "WEBHOOK-RELAY",
        "activations with webhooks on (referral.created to a local receiver)",
        "referral",
        201,
        WRITE,
    ),
)
BY_KEY = {s.key: s for s in SCENARIOS}
WEBHOOK_RELAY = "WEBHOOK-RELAY"
DRAIN_TIMEOUT = 120.0  # s after a WEBHOOK-RELAY run for the relay to deliver what the run wrote
DRAIN_POLL = 0.3
# The once-only writes: a run's subjects are made for it (`Subjects`), at the rate it may reach.
ONCE = frozenset(
    {
        "R-CODE-CREATE",
        "R-CODE-DELETE",
        "A-SIGNUP",
        "A-REVOKE",
        "A-VERIFY-REQUEST",
        "A-VERIFY",
        "A-FORGOT",
        "A-RESET",
        "A-CHANGE",
        "A-SESSION-DELETE",
        "A-SIGNOUT-ALL",
        "A-ERASE",
    }
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fresh_email(tag: str, n: int, run: str) -> str:
    """An address no one has: the tag, a number and the run's mark."""
    return f"bench.{tag}{n}.{run}@example.com"


def new_code() -> str:
    """A code in the service's alphabet (`codes_code_format`), random enough to never collide."""
    return "".join(secrets.choice(ALPHABET) for _ in range(16))


# --- subjects: rows written straight into the benchmark's database ------------------------------


@dataclass(frozen=True)
class Subject:
    """A user made for one request: id, address, and (when it has one) a secret the request carries:
    a mail token, a refresh token, or a session (refresh-token family) id."""

    user: uuid.UUID
    email: str
    secret: str = ""
    sessions: tuple[uuid.UUID, ...] = ()


def _copy(cursor: Any, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    text = io.StringIO()
    count = 0
    for row in rows:
        text.write("\t".join("\\N" if v is None else str(v) for v in row) + "\n")
        count += 1
    text.seek(0)
    cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", text)
    return count


def _bytea(digest: bytes) -> str:
    return "\\\\x" + digest.hex()  # COPY text format: the backslash doubled


class Subjects:
    """Writes the subjects of once-only runs (each used by one request in the whole benchmark)."""

    def __init__(self, database_url: str, password_hash: str) -> None:
        self.database_url = database_url
        self.password_hash = password_hash
        self.made = 0

    @classmethod
    def of(cls, database_url: str, login_email: str) -> Subjects:
        """Subjects whose password is the dataset's (its one hash, read from a dataset user's row)."""
        with contextlib.closing(psycopg2.connect(database_url)) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT password_hash FROM auth.users WHERE lower(email) = lower(%s)", (login_email,)
            )
            row = cursor.fetchone()
        if row is None or not row[0]:
            raise HarnessError(f"the dataset user {login_email} has no password hash")
        return cls(database_url, str(row[0]))

    def make(
        self,
        count: int,
        tag: str,
        *,
        verified: bool = True,
        mail_token: str | None = None,  # purpose: verify_email / reset_password
        sessions: int = 0,
        refresh_token: bool = False,
        referral: Literal["", "verified", "code"] = "",
    ) -> list[Subject]:
        """`count` new users (auth.users, the dataset's password) and what the requests need of them."""
        run = secrets.token_hex(4)
        now = datetime.now(UTC)
        subjects: list[Subject] = []
        users: list[tuple[object, ...]] = []
        tokens: list[tuple[object, ...]] = []
        families: list[tuple[object, ...]] = []
        for n in range(count):
            user, email = uuid.uuid4(), fresh_email(tag, n, run)
            secret = ""
            ids: list[uuid.UUID] = []
            users.append((user, email, self.password_hash, "t" if verified else "f", now.isoformat()))
            if mail_token is not None:
                secret = secrets.token_urlsafe(32)
                expires = (now + MAIL_TOKEN_TTL).isoformat()
                tokens.append((_bytea(hash_mail_token(secret)), user, mail_token, email, expires))
            for _ in range(sessions):
                family = uuid.uuid4()
                raw = secrets.token_urlsafe(32)
                ids.append(family)
                if refresh_token:
                    secret = raw
                families.append(
                    (
                        uuid.uuid4(),
                        _bytea(hash_refresh_token(raw)),
                        user,
                        family,
                        (now + REFRESH_TTL).isoformat(),
                        now.isoformat(),
                        "wrk (benchmark)",
                        "127.0.0.1",
                    )
                )
            subjects.append(Subject(user, email, secret, tuple(ids)))
        with contextlib.closing(psycopg2.connect(self.database_url)) as conn, conn, conn.cursor() as cursor:
            columns = ("id", "email", "password_hash", "email_verified", "created_at")
            _copy(cursor, "auth.users", columns, users)
            if tokens:
                columns = ("token_hash", "user_id", "purpose", "email", "expires_at")
                _copy(cursor, "auth.mail_tokens", columns, tokens)
            if families:
                columns = (
                    "id",
                    "token_hash",
                    "user_id",
                    "family_id",
                    "expires_at",
                    "login_at",
                    "user_agent",
                    "address",
                )
                _copy(cursor, "auth.refresh_tokens", columns, families)
            if referral:
                _copy(cursor, "referral.verified_users", ("user_id",), ((s.user,) for s in subjects))
            if referral == "code":
                expires = (now + CODE_TTL).isoformat()
                columns = ("code", "owner_id", "owner_email", "expires_at")
                _copy(
                    cursor,
                    "referral.codes",
                    columns,
                    ((new_code(), s.user, s.email, expires) for s in subjects),
                )
        self.made += count
        return subjects


# --- A-AUTHORIZE's provider: a discovery document on 127.0.0.1 ----------------------------------


class DiscoveryServer:
    """Serves an OpenID Connect discovery document (and nothing else) on 127.0.0.1, from a thread.

    The auth service reads it once (on the first /authorize) and keeps it; its endpoints are never
    called by the benchmark (the 302 only names the authorization endpoint)."""

    def __init__(self) -> None:
        document: dict[str, Any] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/.well-known/openid-configuration":
                    self.send_error(404)
                    return
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        document.update(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bench-discovery", daemon=True
        )
        self._thread.start()

    def settings(self) -> dict[str, str]:
        """The auth instances' variables that configure the provider."""
        name = PROVIDER.upper()
        return {
            "AUTH_OAUTH_PROVIDERS": PROVIDER,
            f"AUTH_OAUTH_{name}_ISSUER": self.issuer,
            f"AUTH_OAUTH_{name}_CLIENT_ID": "bench-client",
            f"AUTH_OAUTH_{name}_CLIENT_SECRET": secrets.token_urlsafe(16),
        }

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --- WEBHOOK-RELAY: a receiver, the settings, the deliveries ------------------------------------


class WebhookReceiver:
    """An aiohttp server on 127.0.0.1 in a thread of its own: 204 to every POST, counted."""

    def __init__(self) -> None:
        import asyncio  # here: only WEBHOOK-RELAY needs a loop of the benchmark's own

        from aiohttp import web

        self.received = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._runner: web.AppRunner | None = None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self.port = int(listener.getsockname()[1])

        async def receive(request: web.Request) -> web.Response:
            await request.read()
            with self._lock:
                self.received += 1
            return web.Response(status=204)

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/hook", receive)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, listener).start()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="bench-webhooks", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise HarnessError("the webhook receiver did not start")
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def settings(self) -> dict[str, str]:
        """Both services' webhook variables: every event to this receiver."""
        import base64

        secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        found: dict[str, str] = {}
        for prefix in ("AUTH_", "REFERRAL_"):
            found[f"{prefix}WEBHOOK_URLS"] = self.url
            found[f"{prefix}WEBHOOK_SECRET"] = secret
            found[f"{prefix}WEBHOOK_ALLOW_PRIVATE"] = "true"
        return found

    def stop(self) -> None:
        import asyncio

        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def delivered(urls: Sequence[str], prefix: str = "referral") -> int:
    """`<prefix>_webhook_deliveries_total{outcome="delivered"}` summed over the processes' /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=5.0) as response:
            text = response.read().decode("utf-8", errors="replace")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == f"{prefix}_webhook_deliveries_total"
                    and sample.labels.get("outcome") == "delivered"
                ):
                    total += sample.value
    return int(total)


@dataclass
class WebhookMeter:
    """One WEBHOOK-RELAY run's deliveries: `start` before wrk, `finish` after it."""

    urls: list[str]  # the referral instances' own origins
    cpu: Callable[[], float]  # the referral processes' CPU seconds so far
    started: float = 0.0
    delivered_before: int = 0

    def start(self) -> None:
        self.delivered_before = delivered(self.urls)
        self.started = time.monotonic()

    def finish(self, events: int) -> dict[str, float]:
        """Wait until `events` more deliveries were counted (HarnessError after DRAIN_TIMEOUT); the
        figures: deliveries/s, relay CPU µs per delivery after wrk stopped, and their counts."""
        wrk_done, cpu_then = time.monotonic(), self.cpu()
        at_wrk_end = delivered(self.urls) - self.delivered_before
        count, previous = at_wrk_end, -1
        # Every answered activation's event, and then those of the requests still in flight when wrk
        # stopped (answered, but not counted by wrk): until the count stays put for a poll.
        while count < events or count != previous:
            if time.monotonic() - wrk_done > DRAIN_TIMEOUT:
                raise HarnessError(
                    f"{WEBHOOK_RELAY}: {count} of {events} events delivered"
                    f" {DRAIN_TIMEOUT:.0f}s after the run"
                )
            time.sleep(DRAIN_POLL)
            previous, count = count, delivered(self.urls) - self.delivered_before
        finished = time.monotonic()
        after = count - at_wrk_end
        return {
            "events": float(events),
            "deliveries": float(count),
            "deliveries_per_s": count / (finished - self.started),
            "drain_s": finished - wrk_done,
            "delivered_after_wrk": float(after),
            "relay_cpu_us_per_delivery": (self.cpu() - cpu_then) * 1e6 / after if after else math.nan,
        }


# --- the plans -------------------------------------------------------------------------------------


@dataclass
class EndpointPlan:
    """One wrk run: the script, its arguments, a note to log (runplans.py's RunPlan)."""

    script: Path
    args: list[str]
    note: str = ""


class Endpoints:
    """What the endpoint scenarios keep over the whole benchmark: the subjects' writer, the fastest
    run of each once-only scenario (to size the next run's subjects), the provider's server."""

    def __init__(self, database_url: str, login_email: str | None, keys: Sequence[str]) -> None:
        self.database_url = database_url
        self.login_email = login_email
        self.rates: dict[str, list[float]] = {}
        self.exhausted: dict[str, int] = {}
        self.discovery = DiscoveryServer() if "A-AUTHORIZE" in keys else None
        self.receiver: WebhookReceiver | None = None
        self._subjects: Subjects | None = None

    def topology_groups(self, keys: Sequence[str]) -> list[tuple[dict[str, str], list[str]]]:
        """The pass's topologies, in order: extra settings and the scenarios that run on each (the
        usual one first; WEBHOOK-RELAY's, with webhooks on, last)."""
        groups: list[tuple[dict[str, str], list[str]]] = []
        if usual := [key for key in keys if key != WEBHOOK_RELAY]:
            groups.append(({}, usual))
        if WEBHOOK_RELAY in keys:
            if self.receiver is None:
                self.receiver = WebhookReceiver()
            groups.append((self.receiver.settings(), [WEBHOOK_RELAY]))
        return groups

    def auth_settings(self) -> dict[str, str]:
        return self.discovery.settings() if self.discovery is not None else {}

    def subjects(self) -> Subjects:
        if self._subjects is None:
            if not self.login_email:
                raise HarnessError("the dataset has no login emails (their password hash is the subjects')")
            self._subjects = Subjects.of(self.database_url, self.login_email)
        return self._subjects

    def record(self, key: str, rps: float) -> None:
        self.rates.setdefault(key, []).append(rps)

    def expected_rate(self, key: str, ceiling: Sequence[float]) -> tuple[float, str]:
        """The rate a once-only run of `key` may reach, and where the figure comes from."""
        fastest = max(self.rates.get(key, []), default=0.0)
        if BY_KEY[key].password_hashing:
            # A short argon2-bound run answers little more than its first wave (seconds late): its
            # rate says little of the next run's, and these subjects are few and cheap.
            if fastest * ONCE_SLACK > HASHING_FIRST_GUESS:
                return fastest * ONCE_SLACK, f"{ONCE_SLACK:g} x its fastest run so far"
            return HASHING_FIRST_GUESS, "the floor for argon2-bound writes"
        if fastest > 0:
            return fastest * ONCE_SLACK, f"{ONCE_SLACK:g} x its fastest run so far"
        if ceiling:
            return max(ceiling), "the S0 ceiling"
        return FIRST_GUESS, "a first guess"

    def close(self) -> None:
        if self.discovery is not None:
            self.discovery.stop()
        if self.receiver is not None:
            self.receiver.stop()


def once_count(rate: float, seconds: int, connections: int) -> int:
    """Subjects for a once-only run: what `rate` sends in `seconds`, plus one per connection."""
    return math.ceil(rate * seconds) + connections


def _expires_at(days: int = 30) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat(timespec="seconds")


def once_requests(
    key: str, subjects: Sequence[Subject], issue: Callable[..., str], password: str
) -> Iterator[wrk.Request]:
    """The requests of a once-only run of `key`: one per subject. `issue(user, email=, email_verified=,
    session_id=)` signs an access token; `password` is the subjects' (the dataset's)."""
    for s in subjects:
        if key == "R-CODE-CREATE":
            token = issue(s.user, email=s.email, email_verified=True)
            body = json.dumps({"expires_at": _expires_at()})
            yield wrk.Request("POST", f"{REFERRAL_API}/codes", {**bearer(token), **JSON}, body)
        elif key == "R-CODE-DELETE":
            token = issue(s.user, email=s.email, email_verified=True)
            yield wrk.Request("DELETE", f"{REFERRAL_API}/codes/me", bearer(token))
        elif key == "A-SIGNUP":
            body = json.dumps({"email": s.email, "password": NEW_PASSWORD})
            yield wrk.Request("POST", f"{AUTH_API}/signup", JSON, body)
        elif key == "A-REVOKE":
            yield wrk.Request("POST", f"{AUTH_API}/revoke", FORM, urllib.parse.urlencode({"token": s.secret}))
        elif key == "A-VERIFY-REQUEST":
            token = issue(s.user, email=s.email, email_verified=False)
            yield wrk.Request("POST", f"{AUTH_API}/email/verification", bearer(token))
        elif key == "A-VERIFY":
            yield wrk.Request("POST", f"{AUTH_API}/email/verify", JSON, json.dumps({"token": s.secret}))
        elif key == "A-FORGOT":
            yield wrk.Request("POST", f"{AUTH_API}/password/forgot", JSON, json.dumps({"email": s.email}))
        elif key == "A-RESET":
            body = json.dumps({"token": s.secret, "password": NEW_PASSWORD})
            yield wrk.Request("POST", f"{AUTH_API}/password/reset", JSON, body)
        elif key == "A-CHANGE":
            token = issue(s.user, email=s.email, email_verified=True, session_id=s.sessions[0])
            body = json.dumps({"current_password": password, "new_password": NEW_PASSWORD})
            yield wrk.Request("POST", f"{AUTH_API}/password/change", {**bearer(token), **JSON}, body)
        elif key == "A-SESSION-DELETE":
            token = issue(s.user, email=s.email, email_verified=True, session_id=s.sessions[0])
            yield wrk.Request("DELETE", f"{AUTH_API}/sessions/{s.sessions[0]}", bearer(token))
        elif key == "A-ERASE":
            token = issue(s.user, email=s.email, email_verified=True, session_id=s.sessions[0])
            body = json.dumps({"password": password})
            yield wrk.Request("DELETE", f"{AUTH_API}/me", {**bearer(token), **JSON}, body)
        elif key == "A-SIGNOUT-ALL":
            token = issue(s.user, email=s.email, email_verified=True, session_id=s.sessions[0])
            yield wrk.Request("DELETE", f"{AUTH_API}/sessions", bearer(token))
        else:
            raise HarnessError(f"{key} is not a once-only scenario")


# What each once-only scenario's subjects need (Subjects.make's keywords, but count and tag).
SUBJECT_SHAPES: dict[str, dict[str, Any]] = {
    "R-CODE-CREATE": {"referral": "verified"},
    "R-CODE-DELETE": {"referral": "code"},
    "A-SIGNUP": {},  # nobody: signups make their own users; the addresses only
    "A-REVOKE": {"sessions": 1, "refresh_token": True},
    "A-VERIFY-REQUEST": {"verified": False},
    "A-VERIFY": {"verified": False, "mail_token": "verify_email"},
    "A-FORGOT": {},
    "A-RESET": {"mail_token": "reset_password"},
    "A-CHANGE": {"sessions": 1},
    "A-SESSION-DELETE": {"sessions": 1},
    "A-SIGNOUT-ALL": {"sessions": SIGNOUT_SESSIONS},
    "A-ERASE": {"sessions": 1},
}


class PassPlans:
    """One pass's request files for the endpoint scenarios (runplans.PassContext.plan hands over)."""

    def __init__(self, context: PassContext, endpoints: Endpoints) -> None:
        self.context = context
        self.endpoints = endpoints
        self.files: dict[str, Path] = {}

    def _issue(
        self,
        user: uuid.UUID,
        *,
        email: str | None,
        email_verified: bool = True,
        session_id: uuid.UUID | None = None,
    ) -> str:
        return self.context.issuer.issue(
            user, email=email, email_verified=email_verified, session_id=session_id
        ).token

    def _log(self, message: str) -> None:
        self.context.bench.log(f"{self.context.topology.instances}x {message}")

    def _cycle(self, key: str, requests: Callable[[], Iterable[wrk.Request]]) -> Path:
        if key not in self.files:
            path = self.context.dir / f"{key}.txt"
            if wrk.write_requests(path, requests()) == 0:
                raise HarnessError(f"{key}: no requests to send (the dataset has none)")
            self.files[key] = path
        return self.files[key]

    def meter(self, key: str) -> WebhookMeter | None:
        """What measures a run's webhook deliveries (WEBHOOK-RELAY only)."""
        if key != WEBHOOK_RELAY:
            return None
        referral = self.context.topology.referral

        def cpu() -> float:
            ticks = (topologies.cpu_ticks(process.pid) for process in referral)
            return sum(t for t in ticks if t is not None) / topologies.CLOCK_TICKS

        return WebhookMeter([process.url for process in referral], cpu)

    def plan(self, key: str, phase: str, seconds: int) -> EndpointPlan:
        scenario = BY_KEY[key]
        if key in ONCE:
            return self._once(scenario, phase, seconds)
        path = self._cycle(key, lambda: self._cycle_requests(key))
        return EndpointPlan(
            wrk.requests_script(), wrk.requests_args(path, mode="cycle", expect=scenario.expect_status)
        )

    def _cycle_requests(self, key: str) -> Iterable[wrk.Request]:
        dataset = self.context.bench.dataset
        if key == "R-CODE-ME":
            users = dataset.token_users
            return (
                wrk.Request("GET", f"{REFERRAL_API}/codes/me", bearer(self._issue(u, email=e)))
                for u, e in users
            )
        if key == "A-EXPORT":
            users = dataset.token_users
            return (
                wrk.Request("GET", f"{AUTH_API}/me/export", bearer(self._issue(u, email=e))) for u, e in users
            )
        if key == "A-JWKS":
            return [wrk.Request("GET", f"{AUTH_API}/.well-known/jwks.json")] * COPIES
        if key == "A-DISCOVERY":
            return [wrk.Request("GET", f"{AUTH_API}/.well-known/openid-configuration")] * COPIES
        if key == "A-AUTHORIZE":
            if self.endpoints.discovery is None:
                raise HarnessError("A-AUTHORIZE: no provider configured (the benchmark's discovery server)")
            return [wrk.Request("GET", f"{AUTH_API}/oauth/{PROVIDER}/authorize")] * COPIES
        if key == "A-SESSIONS":
            made = self.endpoints.subjects().make(SESSION_USERS, "sessions", sessions=SESSIONS_PER_USER)
            return (
                wrk.Request(
                    "GET",
                    f"{AUTH_API}/sessions",
                    bearer(self._issue(s.user, email=s.email, session_id=s.sessions[0])),
                )
                for s in made
            )
        if key in ("A-SIGNUP-REPLAY", "R-CODE-CREATE-REPLAY"):
            return self._replays(key)
        raise HarnessError(f"no plan for scenario {key}")

    def _replays(self, key: str) -> list[wrk.Request]:
        """Keyed requests, each sent once through the gateway first (201), to be replayed."""
        if key == "A-SIGNUP-REPLAY":
            run = secrets.token_hex(4)
            requests = [
                wrk.Request(
                    "POST",
                    f"{AUTH_API}/signup",
                    {**JSON, "Idempotency-Key": f"bench-signup-{run}-{n}"},
                    json.dumps({"email": fresh_email("replay", n, run), "password": NEW_PASSWORD}),
                )
                for n in range(SIGNUP_REPLAY_KEYS)
            ]
        else:
            made = self.endpoints.subjects().make(REPLAY_KEYS, "codereplay", referral="verified")
            requests = [
                wrk.Request(
                    "POST",
                    f"{REFERRAL_API}/codes",
                    {
                        **bearer(self._issue(s.user, email=s.email)),
                        **JSON,
                        "Idempotency-Key": f"bench-{s.user}",
                    },
                    json.dumps({"expires_at": _expires_at()}),
                )
                for s in made
            ]
        from tests.perf.runplans import send_once  # here: runplans.py imports this module

        started = time.monotonic()
        gateway = self.context.topology.gateway_url
        with concurrent.futures.ThreadPoolExecutor(SETUP_WORKERS) as pool:
            list(pool.map(lambda request: send_once(gateway, request, 201), requests))
        self._log(
            f"{key}: {len(requests)} keyed requests made in {time.monotonic() - started:.1f}s, to be replayed"
        )
        return requests

    def _once(self, scenario: EndpointScenario, phase: str, seconds: int) -> EndpointPlan:
        key = scenario.key
        options = self.context.bench.options
        rate, source = self.endpoints.expected_rate(key, self.context.rates.get("S0", []))
        wanted = once_count(rate, seconds, options.connections)
        shape = SUBJECT_SHAPES[key]
        started = time.monotonic()
        if key in ("A-SIGNUP",):
            run = secrets.token_hex(4)
            subjects = [Subject(uuid.uuid4(), fresh_email("signup", n, run)) for n in range(wanted)]
        else:
            subjects = self.endpoints.subjects().make(wanted, key.lower().replace("-", ""), **shape)
        path = self.context.dir / f"{key}-{phase.replace(' ', '')}.txt"
        password = self.context.bench.dataset.password
        wrk.write_requests(path, once_requests(key, subjects, self._issue, password))
        note = (
            f"{wanted:,} subjects (up to {rate:,.0f} req/s: {source}; + connections),"
            f" made in {time.monotonic() - started:.1f}s"
        )
        args = wrk.requests_args(path, mode="once", expect=scenario.expect_status)
        return EndpointPlan(wrk.requests_script(), args, note)
