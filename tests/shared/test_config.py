"""shared.config.load_settings: prefixes, exact names, parsing, required and secret fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from services.auth.adapters.signing import generate_pem
from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import SettingsError, describe, load_settings, setting, variable_name


@dataclass(frozen=True, kw_only=True)
class Sample:
    env: str = setting("production")
    name: str = setting("svc")
    port: int = setting(8000)
    ratio: float = setting(0.5)
    debug: bool = setting(False)
    hosts: tuple[str, ...] = setting(())
    ports: tuple[int, ...] = setting((1, 2))
    maybe: int | None = setting(None)
    url: str = setting(env="SAMPLE_URL")
    token: str | None = setting(None, secret=True)


BASE = {"SAMPLE_URL": "postgresql://x"}


def load(**env: str) -> Sample:
    return load_settings(Sample, "SMP_", {**BASE, "SMP_TOKEN": "t0ps3cret", **env})


def test_defaults_apply():
    settings = load()
    assert settings == Sample(url="postgresql://x", token="t0ps3cret")
    assert (settings.name, settings.port, settings.ratio, settings.debug) == ("svc", 8000, 0.5, False)
    assert settings.hosts == ()
    assert settings.ports == (1, 2)
    assert settings.maybe is None


def test_fields_are_read_with_the_prefix():
    settings = load(SMP_NAME="auth", SMP_PORT="9001", NAME="ignored", PORT="1")
    assert settings.name == "auth"
    assert settings.port == 9001


def test_unprefixed_or_other_prefix_variables_are_ignored():
    settings = load(PORT="1", OTHER_PORT="2", smp_port="3")
    assert settings.port == 8000


def test_an_exact_env_name_is_used_without_the_prefix():
    settings = load_settings(Sample, "SMP_", {"SAMPLE_URL": "postgresql://exact", "SMP_TOKEN": "t"})
    assert settings.url == "postgresql://exact"
    fields = {f.name: f for f in dataclasses.fields(Sample)}
    assert variable_name("SMP_", fields["url"]) == "SAMPLE_URL"
    assert variable_name("SMP_", fields["port"]) == "SMP_PORT"
    with pytest.raises(SettingsError, match="SAMPLE_URL"):
        load_settings(Sample, "SMP_", {"SMP_URL": "postgresql://prefixed", "SMP_TOKEN": "t"})


@pytest.mark.parametrize(("raw", "expected"), [("0", 0), ("65535", 65535), ("-3", -3), (" 42 ", 42)])
def test_ints(raw, expected):
    assert load(SMP_PORT=raw).port == expected


@pytest.mark.parametrize(("raw", "expected"), [("1.25", 1.25), ("3", 3.0), ("1e-3", 0.001), ("-0.5", -0.5)])
def test_floats(raw, expected):
    value = load(SMP_RATIO=raw).ratio
    assert isinstance(value, float)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        (" True ", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_bools(raw, expected):
    assert load(SMP_DEBUG=raw).debug is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "", "tru", "y"])
def test_a_malformed_bool_names_the_variable(raw):
    with pytest.raises(SettingsError, match="SMP_DEBUG"):
        load(SMP_DEBUG=raw)


def test_tuples():
    settings = load(SMP_HOSTS="a.example, b.example ,,c.example", SMP_PORTS="80, 443")
    assert settings.hosts == ("a.example", "b.example", "c.example")
    assert settings.ports == (80, 443)
    assert load(SMP_HOSTS="").hosts == ()
    assert load(SMP_HOSTS="single").hosts == ("single",)


def test_a_malformed_tuple_item_names_the_variable():
    with pytest.raises(SettingsError, match="SMP_PORTS"):
        load(SMP_PORTS="80,http")


def test_optional_values():
    assert load(SMP_MAYBE="7").maybe == 7
    assert load(SMP_MAYBE="").maybe is None
    with pytest.raises(SettingsError, match="SMP_MAYBE"):
        load(SMP_MAYBE="seven")


@pytest.mark.parametrize(
    ("variable", "raw"),
    [("SMP_PORT", "eighty"), ("SMP_PORT", "8.5"), ("SMP_PORT", ""), ("SMP_RATIO", "half"), ("SMP_RATIO", "")],
)
def test_a_malformed_number_names_the_variable(variable, raw):
    with pytest.raises(SettingsError) as error:
        load(**{variable: raw})
    assert variable in str(error.value)
    assert repr(raw) in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as error:
        load_settings(Sample, "SMP_", {"SMP_PORT": "x", "SMP_RATIO": "y"})
    message = str(error.value)
    for name in ("SMP_PORT", "SMP_RATIO", "SAMPLE_URL", "SMP_TOKEN"):
        assert name in message, message


def test_a_missing_required_field_is_reported():
    with pytest.raises(SettingsError, match="SAMPLE_URL is required"):
        load_settings(Sample, "SMP_", {"SMP_TOKEN": "t"})


def test_secrets_are_required_outside_dev():
    with pytest.raises(SettingsError, match="SMP_TOKEN"):
        load_settings(Sample, "SMP_", BASE)
    with pytest.raises(SettingsError, match="SMP_TOKEN"):
        load_settings(Sample, "SMP_", {**BASE, "SMP_TOKEN": ""})
    with pytest.raises(SettingsError, match="SMP_TOKEN"):
        load_settings(Sample, "SMP_", {**BASE, "SMP_ENV": "production"})


def test_secrets_are_optional_in_dev():
    settings = load_settings(Sample, "SMP_", {**BASE, "SMP_ENV": "dev"})
    assert settings.token is None
    assert settings.env == "dev"
    assert load_settings(Sample, "SMP_", {**BASE, "SMP_ENV": "dev", "SMP_TOKEN": "s"}).token == "s"


@pytest.mark.parametrize("mode", ["staging", "DEV", "", "prod"])
def test_an_unknown_mode_is_refused(mode):
    with pytest.raises(SettingsError, match="SMP_ENV"):
        load_settings(Sample, "SMP_", {**BASE, "SMP_TOKEN": "t", "SMP_ENV": mode})


def test_describe_lists_every_variable():
    rows = {variable: default for variable, default, _ in describe(Sample, "SMP_")}
    assert rows["SAMPLE_URL"] == ""
    assert rows["SMP_PORT"] == "8000"
    assert set(rows) == {variable_name("SMP_", f) for f in dataclasses.fields(Sample)}


def test_list_defaults_are_refused():
    with pytest.raises(TypeError):
        setting([])


# --- AuthSettings --------------------------------------------------------------------------------

AUTH_BASE = {
    "DATABASE_URL": "postgresql://db/auth",
    "REDIS_URL": "redis://r/0",
    "AUTH_SMTP_URL": "smtp://mail.example.internal:587",
}


def test_production_refuses_to_start_without_a_mail_server(pem: str) -> None:
    environ = {**AUTH_BASE, "AUTH_JWT_PRIVATE_KEYS": pem}
    del environ["AUTH_SMTP_URL"]
    with pytest.raises(SettingsError, match="AUTH_SMTP_URL is required outside dev mode"):
        load_settings(AuthSettings, AUTH_PREFIX, environ)
    assert load_settings(AuthSettings, AUTH_PREFIX, {**environ, "AUTH_ENV": "dev"}).smtp_url is None


@pytest.fixture(scope="module")
def pem() -> str:
    return generate_pem()


def test_auth_settings_read_shared_unprefixed_names(pem):
    settings = load_settings(
        AuthSettings,
        AUTH_PREFIX,
        {**AUTH_BASE, "AUTH_JWT_PRIVATE_KEYS": pem, "AUTH_DATABASE_URL": "postgresql://wrong"},
    )
    assert settings.database_url == "postgresql://db/auth"
    assert settings.redis_url == "redis://r/0"
    assert settings.env == "production"
    assert settings.max_body_bytes == 64 * 1024
    assert settings.access_token_ttl == 900


def test_auth_settings_parse_their_types(pem):
    settings = load_settings(
        AuthSettings,
        AUTH_PREFIX,
        {
            **AUTH_BASE,
            "AUTH_JWT_PRIVATE_KEYS": pem,
            "AUTH_PORT": "9999",
            "AUTH_DB_TIMEOUT": "2.5",
            "AUTH_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "AUTH_PUBLIC_BASE_URL": "https://api.example.com/",
        },
    )
    assert settings.port == 9999
    assert settings.db_timeout == 2.5
    assert settings.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert settings.issuer == "https://api.example.com/api/v1/auth"


def test_auth_settings_require_database_and_redis():
    with pytest.raises(SettingsError) as error:
        load_settings(AuthSettings, AUTH_PREFIX, {"AUTH_ENV": "dev"})
    assert "DATABASE_URL" in str(error.value)
    assert "REDIS_URL" in str(error.value)


def test_auth_settings_name_a_malformed_number():
    with pytest.raises(SettingsError, match="AUTH_ACCESS_TOKEN_TTL"):
        load_settings(
            AuthSettings, AUTH_PREFIX, {**AUTH_BASE, "AUTH_ENV": "dev", "AUTH_ACCESS_TOKEN_TTL": "15m"}
        )


@pytest.mark.parametrize("extra", [{}, {"AUTH_ENV": "production"}, {"AUTH_JWT_PRIVATE_KEYS": ""}])
def test_auth_settings_refuse_production_without_keys(extra):
    with pytest.raises(SettingsError, match="JWT_PRIVATE_KEYS"):
        load_settings(AuthSettings, AUTH_PREFIX, {**AUTH_BASE, **extra})


def test_auth_settings_accept_production_with_a_key_file(tmp_path, pem):
    key_file = tmp_path / "keys.pem"
    key_file.write_text(pem)
    settings = load_settings(
        AuthSettings, AUTH_PREFIX, {**AUTH_BASE, "AUTH_JWT_PRIVATE_KEYS_FILE": str(key_file)}
    )
    assert settings.jwt_private_keys_file == str(key_file)
    assert not settings.is_dev


def test_auth_settings_accept_dev_without_keys():
    settings = load_settings(AuthSettings, AUTH_PREFIX, {**AUTH_BASE, "AUTH_ENV": "dev"})
    assert settings.is_dev
    assert settings.jwt_private_keys is None
    assert settings.jwt_private_keys_file is None


@pytest.mark.parametrize(("pool_min", "pool_max"), [("1", "7"), ("1", "501"), ("10", "8")])
def test_auth_settings_refuse_a_bad_pool(pool_min, pool_max):
    with pytest.raises(SettingsError, match="AUTH_DB_POOL_MAX"):
        load_settings(
            AuthSettings,
            AUTH_PREFIX,
            {**AUTH_BASE, "AUTH_ENV": "dev", "AUTH_DB_POOL_MIN": pool_min, "AUTH_DB_POOL_MAX": pool_max},
        )


SERVICES = [(AuthSettings, AUTH_PREFIX), (ReferralSettings, REFERRAL_PREFIX)]


def service_environ(prefix: str, **extra: str) -> dict[str, str]:
    return {**AUTH_BASE, f"{prefix}ENV": "dev", **extra}


@pytest.mark.parametrize(("settings", "prefix"), SERVICES)
@pytest.mark.parametrize(("raw", "expected"), [(None, True), ("true", True), ("false", False), ("0", False)])
def test_db_server_prepare_parses(settings, prefix, raw, expected):
    extra = {} if raw is None else {f"{prefix}DB_SERVER_PREPARE": raw}
    assert load_settings(settings, prefix, service_environ(prefix, **extra)).db_server_prepare is expected


@pytest.mark.parametrize(("settings", "prefix"), SERVICES)
def test_a_malformed_db_server_prepare_is_refused_by_name(settings, prefix):
    environ = service_environ(prefix, **{f"{prefix}DB_SERVER_PREPARE": "transaction"})
    with pytest.raises(SettingsError) as error:
        load_settings(settings, prefix, environ)
    assert str(error.value) == f"{prefix}DB_SERVER_PREPARE must be a boolean (true/false), got 'transaction'"
