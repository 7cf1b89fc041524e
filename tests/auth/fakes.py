"""Fakes of the third-party APIs the auth service calls, served by real HTTP servers on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KEY = "hunter-KEY-s3cr3t-7f1e"
FAST = {"hunter_api_key": KEY, "hunter_poll_interval": 0.05, "hunter_timeout": 1.0}

Answer = tuple[int, Any]  # status and a JSON body, or raw text when the body is a str


def verdict(status: str, score: int | None = 90) -> Answer:
    return 200, {"data": {"email": "x", "status": status, "result": "x", "score": score}, "meta": {}}


def hunter_error(status: int) -> Answer:
    return status, {"errors": [{"id": "some_error", "code": status, "details": "something"}]}


@dataclass
class FakeHunter:
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    default: Answer = field(default_factory=lambda: verdict("valid", 92))
    delay: float = 0.0
    calls: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def answer(self, email: str, *answers: Answer) -> None:
        self.answers[email] = list(answers)

    def calls_for(self, email: str) -> int:
        return sum(1 for call in self.calls if call.get("email") == email)


@dataclass
class FakeErasures:
    """The referral service's `DELETE /internal/v1/users/{id}` (always 204): each call recorded as
    (user id, replacement id, Authorization header)."""

    erased: list[tuple[str, str, str]] = field(default_factory=list)
    url: str = ""

    def of(self, user_id: str) -> list[tuple[str, str]]:
        """The erasures of this user it was sent: (replacement id, Authorization header) each."""
        return [(replacement, auth) for erased, replacement, auth in self.erased if erased == user_id]
