"""Each service is api/ -> domain/ <- adapters/, wired in app.py: the imports say so, or this fails.

A domain module is imported in a fresh interpreter and must load no web framework, driver or client;
the source of every module is read for its imports, so a layer reaching into the wrong one is named.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("auth", "referral")
IO_LIBRARIES = ("aiohttp", "aiopg", "psycopg2", "sqlalchemy", "redis", "aiocache", "aiosmtplib", "yarl")
# What each layer of a service may import of the same service (besides itself).
ALLOWED = {
    "domain": set(),
    "api": {"domain", "appkeys", "settings"},
    "adapters": {"domain", "settings"},
}


def _modules(service: str, layer: str) -> list[Path]:
    return sorted((ROOT / "services" / service / layer).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("service", SERVICES)
def test_the_service_has_the_three_layers(service: str) -> None:
    for layer in ALLOWED:
        assert (ROOT / "services" / service / layer / "__init__.py").is_file(), f"{service}/{layer}/"


@pytest.mark.parametrize("service", SERVICES)
def test_importing_the_domain_loads_no_io_library(service: str) -> None:
    modules = [_module_name(path) for path in _modules(service, "domain")]
    assert modules
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({IO_LIBRARIES!r}))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert loaded == [], f"importing services.{service}.domain loads {loaded}"


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(service: str, layer: str) -> None:
    package = f"services.{service}."
    wrong: list[str] = []
    for path in _modules(service, layer):
        for name in _imports(path):
            if layer == "domain" and name.split(".")[0] in IO_LIBRARIES:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            if not name.startswith(package):
                continue
            target = name.removeprefix(package).split(".")[0]
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_the_domain_uses_only_the_pure_parts_of_shared() -> None:
    pure = {"shared.problems", "shared.emails"}
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for service in SERVICES
        for path in _modules(service, "domain")
        for name in _imports(path)
        if name.startswith("shared") and name not in pure
    ]
    assert wrong == []
