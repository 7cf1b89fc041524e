"""The one settings loader: environment variables, a prefix per service, secrets required outside dev.

A service declares its settings as a frozen dataclass; each field is read from `PREFIX + NAME`
(or from the exact variable named by `env(...)`), parsed by its annotated type. A field marked
`secret=True` has no usable default outside dev mode: the service refuses to start without it.
Nothing else in the code base reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

DEV = "dev"
PRODUCTION = "production"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    env: str | None = None,
    secret: bool = False,
    sensitive: bool = False,
    derived: bool = False,
    doc: str = "",
) -> Any:
    """Declare a settings field: its default, an exact variable name, whether it is a secret.

    `secret`: required outside dev mode. `secret` or `sensitive`: left out of the settings' repr,
    so printing or logging the settings never shows a key, a password or a URL with credentials.
    `derived`: not one variable; the service's own loader fills it (from several variables).
    """
    metadata = {"env": env, "secret": secret, "doc": doc, "derived": derived}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata, repr=not (secret or sensitive))


def variable_name(prefix: str, field: dataclasses.Field[Any]) -> str:
    """The environment variable a field is read from."""
    explicit = field.metadata.get("env")
    return str(explicit) if explicit else f"{prefix}{field.name.upper()}"


def _parse(raw: str, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        return _parse(raw, args[0], name)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        return tuple(_parse(part.strip(), item, name) for part in raw.split(",") if part.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name} must be a boolean (true/false), got {raw!r}")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    return raw


def load_settings(cls: type[T], prefix: str, environ: Mapping[str, str]) -> T:
    """Build `cls` from `environ`; raise SettingsError naming every missing or malformed variable."""
    hints = typing.get_type_hints(cls)
    env_field = next((f for f in dataclasses.fields(cls) if f.name == "env"), None)  # type: ignore[arg-type]
    mode = environ.get(variable_name(prefix, env_field), PRODUCTION) if env_field else PRODUCTION
    if mode not in (DEV, PRODUCTION):
        raise SettingsError(f"{prefix}ENV must be {DEV!r} or {PRODUCTION!r}, got {mode!r}")
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.metadata.get("derived"):
            continue
        name = variable_name(prefix, field)
        raw = environ.get(name)
        if raw is None or (raw == "" and field.metadata.get("secret")):
            if field.metadata.get("secret") and mode != DEV:
                problems.append(f"{name} is required outside dev mode")
            elif field.default is dataclasses.MISSING:
                problems.append(f"{name} is required")
            continue
        try:
            values[field.name] = _parse(raw, hints[field.name], name)
        except SettingsError as error:
            problems.append(str(error))
    if problems:
        raise SettingsError("; ".join(problems))
    return cls(**values)


def describe(cls: type[Any], prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, doc) for every field: used to check `.env.example` stays complete."""
    rows = []
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):
            continue
        default = "" if field.default is dataclasses.MISSING else str(field.default)
        rows.append((variable_name(prefix, field), default, str(field.metadata.get("doc", ""))))
    return rows
