"""The endpoint scenarios (tests/perf/endpoints.py): their table and classes, the once-only requests,
the subjects written into a migrated database, the provider's discovery server, the class targets."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from deploy.local.processes import AUTH_API, REFERRAL_API
from services.auth.domain.ownership import hash_mail_token
from services.auth.domain.use_cases import hash_refresh_token
from tests import harness
from tests.helpers import fresh_database
from tests.perf import bench, endpoints, scenarios, wrk
from tests.perf.endpoints import (
    BY_KEY,
    ONCE,
    SCENARIOS,
    SUBJECT_SHAPES,
    DiscoveryServer,
    Endpoints,
    Subject,
    Subjects,
    once_count,
    once_requests,
)
from tests.perf.report import AUTH_READ, PUBLIC_READ, WRITE, Pass, class_targets, read_json, write_json
from tests.perf.test_report import bench as report_of
from tests.perf.test_report import one_instance, scenario

ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "perf-tests"
# The keys the README cites: they stay as they are.
CITED = ("S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S-STATS", "S-LEADERBOARD")


def test_every_endpoint_scenario_is_registered_and_classified() -> None:
    keys = [s.key for s in SCENARIOS]
    assert len(keys) == len(set(keys))
    assert not set(keys) & set(CITED)
    assert list(scenarios.SCENARIOS)[: len(CITED)] == list(CITED)
    for key in keys:
        registered = scenarios.SCENARIOS[key]
        assert registered.kind in (AUTH_READ, PUBLIC_READ, WRITE)
        assert registered.service in ("auth", "referral")
        assert (registered.kind, registered.password_hashing) == (
            BY_KEY[key].kind,
            BY_KEY[key].password_hashing,
        )
    for key in CITED:
        assert scenarios.SCENARIOS[key].kind in (AUTH_READ, PUBLIC_READ, WRITE)
    hashing = {key for key, s in scenarios.SCENARIOS.items() if s.password_hashing}
    assert hashing == {"S8", "A-SIGNUP", "A-RESET", "A-CHANGE", "A-ERASE", "MIX"}  # MIX: its signups
    assert scenarios.SCENARIOS["A-CHANGE"].min_seconds > scenarios.S8_MIN_SECONDS  # two hashes per request
    assert set(keys) >= ONCE
    assert set(SUBJECT_SHAPES) == ONCE
    # Every read is a read of someone's or of no one's: a token or none.
    assert {scenarios.SCENARIOS[k].kind for k in ("S3", "S5", "R-CODE-ME", "A-SESSIONS", "A-EXPORT")} == {
        AUTH_READ
    }
    assert {scenarios.SCENARIOS[k].kind for k in ("S1", "A-JWKS", "A-DISCOVERY", "A-AUTHORIZE")} == {
        PUBLIC_READ
    }


def test_the_new_scenarios_can_be_chosen_on_the_command_line() -> None:
    options = bench.parse_args(["--smoke", "--scenarios", "a-jwks,R-CODE-ME,S1"])
    assert options.scenarios == ("S1", "R-CODE-ME", "A-JWKS")  # in the table's order


def test_the_smoke_runs_the_endpoint_scenarios_in_its_first_pass_only() -> None:
    smoke = bench.parse_args(["--smoke", "--scenarios", "S0,A-JWKS,WEBHOOK-RELAY"])
    assert bench.pass_scenarios(smoke, 0) == ("S0", "A-JWKS", "WEBHOOK-RELAY")
    assert bench.pass_scenarios(smoke, 1) == ("S0",)
    full = bench.parse_args(["--scenarios", "S0,A-JWKS"])
    assert bench.pass_scenarios(full, 1) == ("S0", "A-JWKS")


def issue(user: uuid.UUID, **claims: Any) -> str:
    """A stand-in signer: the claims in the clear, so the test can read what was asked for."""
    return json.dumps({"sub": str(user), **{k: str(v) for k, v in claims.items()}}, sort_keys=True)


def subject(n: int) -> Subject:
    return Subject(
        uuid.UUID(int=n + 1),
        f"bench.s{n}@example.com",
        secret=f"secret-{n}",
        sessions=(uuid.UUID(int=1000 + n),),
    )


@pytest.mark.parametrize("key", sorted(ONCE))
def test_once_requests_one_per_subject(key: str, tmp_path: Path) -> None:
    subjects = [subject(n) for n in range(5)]
    requests = list(once_requests(key, subjects, issue, "the password"))

    assert len(requests) == len(subjects)
    path = tmp_path / "requests.txt"
    assert wrk.write_requests(path, requests) == 5
    assert wrk.read_requests(path) == requests  # every request survives the file
    assert len({(r.path, r.body, tuple(r.headers.items())) for r in requests}) == 5  # none twice
    first = requests[0]
    api = REFERRAL_API if BY_KEY[key].service == "referral" else AUTH_API
    assert first.path.startswith(api + "/")
    if first.body:
        assert first.headers["Content-Type"] in ("application/json", "application/x-www-form-urlencoded")


def test_once_requests_carry_what_the_endpoint_needs() -> None:
    s = subject(0)
    made = {key: next(once_requests(key, [s], issue, "pw")) for key in ONCE}

    assert json.loads(made["A-VERIFY"].body) == {"token": "secret-0"}
    assert json.loads(made["A-RESET"].body)["token"] == "secret-0"
    assert urllib.parse.parse_qs(made["A-REVOKE"].body) == {"token": ["secret-0"]}
    assert json.loads(made["A-FORGOT"].body) == {"email": s.email}
    assert json.loads(made["A-SIGNUP"].body)["email"] == s.email
    assert json.loads(made["A-CHANGE"].body)["current_password"] == "pw"
    assert made["A-SESSION-DELETE"].method == "DELETE"
    assert made["A-SESSION-DELETE"].path == f"{AUTH_API}/sessions/{s.sessions[0]}"
    assert made["A-SIGNOUT-ALL"].path == f"{AUTH_API}/sessions"
    assert (made["A-ERASE"].method, made["A-ERASE"].path) == ("DELETE", f"{AUTH_API}/me")
    assert json.loads(made["A-ERASE"].body) == {"password": "pw"}
    assert made["R-CODE-DELETE"].path == f"{REFERRAL_API}/codes/me"
    expiry = datetime.fromisoformat(json.loads(made["R-CODE-CREATE"].body)["expires_at"])
    assert expiry > datetime.now(UTC)
    # The verification request is the unverified user's own; the session's requests carry its sid.
    claims = json.loads(made["A-VERIFY-REQUEST"].headers["Authorization"].removeprefix("Bearer "))
    assert claims == {"sub": str(s.user), "email": s.email, "email_verified": "False"}
    claims = json.loads(made["A-SESSION-DELETE"].headers["Authorization"].removeprefix("Bearer "))
    assert claims["session_id"] == str(s.sessions[0])


def test_once_count_and_expected_rate() -> None:
    assert once_count(100.0, 4, 32) == 432
    assert once_count(0.5, 1, 8) == 9
    state = Endpoints("postgresql://unused", None, ())
    assert state.expected_rate("A-VERIFY", []) == (endpoints.FIRST_GUESS, "a first guess")
    assert state.expected_rate("A-VERIFY", [5000.0, 7000.0])[0] == 7000.0  # the S0 ceiling
    assert state.expected_rate("A-RESET", [5000.0])[0] == endpoints.HASHING_FIRST_GUESS
    state.record("A-RESET", 1.0)  # a short argon2-bound run: never below the floor
    assert state.expected_rate("A-RESET", [5000.0])[0] == endpoints.HASHING_FIRST_GUESS
    state.record("A-RESET", 50.0)
    assert state.expected_rate("A-RESET", [5000.0])[0] == 50.0 * endpoints.ONCE_SLACK
    state.record("A-VERIFY", 400.0)
    state.record("A-VERIFY", 500.0)
    assert state.expected_rate("A-VERIFY", [7000.0])[0] == 500.0 * endpoints.ONCE_SLACK
    with pytest.raises(Exception, match="no login emails"):
        state.subjects()


def test_discovery_server_serves_its_document_only() -> None:
    server = DiscoveryServer()
    try:
        url = server.issuer + "/.well-known/openid-configuration"
        with urllib.request.urlopen(url, timeout=5) as response:
            document = json.loads(response.read())
        assert document["issuer"] == server.issuer
        assert document["authorization_endpoint"].startswith(server.issuer + "/")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.issuer + "/elsewhere", timeout=5)
        assert refused.value.code == 404
        refused.value.close()
        settings = server.settings()
        assert settings["AUTH_OAUTH_PROVIDERS"] == endpoints.PROVIDER
        assert settings["AUTH_OAUTH_BENCH_ISSUER"] == server.issuer
    finally:
        server.stop()


# --- subjects in a real database -----------------------------------------------------------------

PASSWORD_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


@pytest.fixture(scope="module")
def database(server_database_url: str) -> Iterator[str]:
    with fresh_database(server_database_url, f"perf_endpoints_{os.getpid()}") as url:
        harness.migrate(url, os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), ARTIFACTS)
        with contextlib.closing(psycopg2.connect(url)) as conn, conn, conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO auth.users (email, password_hash, email_verified) VALUES (%s, %s, true)",
                ("bench.login@example.com", PASSWORD_HASH),
            )
        yield url


def rows(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def test_subjects_take_the_dataset_password(database: str) -> None:
    assert Subjects.of(database, "BENCH.login@example.com").password_hash == PASSWORD_HASH
    with pytest.raises(Exception, match="no password hash"):
        Subjects.of(database, "nobody@example.com")


def test_subjects_with_mail_tokens_whose_raw_value_is_known(database: str) -> None:
    made = Subjects.of(database, "bench.login@example.com").make(
        3, "verify", verified=False, mail_token="verify_email"
    )

    assert len({s.email for s in made}) == 3
    for s in made:
        found = rows(
            database,
            "SELECT u.email, u.email_verified, u.password_hash, t.purpose, t.email, t.expires_at > now(),"
            " t.used_at"
            " FROM auth.users u JOIN auth.mail_tokens t ON t.user_id = u.id WHERE t.token_hash = %s",
            (hash_mail_token(s.secret),),
        )
        assert found == [(s.email, False, PASSWORD_HASH, "verify_email", s.email, True, None)]


def test_subjects_with_live_sessions(database: str) -> None:
    made = Subjects.of(database, "bench.login@example.com").make(
        2, "sessions", sessions=3, refresh_token=True
    )

    for s in made:
        assert len(set(s.sessions)) == 3
        live = rows(
            database,
            "SELECT family_id FROM auth.refresh_tokens"
            " WHERE user_id = %s AND rotated_at IS NULL AND revoked_at IS NULL AND expires_at > now()",
            (s.user,),
        )
        assert {str(row[0]) for row in live} == {str(family) for family in s.sessions}
        # The secret is the raw refresh token of one of them.
        owner = rows(
            database,
            "SELECT user_id FROM auth.refresh_tokens WHERE token_hash = %s",
            (hash_refresh_token(s.secret),),
        )
        assert [str(row[0]) for row in owner] == [str(s.user)]


def test_subjects_for_the_referral_service(database: str) -> None:
    subjects = Subjects.of(database, "bench.login@example.com")
    verified = subjects.make(2, "create", referral="verified")
    owners = subjects.make(2, "delete", referral="code")

    for s in verified:
        assert rows(
            database, "SELECT count(*) FROM referral.verified_users WHERE user_id = %s", (s.user,)
        ) == [(1,)]
        assert rows(database, "SELECT count(*) FROM referral.codes WHERE owner_id = %s", (s.user,)) == [(0,)]
    for s in owners:
        found = rows(
            database,
            "SELECT owner_email, deleted_at, expires_at > now() FROM referral.codes WHERE owner_id = %s",
            (s.user,),
        )
        assert found == [(s.email, None, True)]
    assert subjects.made == 4


# --- the class targets -----------------------------------------------------------------------------


def classified() -> Pass:
    single = one_instance()
    extra = [
        replace(scenario("R-CODE-ME", [2000] * 3, [190] * 3), kind=AUTH_READ),  # MET, p99 4 ms
        replace(scenario("A-EXPORT", [300] * 3, [1700] * 3, p50_ms=10.0, service="auth"), kind=AUTH_READ),
        replace(scenario("A-JWKS", [8000] * 3, [151] * 3, service="auth"), kind=PUBLIC_READ),  # MISSED
        replace(scenario("A-VERIFY", [500] * 3, [1200] * 3, p50_ms=2.0, service="auth"), kind=WRITE),
        replace(
            scenario("A-RESET", [5] * 3, [300_000] * 3, p50_ms=700.0, service="auth"),
            kind=WRITE,
            password_hashing=True,
        ),
    ]
    return replace(single, scenarios=[*single.scenarios, *extra])


def test_class_targets_per_scenario() -> None:
    found = {t.name: t for t in class_targets(classified())}

    assert found["R-CODE-ME service CPU (authenticated read)"].met is True
    assert found["A-EXPORT service CPU (authenticated read)"].met is False
    assert found["A-EXPORT p99"].met is False  # 40 ms
    assert found["A-JWKS service CPU (public read)"].met is False  # 151 > 150
    assert found["R-CODE-ME p99"].met is True
    assert "A-VERIFY service CPU (write)" not in str(found)  # writes: no CPU target
    assert found["A-VERIFY p99"].met is True  # 8 ms
    assert found["A-RESET p99"].met is None and "exempt" in found["A-RESET p99"].wanted
    assert class_targets(None) == []


def test_classes_survive_the_json(tmp_path: Path) -> None:
    report = report_of(classified())
    write_json(report, tmp_path / "report.json")
    again = read_json(tmp_path / "report.json")

    reset = next(s for s in again.passes[0].scenarios if s.key == "A-RESET")
    assert (reset.kind, reset.password_hashing) == (WRITE, True)
    assert {t.name for t in class_targets(again.passes[0])} == {
        t.name for t in class_targets(report.passes[0])
    }


# --- WEBHOOK-RELAY ---------------------------------------------------------------------------------


def test_webhook_relay_gets_a_topology_of_its_own() -> None:
    state = Endpoints("postgresql://unused", None, ())
    try:
        assert state.topology_groups(["S1", "A-JWKS"]) == [({}, ["S1", "A-JWKS"])]
        groups = state.topology_groups(["S1", endpoints.WEBHOOK_RELAY, "A-JWKS"])
        assert [keys for _, keys in groups] == [["S1", "A-JWKS"], [endpoints.WEBHOOK_RELAY]]
        assert groups[0][0] == {}  # webhooks stay off for every other scenario
        settings = groups[1][0]
        assert state.receiver is not None
        for prefix in ("AUTH_", "REFERRAL_"):
            assert settings[f"{prefix}WEBHOOK_URLS"] == state.receiver.url
            assert settings[f"{prefix}WEBHOOK_ALLOW_PRIVATE"] == "true"
            assert settings[f"{prefix}WEBHOOK_SECRET"].startswith("whsec_")
        assert [keys for _, keys in state.topology_groups([endpoints.WEBHOOK_RELAY])] == [
            [endpoints.WEBHOOK_RELAY]
        ]
    finally:
        state.close()


def test_webhook_receiver_answers_204_and_counts() -> None:
    receiver = endpoints.WebhookReceiver()
    try:
        for _ in range(3):
            request = urllib.request.Request(receiver.url, data=b'{"type": "x"}', method="POST")
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 204
        assert receiver.received == 3
    finally:
        receiver.stop()


class Metrics:
    """A /metrics page whose delivered counter the test moves (a real HTTP server on 127.0.0.1)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        self.delivered = 0
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    "# TYPE referral_webhook_deliveries_total counter\n"
                    f'referral_webhook_deliveries_total{{outcome="delivered"}} {metrics.delivered}.0\n'
                    'referral_webhook_deliveries_total{outcome="retry"} 7.0\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_meter_waits_for_every_event() -> None:
    metrics = Metrics()
    cpu = iter([1.0, 1.5])
    try:
        metrics.delivered = 10  # before the run
        meter = endpoints.WebhookMeter([metrics.url], lambda: next(cpu))
        meter.start()
        assert meter.delivered_before == 10
        metrics.delivered = 15  # 5 delivered during the run, 5 to come

        def later() -> None:
            time.sleep(0.5)
            metrics.delivered = 20

        thread = threading.Thread(target=later)
        thread.start()
        figures = meter.finish(10)
        thread.join()
        assert figures["deliveries"] == 10
        assert figures["delivered_after_wrk"] == 5
        assert figures["relay_cpu_us_per_delivery"] == pytest.approx(0.5e6 / 5)
        assert figures["deliveries_per_s"] > 0
        assert endpoints.delivered([metrics.url, metrics.url]) == 40  # summed over the instances
    finally:
        metrics.stop()
