"""wrk, driven from Python: the request files its Lua scripts read, and one run's figures.

wrk (Debian's 4.x, with LuaJIT) sends what the scripts in `wrk/` tell it to:

- `requests.lua` sends the requests of a request file (`write_requests`), round robin (`mode=cycle`)
  or each at most once (`mode=once`), and with `expect=STATUS` counts the answers of another status.
- `mix.lua` sends a mix file (tests/perf/mix.py): requests of several kinds, each with its expected
  status, each at most once, refresh grants with chained tokens among them.
- `refresh.lua` chains refresh-token grants: a file of refresh tokens (`write_tokens`), each used
  once, each answer's `refresh_token` queued for a later request.

Each wrk thread loads only its own slice of the file (thread i of n: lines i, i+n, i+2n, ...), so
that `once` holds across threads; `run_wrk` passes the thread count to the script (`threads=N`).

The request file
----------------
Text, one request a line, `\\n`-terminated. A line that is empty or starts with `#` is a comment
(`write_requests` writes one at the top saying what the file is). A request line is tab-separated
fields:

    METHOD <TAB> PATH <TAB> BODY [<TAB> HEADER-NAME <TAB> HEADER-VALUE]...

Every field is percent-encoded from its UTF-8 bytes: each byte outside the printable ASCII range
0x21-0x7E, and `%` itself, is written `%XX` (uppercase hex). So a field never holds a tab, a
newline or a space, and any body or header value survives; decoding is a single `%XX` -> byte
pass. PATH is the request target as sent (path and query, already URL-encoded: its `%` come out
as `%25` in the file and back as `%` on the wire). An empty BODY on a GET or HEAD sends no
Content-Length; on any other method it sends `Content-Length: 0`. wrk's `wrk.format` adds `Host`
and `Content-Length`; the file gives neither.

What wrk does that one would not guess
--------------------------------------
- It calls `request()` once on its first thread before the run, only to check the request's syntax,
  and never sends that request: both scripts let that call take no line and no token.
- `setup(thread)` runs for a thread just before that thread's `init`: no `init` knows how many
  threads there will be, hence `threads=N`. `done()` runs in yet another Lua state, which sees the
  threads' globals only through `thread:get` (the counters are number and string globals).
- `-d` and `--timeout` take whole seconds; each thread opens `connections // threads` connections.
- Its `errors.status` counts every answer >= 400: a scenario that expects 404 must pass `expect=404`
  and judge by `unexpected`. With `response()` defined (only then) wrk keeps every answer's headers
  and body, which costs its CPU.
- The latency it reports (and hands `done()`) is corrected for coordinated omission: with
  e = duration / (answers per connection), an answer that took n >= 2e adds synthetic samples at
  n - e, n - 2e, ... (above e): a slow tail weighs more in p99 than the raw samples would.
- An answer slower than `--timeout` is counted in `errors.timeout` and left out of the latency.
- A Lua error in `init`, `request` or `response` aborts wrk ("PANIC: unprotected error"); a syntax
  error in the script is only printed, and wrk goes on with `GET /`: then `done()` does not exist,
  no WRK_JSON line comes, and `run_wrk` raises.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

WRK = "wrk"
INSTALL_HINT = "apt-get install -y wrk"
SCRIPTS = Path(__file__).resolve().parent / "wrk"
JSON_PREFIX = "WRK_JSON "
HEADER_LINE = (
    "# wrk request file (tests/perf/wrk.py): METHOD<TAB>PATH<TAB>BODY[<TAB>NAME<TAB>VALUE]..., "
    "every field percent-encoded\n"
)
SOCKET_ERRORS = ("connect", "read", "write", "timeout")

# Bytes written as they are: printable ASCII but `%`. Everything else becomes %XX.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_ESCAPED = re.compile(r"[^\x21-\x7e]|%")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ADDED_BY_WRK = frozenset({"host", "content-length"})


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no result."""


@dataclass(frozen=True)
class Request:
    """One request the Lua script can send."""

    method: str  # GET / POST
    path: str  # path + query, already URL-encoded
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)  # e.g. Authorization
    body: str = ""


def _encode(value: str) -> str:
    if _ESCAPED.search(value) is None:
        return value
    return quote(value, safe=_SAFE, encoding="utf-8", errors="strict")


def _decode(value: str) -> str:
    return unquote(value, encoding="utf-8", errors="strict")


def _is_token(value: str) -> bool:
    return _TOKEN.fullmatch(value) is not None


def _check(request: Request) -> None:
    if not _is_token(request.method):
        raise ValueError(f"not an HTTP method: {request.method!r}")
    if not request.path.startswith("/") or _PRINTABLE.fullmatch(request.path) is None:
        raise ValueError(f"not a URL-encoded path (starts with /, printable ASCII only): {request.path!r}")
    for name, value in request.headers.items():
        if not _is_token(name):
            raise ValueError(f"not a header name: {name!r}")
        if name.lower() in _ADDED_BY_WRK:
            raise ValueError(f"{name} is added by wrk itself: leave it out")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name} has a CR, LF or NUL in its value: {value!r}")


def encode_request(request: Request) -> str:
    """The request's line in a request file (without the newline)."""
    _check(request)
    fields = [request.method, request.path, request.body]
    for name, value in request.headers.items():
        fields += [name, value]
    return "\t".join(_encode(f) for f in fields)


def decode_request(line: str) -> Request:
    """The request of a request-file line (the inverse of `encode_request`)."""
    fields = [_decode(f) for f in line.rstrip("\n").split("\t")]
    if len(fields) < 3 or len(fields) % 2 == 0:
        raise ValueError(f"{len(fields)} fields, wanted method, path, body, then name/value pairs: {line!r}")
    method, path, body, *pairs = fields
    return Request(method, path, dict(zip(pairs[::2], pairs[1::2], strict=True)), body)


def write_requests(path: Path, requests: Iterable[Request]) -> int:
    """Write the request file that requests.lua reads; returns the number of requests."""
    count = 0
    with path.open("w", encoding="ascii", newline="\n") as out:
        out.write(HEADER_LINE)
        for request in requests:
            out.write(encode_request(request) + "\n")
            count += 1
    return count


def read_requests(path: Path) -> list[Request]:
    """The requests of a request file, in order."""
    with path.open(encoding="ascii", newline="\n") as lines:
        return [decode_request(line) for line in lines if line.strip("\n") and not line.startswith("#")]


def write_tokens(path: Path, tokens: Iterable[str]) -> int:
    """Write the refresh-token file that refresh.lua reads (one token a line); returns the count."""
    count = 0
    with path.open("w", encoding="ascii", newline="\n") as out:
        for token in tokens:
            if token.startswith("#") or _PRINTABLE.fullmatch(token) is None:
                raise ValueError(f"a refresh token is printable ASCII without spaces, not {token!r}")
            out.write(token + "\n")
            count += 1
    return count


def requests_args(
    file: Path, *, mode: Literal["cycle", "once"] = "cycle", expect: int | None = None
) -> list[str]:
    """The script arguments of requests.lua (run_wrk's `args`)."""
    args = [str(file), f"mode={mode}"]
    if expect is not None:
        args.append(f"expect={expect}")
    return args


def refresh_args(file: Path, *, path: str = "/api/v1/auth/token") -> list[str]:
    """The script arguments of refresh.lua (run_wrk's `args`)."""
    return [str(file), f"path={path}"]


def requests_script() -> Path:
    return SCRIPTS / "requests.lua"


def refresh_script() -> Path:
    return SCRIPTS / "refresh.lua"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: totals, latency (wrk's own, with its coordinated-omission correction), errors."""

    requests: int  # answers received in full
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]  # connect, read, write, timeout, status (wrk's own: status = answers >= 400)
    unexpected: dict[str, int]  # status -> answers of a status other than `expect` (only if expect given)
    exhausted: int  # requests sent after a `once` file (or the refresh queue) ran out: reuses
    expect: int | None = None  # the status every answer should have, if the script was told one
    # mix.lua only (tests/perf/mix.py): requests sent per kind, answers per status; `unexpected`
    # then holds the answers of a status that no kind expects.
    kinds: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def judged_by_status(self) -> bool:
        """Whether `unexpected` says which answers were wrong (else every answer >= 400 is)."""
        return self.expect is not None or bool(self.kinds)

    @property
    def socket_errors(self) -> int:
        return sum(self.errors.get(kind, 0) for kind in SOCKET_ERRORS)

    @property
    def failed(self) -> int:
        """Every kind of error: socket errors + answers of the wrong status."""
        wrong = sum(self.unexpected.values()) if self.judged_by_status else self.errors.get("status", 0)
        return self.socket_errors + wrong

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WrkResult:
        """The result of a WRK_JSON line's object."""
        latency = data["latency_us"]
        duration_s = float(data["duration_us"]) / 1e6
        requests = int(data["requests"])
        expect = data.get("expect")
        return cls(
            requests=requests,
            duration_s=duration_s,
            rps=requests / duration_s if duration_s > 0 else 0.0,
            p50_ms=float(latency["p50"]) / 1000,
            p90_ms=float(latency["p90"]) / 1000,
            p99_ms=float(latency["p99"]) / 1000,
            max_ms=float(latency["max"]) / 1000,
            mean_ms=float(latency["mean"]) / 1000,
            errors={str(kind): int(count) for kind, count in data["errors"].items()},
            unexpected={str(status): int(count) for status, count in data["unexpected"].items()},
            exhausted=int(data["exhausted"]),
            expect=int(expect) if expect is not None else None,
            kinds={str(kind): int(count) for kind, count in (data.get("kinds") or {}).items()},
            statuses={str(status): int(count) for status, count in (data.get("statuses") or {}).items()},
        )


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _whole_seconds(name: str, value: float) -> int:
    if value < 1 or value != int(value):
        raise ValueError(f"wrk takes whole seconds: {name}={value}")
    return int(value)


def run_wrk(
    base_url: str,
    script: Path,
    *,
    duration: float,
    connections: int,
    threads: int,
    args: Sequence[str] = (),
    timeout_s: float = 10.0,
) -> WrkResult:
    """Run `wrk --latency -t -c -d --timeout -s script base_url -- args threads=N`; its result.

    `duration` and `timeout_s` are whole seconds (wrk takes no fractions); `connections` must be a
    multiple of `threads` (wrk opens connections // threads per thread). Raises WrkError when wrk is
    missing, exits non-zero (a Lua error aborts it), or prints no WRK_JSON line.
    """
    seconds = _whole_seconds("duration", duration)
    timeout = _whole_seconds("timeout_s", timeout_s)
    if threads < 1 or connections < threads or connections % threads:
        raise ValueError(f"connections ({connections}) must be a multiple of threads ({threads})")
    if any(arg.startswith("threads=") for arg in args):
        raise ValueError("run_wrk passes threads= itself")
    wrk = shutil.which(WRK)
    if wrk is None:
        raise WrkError(f"wrk is not installed (not on PATH): {INSTALL_HINT}")
    command = [
        wrk,
        "--latency",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={timeout}s",
        f"--script={script}",
        base_url,
        "--",
        *args,
        f"threads={threads}",
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=seconds + timeout + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish in time: {' '.join(command)}") from exc
    output = f"--- stdout:\n{_tail(done.stdout)}\n--- stderr:\n{_tail(done.stderr)}"
    if done.returncode != 0:
        raise WrkError(f"wrk exited with {done.returncode}: {' '.join(command)}\n{output}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(JSON_PREFIX)]
    if not lines:
        raise WrkError(f"wrk printed no {JSON_PREFIX.strip()} line: {' '.join(command)}\n{output}")
    return WrkResult.from_json(json.loads(lines[-1][len(JSON_PREFIX) :]))
