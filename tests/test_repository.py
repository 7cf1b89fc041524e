"""The repository keeps its promises to a newcomer: every setting documented, commands present."""

from __future__ import annotations

import re
from pathlib import Path

from services.auth.settings import PREFIX as AUTH_PREFIX
from services.auth.settings import AuthSettings
from shared.config import describe

ROOT = Path(__file__).resolve().parent.parent


def documented_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def test_every_auth_setting_is_in_env_example():
    missing = {name for name, _, _ in describe(AuthSettings, AUTH_PREFIX)} - documented_variables()
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_has_no_unknown_auth_variables():
    known = {name for name, _, _ in describe(AuthSettings, AUTH_PREFIX)}
    unknown = {v for v in documented_variables() if v.startswith(AUTH_PREFIX)} - known
    assert not unknown, f"not read by the auth service: {sorted(unknown)}"


def test_readme_shows_the_two_commands_first():
    readme = (ROOT / "README.md").read_text()
    first_code = readme.index("```")
    block = readme[first_code : readme.index("```", first_code + 3)]
    assert "make run" in block
    assert "make test" in block


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
