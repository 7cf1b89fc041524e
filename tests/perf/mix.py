"""The realistic mix (scenario MIX), the cold lookups (S1-DB), and what the services' metrics say.

MIX sends, in one wrk run, every kind of request a client makes, in the proportions of `KINDS`
(`--scenarios MIX`; the report lists them): public lookups of a code by email over a Zipf
distribution, authenticated reads, refresh grants, activations and signups. Each run gets a request
file of its own (`write_mix`) that `wrk/mix.lua` sends line by line, each line at most once, so
that the once-only writes (an activation, a signup) are sent once: the file holds more lines than
the run can send (the expected rate times the seconds, plus the connections), and every line's kind
is drawn independently, so any prefix a wrk thread gets through has the mix's proportions. Refresh
lines carry no token: mix.lua takes one from a queue that the run's refresh tokens (real password
logins) start and each answer's `refresh_token` refills, as refresh.lua does.

The lookups: `LookupUniverse` has at least MIN_UNIVERSE distinct emails. The known ones are the
dataset's users, every one of whom has an active code (`dataset.user_email`); the unknown ones are
generated (`unknown_email`, a domain no user has). A lookup is of an unknown email with probability
UNKNOWN_SHARE; then its rank in its part of the universe is drawn from a Zipf distribution with
exponent ZIPF_EXPONENT (rank r has weight 1 / r^s), so a few emails are asked very often and most
rarely or never. Ranks map to users through a fixed permutation (popularity is not the dataset's
order).

Statuses: the answers are judged twice. mix.lua counts every answer's status, and any status that
no kind of the file expects is `unexpected` (a failure). Per kind, the services' own request counter
(`http_requests_total{method, route, status}`, scraped from every instance before and after each
run, `scrape`) says what each route answered: an answer of another status than its kind expects is
counted against that kind. (The two lookup kinds share a route: there an answer is unexpected when
it is neither 200 nor 404, or when there are more 200s than known lookups sent, or more 404s than
unknown ones.)

Lookup paths: `referral_email_lookups_total{source=near|redis|database}` (the referral service's
code cache counts each lookup by email by where its answer came from), scraped the same way.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from prometheus_client.parser import text_string_to_metric_families

from deploy.local.processes import AUTH_API, REFERRAL_API
from tests.perf import wrk

ZIPF_EXPONENT = 1.0
MIN_UNIVERSE = 1_000_000  # distinct emails a lookup may ask for, at least
MIN_UNKNOWN = 100_000  # distinct unknown emails, at least (when the users alone fill the universe)
UNKNOWN_SHARE = 0.10  # of the lookups
# A multiplier coprime with any universe size below 10^15 of the form 2^a 5^b ...: checked at use.
_PERMUTE = 2_654_435_761
LOOKUP_PATH_SOURCES = ("near", "redis", "database")
EMAIL_LOOKUPS = "referral_email_lookups_total"
HTTP_REQUESTS = "http_requests_total"
MIX_HEADER = (
    "# wrk mix file (tests/perf/mix.py): KIND<TAB>EXPECT<TAB>then a request line of tests/perf/wrk.py\n"
)
SIGNUP_PASSWORD = "mix-signup-password"


@dataclass(frozen=True)
class Kind:
    """One kind of request of the mix: its share of the requests, what it expects, its route."""

    key: str
    share: float
    expect: int
    method: str
    route: str  # the route's template, as the services' http_requests_total names it
    service: str
    title: str


KINDS: tuple[Kind, ...] = (
    Kind("lookup-known", 0.54, 200, "GET", f"{REFERRAL_API}/codes", "referral", "code by email, a user's"),
    Kind("lookup-unknown", 0.06, 404, "GET", f"{REFERRAL_API}/codes", "referral", "code by email, nobody's"),
    Kind("me", 0.12, 200, "GET", f"{AUTH_API}/me", "auth", "GET /auth/me"),
    Kind("my-code", 0.10, 200, "GET", f"{REFERRAL_API}/codes/me", "referral", "GET /codes/me"),
    Kind(
        "my-referrals",
        0.08,
        200,
        "GET",
        f"{REFERRAL_API}/referrers/{{referrer_id}}/referrals",
        "referral",
        "a referrer's own first page",
    ),
    Kind("refresh", 0.05, 200, "POST", f"{AUTH_API}/token", "auth", "refresh grant"),
    Kind(
        "activation",
        0.045,
        201,
        "POST",
        f"{REFERRAL_API}/referrals",
        "referral",
        "activate a code (once each)",
    ),
    Kind("signup", 0.005, 201, "POST", f"{AUTH_API}/signup", "auth", "password signup (once each, argon2)"),
)
KIND = {kind.key: kind for kind in KINDS}
LOOKUP_KINDS = ("lookup-known", "lookup-unknown")


# --- the Zipf distribution over the lookup universe ----------------------------------------------


class Zipf:
    """Ranks 0..n-1 with P(rank r) proportional to 1 / (r + 1)^exponent (inverse CDF by bisection)."""

    def __init__(self, n: int, exponent: float = ZIPF_EXPONENT) -> None:
        if n < 1:
            raise ValueError(f"a Zipf distribution needs at least one rank, got {n}")
        self.n = n
        self.exponent = exponent
        self._cumulative = list(itertools.accumulate((r + 1) ** -exponent for r in range(n)))
        self._ranks = range(n)

    def probability(self, rank: int) -> float:
        return float((rank + 1) ** -self.exponent / self._cumulative[-1])

    def sample(self, rng: random.Random, k: int) -> list[int]:
        return rng.choices(self._ranks, cum_weights=self._cumulative, k=k)


def unknown_email(rank: int) -> str:
    """The unknown email of this rank: a domain no benchmark user has (theirs is example.com)."""
    return f"visitor{rank}@zipf.example.net"


class LookupUniverse:
    """The emails a lookup may ask for: `known` users' (`known_email(i)`, i < known) and generated
    unknown ones; at least MIN_UNIVERSE in all."""

    def __init__(
        self, known: int, known_email: Callable[[int], str], exponent: float = ZIPF_EXPONENT
    ) -> None:
        if known < 1:
            raise ValueError("the lookup universe needs at least one known email")
        self.known = known
        self.unknown = max(MIN_UNIVERSE - known, MIN_UNKNOWN)
        self.exponent = exponent
        self._known_email = known_email
        self._zipf_known = Zipf(known, exponent)
        self._zipf_unknown = Zipf(self.unknown, exponent)
        self._multiplier = _PERMUTE % known or 1
        while math.gcd(self._multiplier, known) != 1:
            self._multiplier += 1

    @property
    def size(self) -> int:
        return self.known + self.unknown

    def known_index(self, rank: int) -> int:
        """The user of a known rank: a fixed permutation (a * rank + 7 mod known, a coprime with it)."""
        return (self._multiplier * rank + 7) % self.known

    def draw(self, rng: random.Random, known: bool, k: int) -> list[str]:
        """`k` emails, known or unknown, each by its Zipf rank."""
        if known:
            return [self._known_email(self.known_index(r)) for r in self._zipf_known.sample(rng, k)]
        return [unknown_email(r) for r in self._zipf_unknown.sample(rng, k)]


# --- the mix file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixLine:
    kind: str
    request: wrk.Request


def encode_line(line: MixLine) -> str:
    kind = KIND.get(line.kind)
    if kind is None or not line.kind.replace("-", "").isalnum():
        raise ValueError(f"not a kind of the mix: {line.kind!r}")
    return f"{line.kind}\t{kind.expect}\t{wrk.encode_request(line.request)}"


def decode_line(text: str) -> tuple[str, int, wrk.Request]:
    kind, expect, rest = text.rstrip("\n").split("\t", 2)
    return kind, int(expect), wrk.decode_request(rest)


def write_mix(path: Path, lines: Iterable[MixLine]) -> Counter[str]:
    """Write the file mix.lua reads; the number of lines of each kind."""
    counts: Counter[str] = Counter()
    with path.open("w", encoding="ascii", newline="\n") as out:
        out.write(MIX_HEADER)
        for line in lines:
            out.write(encode_line(line) + "\n")
            counts[line.kind] += 1
    return counts


def read_mix(path: Path) -> list[tuple[str, int, wrk.Request]]:
    with path.open(encoding="ascii", newline="\n") as lines:
        return [decode_line(line) for line in lines if line.strip("\n") and not line.startswith("#")]


def mix_script() -> Path:
    return wrk.SCRIPTS / "mix.lua"


def mix_args(file: Path, tokens: Path | None) -> list[str]:
    """mix.lua's arguments (run_wrk's `args`); `tokens`: the refresh-token file, if any."""
    return [str(file), *([f"tokens={tokens}"] if tokens is not None else [])]


def draw_kinds(rng: random.Random, count: int, kinds: Sequence[Kind] = KINDS) -> list[str]:
    """`count` kinds drawn independently by their shares."""
    return rng.choices([k.key for k in kinds], weights=[k.share for k in kinds], k=count)


@dataclass
class MixInputs:
    """What one run's file is made of. `readers`: (user id, access token) of referrers who read
    their own things; `activations`: (access token, code), each used once; `signup_tag`: makes the
    run's signup emails unique in the whole benchmark."""

    universe: LookupUniverse
    readers: Sequence[tuple[str, str]]
    activations: Sequence[tuple[str, str]]
    signup_tag: str


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _lookup(email: str) -> wrk.Request:
    return wrk.Request("GET", f"{REFERRAL_API}/codes?email={quote(email, safe='')}")


def mix_lines(rng: random.Random, kinds: Sequence[str], inputs: MixInputs) -> Iterator[MixLine]:
    """The requests of the drawn kinds, in order. Needs as many activations as activation kinds."""
    counts = Counter(kinds)
    if counts["activation"] > len(inputs.activations):
        raise ValueError(f"{counts['activation']} activations drawn, {len(inputs.activations)} given")
    if not inputs.readers and any(counts[k] for k in ("me", "my-code", "my-referrals")):
        raise ValueError("authenticated reads drawn, but no readers given")
    emails = {
        key: iter(inputs.universe.draw(rng, key == "lookup-known", counts[key])) for key in LOOKUP_KINDS
    }
    activations = iter(inputs.activations)
    signups = itertools.count()
    json_headers = {"Content-Type": "application/json"}
    for key in kinds:
        if key in LOOKUP_KINDS:
            request = _lookup(next(emails[key]))
        elif key in ("me", "my-code", "my-referrals"):
            user, token = inputs.readers[rng.randrange(len(inputs.readers))]
            path = {
                "me": f"{AUTH_API}/me",
                "my-code": f"{REFERRAL_API}/codes/me",
                "my-referrals": f"{REFERRAL_API}/referrers/{user}/referrals?limit=20",
            }[key]
            request = wrk.Request("GET", path, _bearer(token))
        elif key == "refresh":  # mix.lua puts a token of its queue in the body
            request = wrk.Request(
                "POST", f"{AUTH_API}/token", {"Content-Type": "application/x-www-form-urlencoded"}
            )
        elif key == "activation":
            token, code = next(activations)
            body = json.dumps({"code": code})
            request = wrk.Request(
                "POST", f"{REFERRAL_API}/referrals", {**_bearer(token), **json_headers}, body
            )
        elif key == "signup":
            email = f"mix.{inputs.signup_tag}.{next(signups)}@example.org"
            body = json.dumps({"email": email, "password": SIGNUP_PASSWORD})
            request = wrk.Request("POST", f"{AUTH_API}/signup", json_headers, body)
        else:
            raise ValueError(f"not a kind of the mix: {key!r}")
        yield MixLine(key, request)


# --- the services' metrics -----------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels) -> value


def parse_metrics(text: str, names: Iterable[str] = (EMAIL_LOOKUPS, HTTP_REQUESTS)) -> Samples:
    """The samples of the named metrics in a Prometheus text exposition (ValueError if malformed)."""
    wanted = set(names)
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found[key] = found.get(key, 0.0) + float(sample.value)
    return found


def scrape(urls: Iterable[str], timeout: float = 5.0) -> tuple[Samples, list[str]]:
    """Every instance's samples, summed; and what could not be scraped."""
    total: Samples = {}
    failures: list[str] = []
    for url in urls:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=timeout) as response:
                samples = parse_metrics(response.read().decode("utf-8", errors="replace"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{url}/metrics: {error}")
            continue
        for key, value in samples.items():
            total[key] = total.get(key, 0.0) + value
    return total, failures


def delta(before: Samples, after: Samples) -> Samples:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value - before.get(key, 0.0)}


def lookup_paths(samples: Samples) -> dict[str, float]:
    """Lookups by email by source (near, redis, database) in a delta of samples."""
    paths = dict.fromkeys(LOOKUP_PATH_SOURCES, 0.0)
    for (name, labels), value in samples.items():
        source = dict(labels).get("source")
        if name == EMAIL_LOOKUPS and source in paths:
            paths[source] += value
    return paths


def shares(paths: Mapping[str, float]) -> dict[str, float]:
    """Each source's share of the lookups (empty when there were none)."""
    total = sum(paths.values())
    return {source: value / total for source, value in paths.items()} if total > 0 else {}


def route_statuses(samples: Samples) -> dict[tuple[str, str], Counter[int]]:
    """Answers by (method, route) and status in a delta of samples."""
    found: dict[tuple[str, str], Counter[int]] = {}
    for (name, labels), value in samples.items():
        if name != HTTP_REQUESTS:
            continue
        fields = dict(labels)
        key = (fields.get("method", ""), fields.get("route", ""))
        found.setdefault(key, Counter())[int(fields.get("status", "0"))] += round(value)
    return found


@dataclass(frozen=True)
class Judged:
    """One kind's figures in one run."""

    sent: int  # requests of the kind sent (mix.lua)
    expect: int
    answers: dict[str, int]  # status -> answers of the kind's route (the services' count)
    unexpected: int


def judge_kinds(
    sent: Mapping[str, int], answers: Mapping[tuple[str, str], Counter[int]]
) -> dict[str, Judged]:
    """Per kind: requests sent (mix.lua's count), the answers of its route by status (the services'
    count), and how many of them are unexpected (see the module's docstring)."""
    judged: dict[str, Judged] = {}
    lookup = answers.get(("GET", KIND["lookup-known"].route), Counter())
    for kind in KINDS:
        statuses = answers.get((kind.method, kind.route), Counter())
        if kind.key in LOOKUP_KINDS:
            # The shared route's 200s are the known lookups', its 404s the unknown ones'; more than
            # were sent of a kind are the other kind's, answered wrongly. Its other statuses count
            # against the known lookups.
            mine = lookup[kind.expect]
            excess = max(0, mine - sent.get(kind.key, 0))
            others = (
                {s: n for s, n in lookup.items() if s not in (200, 404)} if kind.key == "lookup-known" else {}
            )
            shown = {str(kind.expect): mine - excess} if mine - excess else {}
            shown.update((str(s), n) for s, n in sorted(others.items()))
            judged[kind.key] = Judged(
                sent.get(kind.key, 0), kind.expect, shown, excess + sum(others.values())
            )
            continue
        judged[kind.key] = Judged(
            sent.get(kind.key, 0),
            kind.expect,
            {str(status): count for status, count in sorted(statuses.items())},
            sum(count for status, count in statuses.items() if status != kind.expect),
        )
    return judged
