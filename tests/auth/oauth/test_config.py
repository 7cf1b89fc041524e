"""load_oauth_providers: names, kinds, defaults, skipped providers, malformed values."""

from __future__ import annotations

import logging

import pytest

from services.auth.adapters.oauth.config import (
    GITHUB,
    OIDC,
    OAuthProviderSettings,
    SkippedProvider,
    _ProviderVariables,
    load_oauth_providers,
    read_oauth_providers,
)
from shared.config import SettingsError, load_settings

GOOGLE = {
    "AUTH_OAUTH_GOOGLE_ISSUER": "https://accounts.google.com",
    "AUTH_OAUTH_GOOGLE_CLIENT_ID": "google-id",
    "AUTH_OAUTH_GOOGLE_CLIENT_SECRET": "google-secret",
}
GH = {
    "AUTH_OAUTH_GITHUB_KIND": "github",
    "AUTH_OAUTH_GITHUB_CLIENT_ID": "gh-id",
    "AUTH_OAUTH_GITHUB_CLIENT_SECRET": "gh",
}


def test_nothing_configured_means_no_providers():
    assert load_oauth_providers({}) == ()
    assert load_oauth_providers({"AUTH_OAUTH_PROVIDERS": " , "}) == ()


def test_names_kinds_and_defaults():
    providers = load_oauth_providers({"AUTH_OAUTH_PROVIDERS": "google, github", **GOOGLE, **GH})
    google, github = providers
    assert google == OAuthProviderSettings(
        name="google",
        kind=OIDC,
        client_id="google-id",
        client_secret="google-secret",
        scope="openid email profile",
        issuer="https://accounts.google.com",
    )
    assert github == OAuthProviderSettings(
        name="github",
        kind=GITHUB,
        client_id="gh-id",
        client_secret="gh",
        scope="read:user user:email",
        authorize_url="https://github.com/login/oauth/authorize",
        token_url="https://github.com/login/oauth/access_token",
        api_url="https://api.github.com",
    )
    assert "google-secret" not in repr(google)
    assert google.redirect_uri("http://127.0.0.1:8080/") == (
        "http://127.0.0.1:8080/api/v1/auth/oauth/google/callback"
    )


def test_overrides_and_dashed_names():
    environ = {
        "AUTH_OAUTH_PROVIDERS": "corp-gh",
        "AUTH_OAUTH_CORP_GH_KIND": "GitHub",
        "AUTH_OAUTH_CORP_GH_CLIENT_ID": "id",
        "AUTH_OAUTH_CORP_GH_CLIENT_SECRET": "secret",
        "AUTH_OAUTH_CORP_GH_SCOPE": "user:email",
        "AUTH_OAUTH_CORP_GH_TIMEOUT": "2.5",
        "AUTH_OAUTH_CORP_GH_AUTHORIZE_URL": "https://ghe.example.com/login/oauth/authorize",
        "AUTH_OAUTH_CORP_GH_TOKEN_URL": "https://ghe.example.com/login/oauth/access_token",
        "AUTH_OAUTH_CORP_GH_API_URL": "https://ghe.example.com/api/v3/",
    }
    (provider,) = load_oauth_providers(environ)
    assert (provider.name, provider.kind, provider.scope, provider.timeout) == (
        "corp-gh",
        GITHUB,
        "user:email",
        2.5,
    )
    assert provider.authorize_url == "https://ghe.example.com/login/oauth/authorize"
    assert provider.token_url == "https://ghe.example.com/login/oauth/access_token"
    assert provider.api_url == "https://ghe.example.com/api/v3"


def test_a_provider_without_client_credentials_is_skipped_and_logged(caplog):
    environ = {
        "AUTH_OAUTH_PROVIDERS": "google,github",
        **GOOGLE,
        "AUTH_OAUTH_GITHUB_KIND": "github",
        "AUTH_OAUTH_GITHUB_CLIENT_ID": "gh-id",
    }
    config = read_oauth_providers(environ)
    assert [p.name for p in config.providers] == ["google"]
    assert config.skipped == (SkippedProvider("github", "AUTH_OAUTH_GITHUB_CLIENT_SECRET not set"),)
    with caplog.at_level(logging.WARNING, logger="services.auth.adapters.oauth.config"):
        assert [p.name for p in load_oauth_providers(environ)] == ["google"]
    assert "github is not offered: AUTH_OAUTH_GITHUB_CLIENT_SECRET not set" in caplog.text


def test_an_oidc_provider_without_a_client_id_needs_no_issuer():
    config = read_oauth_providers({"AUTH_OAUTH_PROVIDERS": "okta"})
    assert config.providers == ()
    assert config.skipped == (SkippedProvider("okta", "AUTH_OAUTH_OKTA_CLIENT_ID not set"),)


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
def test_an_oidc_provider_without_a_secret_is_a_public_client(caplog, secret):
    """Unset and empty (compose passes `${VAR:-}`) alike: offered, no secret, and said so at startup."""
    environ = {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE}
    del environ["AUTH_OAUTH_GOOGLE_CLIENT_SECRET"]
    if secret is not None:
        environ["AUTH_OAUTH_GOOGLE_CLIENT_SECRET"] = secret
    with caplog.at_level(logging.INFO, logger="services.auth.adapters.oauth.config"):
        (google,) = load_oauth_providers(environ)
    assert (google.name, google.client_id, google.client_secret) == ("google", "google-id", None)
    assert "google has no AUTH_OAUTH_GOOGLE_CLIENT_SECRET: it signs in as a public client" in caplog.text


def test_a_github_provider_still_needs_its_secret():
    environ = {"AUTH_OAUTH_PROVIDERS": "github", **GH, "AUTH_OAUTH_GITHUB_CLIENT_SECRET": ""}
    config = read_oauth_providers(environ)
    assert config.providers == ()
    assert config.skipped == (SkippedProvider("github", "AUTH_OAUTH_GITHUB_CLIENT_SECRET not set"),)


def test_no_secret_in_a_repr_or_a_log(caplog):
    environ = {
        "AUTH_OAUTH_PROVIDERS": "google,github,okta",
        **GOOGLE,
        **GH,
        "AUTH_OAUTH_GITHUB_CLIENT_SECRET": "github-secret-value",
        "AUTH_OAUTH_OKTA_CLIENT_SECRET": "okta-secret-value",  # skipped: no client id
    }
    with caplog.at_level(logging.DEBUG):
        config = read_oauth_providers(environ)
        load_oauth_providers(environ)
    # The raw variables as read, too: whatever prints them must not show the secret.
    raw = load_settings(_ProviderVariables, "AUTH_OAUTH_GOOGLE_", environ)
    shown = (repr(config), repr(raw), caplog.text)
    assert "google-id" in shown[0] and "google-id" in shown[1]
    for text in shown:
        for secret in ("google-secret", "github-secret-value", "okta-secret-value"):
            assert secret not in text


def test_an_empty_secret_is_not_a_secret():
    with pytest.raises(ValueError, match="client_secret"):
        OAuthProviderSettings(name="x", kind=OIDC, client_id="id", client_secret="", scope="openid")


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "Google", **GOOGLE}, "AUTH_OAUTH_PROVIDERS", id="upper-case-name"
        ),
        pytest.param({"AUTH_OAUTH_PROVIDERS": "goo/gle"}, "AUTH_OAUTH_PROVIDERS", id="slash-in-name"),
        pytest.param({"AUTH_OAUTH_PROVIDERS": "my-idp,my_idp"}, "AUTH_OAUTH_PROVIDERS", id="colliding-names"),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE, "AUTH_OAUTH_GOOGLE_KIND": "saml"},
            "AUTH_OAUTH_GOOGLE_KIND",
            id="bad-kind",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE, "AUTH_OAUTH_GOOGLE_ISSUER": "accounts.google.com"},
            "AUTH_OAUTH_GOOGLE_ISSUER",
            id="issuer-not-a-url",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **{k: v for k, v in GOOGLE.items() if "ISSUER" not in k}},
            "AUTH_OAUTH_GOOGLE_ISSUER",
            id="issuer-missing",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE, "AUTH_OAUTH_GOOGLE_SCOPE": "email profile"},
            "AUTH_OAUTH_GOOGLE_SCOPE",
            id="oidc-scope-without-openid",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE, "AUTH_OAUTH_GOOGLE_TIMEOUT": "soon"},
            "AUTH_OAUTH_GOOGLE_TIMEOUT",
            id="timeout-not-a-number",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "google", **GOOGLE, "AUTH_OAUTH_GOOGLE_TIMEOUT": "0"},
            "AUTH_OAUTH_GOOGLE_TIMEOUT",
            id="timeout-zero",
        ),
        pytest.param(
            {"AUTH_OAUTH_PROVIDERS": "github", **GH, "AUTH_OAUTH_GITHUB_API_URL": "ftp://ghe.example.com"},
            "AUTH_OAUTH_GITHUB_API_URL",
            id="github-url",
        ),
    ],
)
def test_malformed_values_name_the_variable(environ, variable):
    with pytest.raises(SettingsError, match=variable):
        load_oauth_providers(environ)
