"""The repository keeps its promises to a newcomer: every setting documented, commands present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.auth.adapters.oauth.config import PROVIDERS_VARIABLE
from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings
from services.referral.settings import PREFIX as REFERRAL_PREFIX
from services.referral.settings import ReferralSettings
from shared.config import describe

ROOT = Path(__file__).resolve().parent.parent


def documented_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


SERVICES = [(AuthSettings, AUTH_PREFIX), (ReferralSettings, REFERRAL_PREFIX)]


@pytest.mark.parametrize(("settings", "prefix"), SERVICES)
def test_every_setting_is_in_env_example(settings, prefix):
    missing = {name for name, _, _ in describe(settings, prefix)} - documented_variables()
    assert not missing, f"add to .env.example: {sorted(missing)}"


@pytest.mark.parametrize(("settings", "prefix"), SERVICES)
def test_env_example_has_no_unknown_variables(settings, prefix):
    known = {name for name, _, _ in describe(settings, prefix)} | {PROVIDERS_VARIABLE}
    unknown = {v for v in documented_variables() if v.startswith(prefix)} - known
    assert not unknown, f"not read by the service: {sorted(unknown)}"


def test_readme_shows_the_two_commands_first():
    readme = (ROOT / "README.md").read_text()
    first_code = readme.index("```")
    block = readme[first_code : readme.index("```", first_code + 3)]
    assert "make run" in block
    assert "make test" in block


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
