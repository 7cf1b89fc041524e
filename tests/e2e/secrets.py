"""The secrets the e2e run used, so the last test can check no log line carries one.

Helpers call `record(kind, value)` for every secret they send or receive (passwords, access and
refresh tokens, authorization codes, API keys given to fakes, ...); `test_zz_secrets_in_logs.py`
scans every log under `.artifacts/e2e/` for each of them, in every form a log line may hold it
(as sent, JSON-escaped, percent-encoded). One process runs the package, so a module-level registry
is enough. Values shorter than `MIN_LENGTH` are ignored: they would match by accident.

Named `secrets.py` inside the `tests.e2e` package: import it as `tests.e2e.secrets`
(`from tests.e2e import secrets as run_secrets`); a bare `import secrets` still finds the stdlib.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus

MIN_LENGTH = 8

_registry: dict[str, str] = {}  # value -> kind (the first kind it was recorded as)
_PEM_LINE = re.compile(r"^[A-Za-z0-9+/=]{16,}$")


def record(kind: str, value: str | None) -> None:
    """Remember `value` (a secret of this kind); None, empty and short values are ignored."""
    if isinstance(value, str) and len(value) >= MIN_LENGTH:
        _registry.setdefault(value, kind)
        if kind.endswith("access_token") and value.count(".") == 2:
            # A JWT's signature alone identifies it (its header is the same for every token):
            # a log that cut the token short would still show it.
            signature = value.rsplit(".", 1)[1]
            if len(signature) >= MIN_LENGTH:
                _registry.setdefault(signature, f"{kind} (signature)")


def record_private_key(kind: str, pem: str) -> None:
    """An RSA private key: each PEM body line, and its private numbers in base64url and base64."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    for line in pem.splitlines():
        if _PEM_LINE.fullmatch(line.strip()):
            record(f"{kind} (PEM line)", line.strip())
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    numbers = key.private_numbers()
    # The modulus and public exponent are public (the JWKS publishes them); these are not.
    for name, value in (
        ("d", numbers.d),
        ("p", numbers.p),
        ("q", numbers.q),
        ("dp", numbers.dmp1),
        ("dq", numbers.dmq1),
        ("qi", numbers.iqmp),
    ):
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        record(f"{kind} ({name}, base64url)", base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
        record(f"{kind} ({name}, base64)", base64.b64encode(raw).decode())
        record(f"{kind} ({name}, hex)", raw.hex())


def recorded() -> dict[str, str]:
    """Every recorded value and its kind."""
    return dict(_registry)


def kinds() -> set[str]:
    return set(_registry.values())


def forms(value: str) -> Iterator[str]:
    """The ways a log line may carry `value`: as is, JSON-escaped (ASCII or not), percent-encoded."""
    seen: set[str] = set()
    for form in (
        value,
        json.dumps(value, ensure_ascii=False)[1:-1],
        json.dumps(value)[1:-1],
        quote(value, safe=""),
        quote_plus(value, safe=""),
    ):
        if form not in seen:
            seen.add(form)
            yield form


def prefix(value: str, length: int = 6) -> str:
    """What a report may show of a secret."""
    return value[:length] + "..."


def find_leaks(texts: Iterable[tuple[str, str]], secrets: dict[str, str]) -> list[str]:
    """`file:line: kind 'prefix...'` for every occurrence of a secret (in any of its forms)."""
    leaks: list[str] = []
    needles = [(form, value, kind) for value, kind in secrets.items() for form in forms(value)]
    for name, text in texts:
        line_starts: list[int] | None = None
        hits: set[tuple[int, str]] = set()
        for form, value, kind in needles:
            start = text.find(form)
            while start != -1:
                if line_starts is None:
                    line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
                line = _line_of(line_starts, start)
                if (line, value) not in hits:
                    hits.add((line, value))
                    leaks.append(f"{name}:{line}: {kind} {prefix(value)!r}")
                start = text.find(form, start + 1)
    return leaks


def _line_of(line_starts: list[int], offset: int) -> int:
    low, high = 0, len(line_starts)
    while high - low > 1:
        middle = (low + high) // 2
        if line_starts[middle] <= offset:
            low = middle
        else:
            high = middle
    return low + 1
