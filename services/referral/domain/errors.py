"""Domain errors of the referral service, with their HTTP status and stable `code` (API.md)."""

from __future__ import annotations

from shared.problems import Problem


class CodeNotFound(Problem):
    status = 404
    code = "code_not_found"
    title = "No such referral code"


class CodeExpired(Problem):
    status = 410
    code = "code_expired"
    title = "The referral code has expired or was deleted"


class CodeExhausted(Problem):
    status = 409
    code = "code_exhausted"
    title = "The referral code has been used as many times as it allows"


class ActiveCodeExists(Problem):
    status = 409
    code = "active_code_exists"
    title = "You already have an active referral code"


class CodeTaken(Problem):
    status = 409
    code = "code_taken"
    title = "This code is already taken"


class SelfReferral(Problem):
    status = 422
    code = "self_referral"
    title = "You cannot use your own referral code"


class AlreadyReferred(Problem):
    status = 409
    code = "already_referred"
    title = "You are already someone's referral"


class ReferralCycle(Problem):
    status = 422
    code = "referral_cycle"
    title = "The code's owner is already your referral"


class EmailUnverified(Problem):
    status = 403
    code = "email_unverified"
    title = "Verify your email address first"


class Forbidden(Problem):
    status = 403
    code = "forbidden"
    title = "Only the referrer may see this"


class UserErased(Problem):
    status = 410
    code = "user_erased"
    title = "The user was erased"
