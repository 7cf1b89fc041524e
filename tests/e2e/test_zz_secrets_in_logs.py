"""No log of the run carries a secret the run used. Named to run last in tests/e2e.

pytest collects a directory's files in name order (the repository has no random-order plugin and
no `-p random` in its options), so this file runs after every other e2e test, while the stack still
runs, and scans every log the harness keeps under `.artifacts/e2e/` (each service instance,
both nginx gateways with their access and error logs, the migrations) for every secret in the
registry of `tests/e2e/secrets.py`: the passwords, access and refresh tokens the helpers of
`tests/e2e/api.py` recorded for every test, the JWT signing key (its PEM lines and private
numbers), and every API key, client secret or password the harness handed to a process in its
environment. A leak is reported as file:line and the kind of secret, with only a prefix of it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.e2e import secrets as run_secrets
from tests.e2e.api import ME, REVOKE, bearer, password_grant, token
from tests.e2e.conftest import ARTIFACTS

SECRET_ENV = re.compile(r"(API_KEY|CLIENT_SECRET|SECRET_KEY|PASSWORD|PRIVATE_KEY|TOKEN)", re.IGNORECASE)


def _register_stack_secrets(stack) -> None:
    run_secrets.record_private_key("JWT signing key", stack.signing_pem)
    for process in [*stack.auth, *stack.referral, *stack.gateways]:
        for name, value in process.env.items():
            if not value:
                continue
            if "PRIVATE_KEYS" in name and "BEGIN" in value:
                run_secrets.record_private_key(f"${name}", value)
            elif SECRET_ENV.search(name):
                run_secrets.record(f"${name} of {process.name}", value)
            elif name.endswith("_URL") and (password := urlsplit(value).password):
                run_secrets.record(f"password in ${name}", password)


def _logs() -> list[tuple[str, str]]:
    files = sorted(path for path in ARTIFACTS.iterdir() if path.is_file() and path.suffix == ".log")
    return [(path.name, path.read_text(errors="replace")) for path in files]


async def test_a_last_journey_leaves_secrets_to_find(stack, gateway, make_account):
    """Whatever ran before, the registry holds every kind of secret that crossed the system."""
    account = await make_account("log-scan")
    granted = await password_grant(gateway, account)
    refreshed = await token(gateway, grant_type="refresh_token", refresh_token=granted["refresh_token"])
    assert refreshed.status == 200, await refreshed.text()
    new = await refreshed.json()
    assert (await gateway.get(ME, headers=bearer(new["access_token"]))).status == 200
    revoked = await gateway.post(REVOKE, data={"token": new["refresh_token"]})
    assert revoked.status == 200, await revoked.text()
    _register_stack_secrets(stack)
    registry = run_secrets.recorded()
    for value in (account.password, account.access_token, account.refresh_token, *granted.values()):
        if isinstance(value, str) and len(value) >= run_secrets.MIN_LENGTH:
            assert value in registry, f"{run_secrets.prefix(value)} was not recorded"
    kinds = run_secrets.kinds()
    for kind in ("password", "access_token", "refresh_token", "JWT signing key (d, base64url)"):
        assert kind in kinds, (kind, sorted(kinds))
    assert any(kind.startswith("JWT signing key (PEM line)") for kind in kinds)


def test_the_scan_finds_a_planted_secret_in_every_form(tmp_path: Path):
    """The scan can fail: secrets planted as logs would write them are found, by file and line."""
    planted = {
        'correct horse ünïcode "quoted" \\ battery': "password",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQtb25lLXR3bw": "access_token",
        "Zk9vQmFyX3JlZnJlc2hfdG9rZW5fMzJieXRlcw": "refresh_token",
    }
    password, jwt, refresh = planted
    lines = [
        '{"message": "ok", "path": "/api/v1/auth/me"}',
        '{"message": "login", "password": "' + password.replace("\\", "\\\\").replace('"', '\\"') + '"}',
        "ascii-escaped: " + '"correct horse \\u00fcn\\u00efcode \\"quoted\\" \\\\ battery"',
        f'{{"path": "/cb?token={refresh}"}}',
        '{"authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXBhcnQtb25lLXR3bw"}',
        "cut short: ...c2lnbmF0dXJlLXBhcnQtb25lLXR3bw",
        "a form body: password=correct+horse+%C3%BCn%C3%AFcode+%22quoted%22+%5C+battery",
        '{"message": "nothing here"}',
    ]
    log = tmp_path / "planted.log"
    log.write_text("\n".join(lines) + "\n")
    registry = dict(planted)
    registry[jwt.rsplit(".", 1)[1]] = "access_token (signature)"
    leaks = run_secrets.find_leaks([(log.name, log.read_text())], registry)
    found_lines = sorted({int(leak.split(":")[1]) for leak in leaks})
    assert found_lines == [2, 3, 4, 5, 6, 7], leaks
    report = "\n".join(leaks)
    for secret in [*planted, jwt.rsplit(".", 1)[1]]:
        assert secret not in report, "a report must show only a prefix of a secret"
    assert "planted.log:2: password 'correc...'" in report, report
    # And through the real registry: a recorded value is found.
    value = f"planted-{time.time_ns()}-secret"
    run_secrets.record("password", value)
    assert run_secrets.find_leaks([("x.log", f"a\nb {value} c\n")], {value: "password"}) == [
        "x.log:2: password 'plante...'"
    ]


def test_no_log_of_the_run_holds_a_secret(stack):
    _register_stack_secrets(stack)
    logs = _logs()
    names = {name for name, _ in logs}
    expected = {f"{process.name}.log" for process in [*stack.auth, *stack.referral, *stack.gateways]}
    assert expected <= names, f"logs missing: {sorted(expected - names)}"
    assert any('"service": "gateway"' in text for _, text in logs), "the nginx access log is not in the scan"
    registry = {v: k for v, k in run_secrets.recorded().items() if not v.startswith("planted-")}
    assert len(registry) > 10, registry.keys()
    leaks = run_secrets.find_leaks(logs, registry)
    assert not leaks, (
        f"{len(leaks)} secrets in the logs under {ARTIFACTS} "
        f"(scanned {len(logs)} files for {len(registry)} secrets):\n" + "\n".join(leaks)
    )
