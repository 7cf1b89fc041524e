"""Rules of the referral service that need no collaborator: a new code's lifetime, what others see."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.problems import ValidationProblem


@dataclass(frozen=True)
class CodeRules:
    min_lifetime: timedelta
    max_lifetime: timedelta

    def check_expiry(self, expires_at: datetime, now: datetime) -> None:
        """ValidationProblem naming `expires_at` unless the code lives between the two bounds."""
        if expires_at < now + self.min_lifetime:
            seconds = int(self.min_lifetime.total_seconds())
            raise ValidationProblem(errors={"expires_at": [f"must be at least {seconds} seconds ahead"]})
        if expires_at > now + self.max_lifetime:
            raise ValidationProblem(
                errors={"expires_at": [f"must be at most {self.max_lifetime.days} days ahead"]}
            )


def mask_email(email: str) -> str:
    """What a referrer's list shows others of a referral's email: `jane@example.com` -> `j***@example.com`."""
    local, at, domain = email.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"
