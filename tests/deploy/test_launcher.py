"""The pure pieces of the launcher (deploy/local/run.py): ports, environments, commands; no processes."""

from __future__ import annotations

import contextlib
import smtplib
import sys
from pathlib import Path

import pytest

from deploy.local import run
from deploy.nginx.render import nginx_command

KEY = Path("/keys/dev.pem")
DB = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"
SMTP = "smtp://127.0.0.1:2525?starttls=off"


def envs(environ: dict[str, str], port: int = 8080) -> tuple[dict[str, str], dict[str, str]]:
    auth = run.auth_env(
        environ, database_url=DB, redis_url=REDIS, gateway_port=port, signing_key=KEY, smtp_url=SMTP
    )
    referral = run.referral_env(
        environ, database_url=DB, redis_url=REDIS, auth_public_base_url=auth["AUTH_PUBLIC_BASE_URL"]
    )
    return auth, referral


def test_gateway_port() -> None:
    assert run.gateway_port({}) == 8080
    assert run.gateway_port({"PORT": ""}) == 8080
    assert run.gateway_port({"PORT": " 9000 "}) == 9000


@pytest.mark.parametrize("raw", ["http", "-1", "0", "65536", "80.5", "8081", "8082"])
def test_gateway_port_refuses(raw: str) -> None:
    with pytest.raises(SystemExit, match="PORT"):
        run.gateway_port({"PORT": raw})


def test_gateway_trusted_proxies() -> None:
    assert run.gateway_trusted_proxies({}) == ()  # the gateway is the edge
    assert run.gateway_trusted_proxies({"GATEWAY_TRUSTED_PROXIES": " "}) == ()
    assert run.gateway_trusted_proxies(
        {"GATEWAY_TRUSTED_PROXIES": " 10.0.0.0/8, 192.168.0.0/16 ,,::1,127.0.0.1"}
    ) == ("10.0.0.0/8", "192.168.0.0/16", "::1", "127.0.0.1")


@pytest.mark.parametrize(
    "raw", ["proxy.example.com", "10.0.0.1/8", "10.0.0.0/33", "10.0.0.0/8 192.168.0.0/16", "10.0.0.0/8;x"]
)
def test_gateway_trusted_proxies_refuses(raw: str) -> None:
    with pytest.raises(SystemExit, match=r"^GATEWAY_TRUSTED_PROXIES: ") as refused:
        run.gateway_trusted_proxies({"GATEWAY_TRUSTED_PROXIES": f"127.0.0.1,{raw}"})
    message = str(refused.value.code)
    assert "\n" not in message  # one line, like the launcher's other refusals
    assert repr(raw) in message


def test_make_run_stops_on_malformed_trusted_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before it checks a port or starts anything."""
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8,nope")
    monkeypatch.setattr(run, "port_in_use", lambda port: pytest.fail("went on past the bad setting"))
    with pytest.raises(SystemExit, match=r"GATEWAY_TRUSTED_PROXIES: .*'nope'"):
        run.run(run.StopRequest())


def test_auth_env() -> None:
    auth, _ = envs({"HOME": "/home/dev", "AUTH_PORT": "1", "AUTH_ENV": "production"})
    assert auth["HOME"] == "/home/dev"  # the launcher's own environment is kept
    assert auth["AUTH_ENV"] == "dev"
    assert auth["AUTH_HOST"] == "127.0.0.1"
    assert auth["AUTH_PORT"] == "8081"
    assert auth["DATABASE_URL"] == DB
    assert auth["REDIS_URL"] == REDIS
    assert auth["AUTH_JWT_PRIVATE_KEYS_FILE"] == str(KEY)
    assert auth["AUTH_REFERRAL_SERVICE_URL"] == "http://127.0.0.1:8082"
    assert auth["AUTH_PUBLIC_BASE_URL"] == "http://127.0.0.1:8080"
    assert auth["AUTH_TRUSTED_PROXIES"] == "127.0.0.1"  # the gateway, which sets X-Forwarded-For
    assert auth["AUTH_SMTP_URL"] == SMTP
    assert not any(name.startswith("REFERRAL_") for name in auth)


def test_referral_env() -> None:
    _, referral = envs({"HOME": "/home/dev", "REFERRAL_PORT": "1"})
    assert referral["HOME"] == "/home/dev"
    assert referral["REFERRAL_ENV"] == "dev"
    assert referral["REFERRAL_HOST"] == "127.0.0.1"
    assert referral["REFERRAL_PORT"] == "8082"
    assert referral["DATABASE_URL"] == DB
    assert referral["REDIS_URL"] == REDIS
    assert referral["REFERRAL_AUTH_JWKS_URL"] == "http://127.0.0.1:8081/api/v1/auth/.well-known/jwks.json"
    assert referral["REFERRAL_AUTH_ISSUER"] == "http://127.0.0.1:8080/api/v1/auth"
    assert not any(name.startswith("AUTH_") for name in referral)


def test_the_issuer_follows_the_gateway_port_and_the_public_base_url() -> None:
    auth, referral = envs({}, port=9000)
    assert auth["AUTH_PUBLIC_BASE_URL"] == "http://127.0.0.1:9000"
    assert referral["REFERRAL_AUTH_ISSUER"] == "http://127.0.0.1:9000/api/v1/auth"
    assert auth["AUTH_PORT"] == "8081"  # the services' ports do not move with PORT

    auth, referral = envs({"AUTH_PUBLIC_BASE_URL": "https://referrals.example.com/"}, port=9000)
    assert auth["AUTH_PUBLIC_BASE_URL"] == "https://referrals.example.com/"
    assert referral["REFERRAL_AUTH_ISSUER"] == "https://referrals.example.com/api/v1/auth"


def test_the_issuer_matches_the_auth_services() -> None:
    from services.auth.settings import PREFIX, AuthSettings
    from shared.config import load_settings

    for environ in ({}, {"AUTH_PUBLIC_BASE_URL": "https://referrals.example.com/"}):
        auth, referral = envs(environ, port=9000)
        settings = load_settings(AuthSettings, PREFIX, auth)
        assert settings.issuer == referral["REFERRAL_AUTH_ISSUER"]
        assert settings.port == 8081


def test_migrations_run_auth_then_referral() -> None:
    auth, referral = envs({})
    steps = run.migrations(auth, referral)
    assert [step.command for step in steps] == [
        [sys.executable, "-m", "services.auth", "migrate"],
        [sys.executable, "-m", "services.referral", "migrate"],
    ]
    assert all(step.log_dir is None for step in steps)  # their output on the terminal
    assert steps[0].env == auth
    assert steps[1].env == referral


def test_the_services_trust_the_gateway() -> None:
    from services.auth.settings import PREFIX as AUTH_PREFIX
    from services.auth.settings import AuthSettings
    from services.referral.settings import PREFIX as REFERRAL_PREFIX
    from services.referral.settings import ReferralSettings
    from shared.config import load_settings

    auth, referral = envs({})
    assert load_settings(AuthSettings, AUTH_PREFIX, auth).trusted_proxies == ("127.0.0.1",)
    assert load_settings(ReferralSettings, REFERRAL_PREFIX, referral).auth_issuer.startswith(
        "http://127.0.0.1:"
    )


def test_services() -> None:
    launcher = {"HOME": "/home/dev"}
    auth, referral = envs(launcher, port=9000)
    planned = run.services(auth, referral)
    by_name = {service.name: service for service in planned}
    assert list(by_name) == ["auth", "referral"]

    assert by_name["auth"].command == [sys.executable, "-m", "services.auth", "serve"]
    assert by_name["auth"].env == auth
    assert by_name["auth"].health_url == "http://127.0.0.1:8081/healthz"
    assert by_name["auth"].port_env == "AUTH_PORT"

    assert by_name["referral"].command == [sys.executable, "-m", "services.referral", "serve"]
    assert by_name["referral"].env == referral
    assert by_name["referral"].health_url == "http://127.0.0.1:8082/healthz"
    assert by_name["referral"].port_env == "REFERRAL_PORT"
    assert all(service.log_dir is None for service in planned)  # their output on the terminal


def test_the_gateway_is_nginx_on_the_rendered_configuration(tmp_path: Path) -> None:
    launcher = {"HOME": "/home/dev"}
    gateway = run.gateway(launcher, 9000, runtime_dir=tmp_path / "gateway")  # runs `nginx -t`
    conf = (tmp_path / "gateway" / "nginx.conf").resolve()
    assert gateway.command == [str(part) for part in nginx_command(conf)]
    assert gateway.command[:3] == ["nginx", "-e", "stderr"]
    assert gateway.health_url == "http://127.0.0.1:9000/healthz"
    assert gateway.env == launcher
    text = conf.read_text()
    assert "listen 127.0.0.1:9000;" in text
    assert "server 127.0.0.1:8081 " in text
    assert "server 127.0.0.1:8082 " in text
    assert "real_ip" not in text
    run.gateway(launcher, 9000, ("10.0.0.0/8", "::1"), tmp_path / "behind")
    text = (tmp_path / "behind" / "nginx.conf").read_text()
    assert "set_real_ip_from 10.0.0.0/8;" in text
    assert "set_real_ip_from ::1;" in text


def test_banner_says_the_gateway_is_nginx() -> None:
    assert "through nginx:" in run.banner(8080)


def test_banner_lists_both_apis_and_their_docs() -> None:
    text = run.banner(8080)
    for url in (
        "http://127.0.0.1:8080/api/v1/auth/",
        "http://127.0.0.1:8080/api/v1/auth/docs",
        "http://127.0.0.1:8080/api/v1/referral/",
        "http://127.0.0.1:8080/api/v1/referral/docs",
    ):
        assert url in text
    assert "8081" not in text
    assert "8082" not in text
    assert "http://127.0.0.1:9000/api/v1/referral/docs" in run.banner(9000)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/postgres"),
        ("postgresql://app:s3cret@db:5432/referral", "postgresql://app:***@db:5432/referral"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "postgresql://app:p%40ss@db/referral?sslmode=require",
            "postgresql://app:***@db/referral?sslmode=require",
        ),
        (
            "postgresql:///referral?user=app&password=s3cret&host=/tmp",
            "postgresql:///referral?user=app&password=***&host=/tmp",
        ),
        ("postgresql:///referral?PASSWORD=s3cret", "postgresql:///referral?PASSWORD=***"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert run.mask_url(url) == masked


def test_mail_goes_to_auth_smtp_url_or_an_embedded_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.ExitStack() as stack:
        given = "smtp://mailer:s3cret@mail.example.com:587"
        url, where = run.mail_server(stack, {"AUTH_SMTP_URL": given})
        assert url == given and "s3cret" not in where
        assert "s3cret" not in capsys.readouterr().out
    with contextlib.ExitStack() as stack:
        url, where = run.mail_server(stack, {}, tmp_path / "mail")
        assert url.startswith("smtp://127.0.0.1:") and url.endswith("?starttls=off")
        assert where == f"kept as .eml files in {tmp_path / 'mail'} (embedded SMTP server)"
        assert f"in {tmp_path / 'mail'}" in capsys.readouterr().out
        port = int(url.split(":")[2].split("?")[0])
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: hello\r\n\r\nhi\r\n")
        assert len(list((tmp_path / "mail").glob("*.eml"))) == 1
    with pytest.raises(ConnectionRefusedError), smtplib.SMTP("127.0.0.1", port, timeout=2):
        pass  # stopped with the stack


def test_banner_says_where_the_mails_go() -> None:
    text = run.banner(8080, "kept as .eml files in /repo/.data/mail (embedded SMTP server)")
    assert "mails         kept as .eml files in /repo/.data/mail" in text


def test_the_layout_defaults_to_make_runs_ports_and_folder() -> None:
    where = run.layout({})
    assert (where.port, where.auth_port, where.referral_port) == (8080, 8081, 8082)
    assert where.data_dir == run.DATA_DIR
    assert where.signing_key == run.DATA_DIR / "dev" / "jwt-signing-key.pem"
    assert where.gateway_dir == run.GATEWAY_DIR
    assert where.mail_dir == run.MAIL_DIR


def test_the_layout_moves_with_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    where = run.layout(
        {"PORT": "9000", "RUN_AUTH_PORT": " 9001", "RUN_REFERRAL_PORT": "9002 ", "RUN_DATA_DIR": "data"}
    )
    assert (where.port, where.auth_port, where.referral_port) == (9000, 9001, 9002)
    assert where.data_dir == tmp_path / "data"  # a relative folder is taken from where it was given
    assert where.mail_dir == tmp_path / "data" / "mail"
    assert where.gateway_dir == tmp_path / "data" / "gateway"
    assert run.layout({"PORT": "8081", "RUN_AUTH_PORT": "9001"}).port == 8081  # 8081 is free then


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RUN_AUTH_PORT": "auth"}, "RUN_AUTH_PORT must be a TCP port number"),
        ({"RUN_REFERRAL_PORT": "70000"}, "RUN_REFERRAL_PORT must be a TCP port number"),
        ({"RUN_AUTH_PORT": "9001", "RUN_REFERRAL_PORT": "9001"}, "must differ"),
        ({"RUN_AUTH_PORT": "9001", "PORT": "9001"}, "PORT must not be 9001 or 8082"),
    ],
)
def test_the_layout_refuses(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        run.layout(environ)


def test_the_services_and_the_gateway_take_the_layouts_ports(tmp_path: Path) -> None:
    where = run.layout({"PORT": "9000", "RUN_AUTH_PORT": "9001", "RUN_REFERRAL_PORT": "9002"})
    common = {"database_url": DB, "redis_url": REDIS}
    auth = run.auth_env(
        {},
        **common,
        gateway_port=where.port,
        signing_key=where.signing_key,
        smtp_url=SMTP,
        auth_port=where.auth_port,
        referral_port=where.referral_port,
    )
    referral = run.referral_env(
        {},
        **common,
        auth_public_base_url=auth["AUTH_PUBLIC_BASE_URL"],
        auth_port=where.auth_port,
        referral_port=where.referral_port,
    )
    assert auth["AUTH_PORT"] == "9001"
    assert auth["AUTH_REFERRAL_SERVICE_URL"] == "http://127.0.0.1:9002"
    assert referral["REFERRAL_PORT"] == "9002"
    assert referral["REFERRAL_AUTH_JWKS_URL"] == "http://127.0.0.1:9001/api/v1/auth/.well-known/jwks.json"
    assert referral["REFERRAL_AUTH_ISSUER"] == "http://127.0.0.1:9000/api/v1/auth"
    health = [service.health_url for service in run.services(auth, referral)]
    assert health == ["http://127.0.0.1:9001/healthz", "http://127.0.0.1:9002/healthz"]
    nginx = run.gateway(
        {}, where.port, (), tmp_path / "gateway", auth_port=where.auth_port, referral_port=where.referral_port
    )
    text = (tmp_path / "gateway" / "nginx.conf").read_text()
    assert nginx.health_url == "http://127.0.0.1:9000/healthz"
    assert "server 127.0.0.1:9001 " in text
    assert "server 127.0.0.1:9002 " in text
