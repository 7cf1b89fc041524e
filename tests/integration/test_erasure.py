"""Account erasure across both services (issue 14): erased while the referral service is down, then
back; nothing of the person left in either schema (every column of both schemas is classified), the
statistics still equal a recursive count, the code text never issued again, the tokens refused by both
services from the 204 on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.integration.conftest import CODES, eventually, new_email, referrals_in
from tests.referral.test_program_soak import _RECURSIVE_LEVELS

ME = "/api/v1/auth/me"

# Every column of both schemas, by whether it can hold a user's id or email (or text naming them):
# PERSONAL, searched for the erased person, or IMPERSONAL. A new table or column fails
# `unclassified` (and the test below) until it is in exactly one of them.
PERSONAL = {
    "auth.users": {"id", "email", "password_hash", "referrer_id", "email_check", "profile"},
    "auth.refresh_tokens": {"user_id", "user_agent", "address"},
    "auth.identities": {"user_id", "email", "subject"},
    "auth.mail_tokens": {"user_id", "email"},
    "auth.mail_outbox": {"user_id", "recipient", "link", "last_error"},  # SMTP errors echo the address
    "auth.referral_outbox": {"referral_id", "referrer_id", "referral_email"},
    "auth.verified_outbox": {"user_id"},
    "auth.erasure_outbox": {"user_id", "replacement_id", "last_error"},
    "auth.idempotency_keys": {"scope", "body", "headers"},
    "auth.erased_subjects": set(),  # digests only
    # An event's body names people until it is delivered or failed for good (then it is cleared).
    "auth.webhook_outbox": {"body"},
    "referral.codes": {"owner_id", "owner_email"},
    "referral.referrals": {"referral_id", "referrer_id", "referral_email"},
    "referral.referrer_totals": {"referrer_id"},
    "referral.referrer_levels": {"referrer_id"},
    "referral.leaderboard_counts": {"referrer_id"},
    "referral.code_reservations": {"referral_id"},
    "referral.verified_users": {"user_id"},
    "referral.idempotency_keys": {"scope", "body", "headers"},
    "referral.erased_subjects": set(),
    "referral.webhook_outbox": {"body"},
}
_OUTBOX = {"created_at", "attempts", "next_attempt_at", "delivered_at", "failed_at"}
# A webhook's endpoint is the deployer's; its last error names the endpoint, never the event's data.
_WEBHOOKS = {"id", "event_id", "event_type", "endpoint", "last_error"} | _OUTBOX
_IDEMPOTENCY = {"key", "fingerprint", "claim_id", "state", "status", "created_at", "locked_at"}
IMPERSONAL = {
    "auth.users": {"created_at", "email_verified"},
    "auth.refresh_tokens": {"id", "token_hash", "family_id", "parent_id", "created_at", "expires_at"}
    | {"rotated_at", "revoked_at", "login_at"},
    "auth.identities": {"provider", "created_at"},
    "auth.mail_tokens": {"token_hash", "purpose", "created_at", "expires_at", "used_at"},
    "auth.mail_outbox": {"id", "kind"} | _OUTBOX,
    # A code's text stays reserved after its owner is erased (API.md): kept on purpose.
    "auth.referral_outbox": {"code", "last_error"} | _OUTBOX,
    "auth.verified_outbox": {"last_error"} | _OUTBOX,
    "auth.erasure_outbox": {"id"} | _OUTBOX,
    "auth.idempotency_keys": _IDEMPOTENCY,
    "auth.erased_subjects": {"subject_digest", "erased_at", "tokens_expire_at"},
    "auth.webhook_outbox": _WEBHOOKS,
    "referral.codes": {"id", "code", "expires_at", "created_at", "deleted_at", "max_uses", "uses"},
    "referral.referrals": {"code", "created_at", "status", "confirmed_at"},
    "referral.referrer_totals": {"total", "confirmed"},
    "referral.referrer_levels": {"level", "total", "confirmed"},
    "referral.leaderboard_counts": {"period", "period_start", "confirmed", "first_at"},
    "referral.code_reservations": {"code_id", "created_at", "expires_at"},
    "referral.verified_users": {"verified_at"},
    "referral.idempotency_keys": _IDEMPOTENCY,
    "referral.erased_subjects": {"subject_digest", "erased_at", "tokens_expire_at"},
    "referral.webhook_outbox": _WEBHOOKS,
}
# yoyo's bookkeeping lives in each schema too: no personal data.
BOOKKEEPING = ("_yoyo", "yoyo_")


def unclassified(db: Any) -> dict[str, set[str]]:
    """Columns of both schemas in neither PERSONAL nor IMPERSONAL, and columns in both or in neither
    schema (so the classification cannot rot); empty when every column is classified exactly once."""
    problems: dict[str, set[str]] = {}
    found = schema_columns(db)
    for table in sorted(set(found) | set(PERSONAL) | set(IMPERSONAL)):
        personal, impersonal = PERSONAL.get(table, set()), IMPERSONAL.get(table, set())
        wrong = (found.get(table, set()) ^ (personal | impersonal)) | (personal & impersonal)
        if wrong:
            problems[table] = wrong
    return problems


def schema_columns(db: Any) -> dict[str, set[str]]:
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT table_schema || '.' || table_name, column_name FROM information_schema.columns"
            " WHERE table_schema IN ('auth', 'referral')"
        )
        found: dict[str, set[str]] = {}
        for table, column in cursor.fetchall():
            if not table.split(".", 1)[1].startswith(BOOKKEEPING):
                found.setdefault(table, set()).add(column)
    return found


def columns_holding(db: Any, needles: list[str]) -> list[str]:
    """Every table.column whose value (as text) contains one of the needles, case-insensitively."""
    hits = []
    with db.cursor() as cursor:
        for table, columns in PERSONAL.items():
            for column in sorted(columns):
                stored_bytes = column == "body" and table.endswith(".idempotency_keys")  # bytea
                expression = f"convert_from({column}, 'UTF8')" if stored_bytes else f"{column}::text"
                for needle in needles:
                    cursor.execute(
                        f"SELECT count(*) FROM {table} WHERE position(lower(%s) IN lower({expression})) > 0",
                        (needle,),
                    )
                    if cursor.fetchone()[0]:
                        hits.append(f"{table}.{column}")
    return hits


def counted_and_kept_levels(db: Any) -> tuple[set[tuple[str, int, int, int]], set[tuple[str, int, int, int]]]:
    with db.cursor() as cursor:
        cursor.execute(_RECURSIVE_LEVELS)
        counted = {(a, int(d), int(t), int(c)) for a, d, t, c in cursor.fetchall()}
        cursor.execute(
            "SELECT referrer_id::text, level, total, confirmed FROM referral.referrer_levels WHERE total > 0"
        )
        kept = {(a, int(d), int(t), int(c)) for a, d, t, c in cursor.fetchall()}
    return counted, kept


def test_every_column_of_both_schemas_is_classified(db):
    assert unclassified(db) == {}


async def test_erasure_while_the_referral_service_is_down_completes_when_it_is_back(cluster, db):
    top, top_code = await cluster.referrer_with_code(new_email("top"))
    erased = await cluster.user(new_email("mid"))
    # The person in the middle: a referrer above, a code of their own, a referral below.
    linked = await cluster.post(
        cluster.referral_url + "/api/v1/referral/referrals", json={"code": top_code}, headers=erased.headers
    )
    assert linked.status == 201, await linked.text()
    mid_code = await cluster.create_code(erased, f"Mid{erased.id[:6]}")
    below_email = new_email("below")
    assert (await cluster.signup(below_email, mid_code)).status == 201
    await eventually(lambda: len(referrals_in(db, erased.id)) == 1)
    counted_before, _ = counted_and_kept_levels(db)

    await cluster.stop_referral()
    wrong = await cluster.http.delete(
        cluster.auth_url + ME, json={"password": "not it"}, headers=erased.headers
    )
    assert wrong.status == 403
    assert (await wrong.json())["code"] == "wrong_password"
    missing = await cluster.http.delete(cluster.auth_url + ME, json={}, headers=erased.headers)
    assert missing.status == 422
    done = await cluster.http.delete(
        cluster.auth_url + ME, json={"password": "correct horse"}, headers=erased.headers
    )
    assert done.status == 204, await done.text()
    # Refused at once by the auth service; a repeat is refused too.
    assert (await cluster.http.get(cluster.auth_url + ME, headers=erased.headers)).status == 401
    again = await cluster.http.delete(
        cluster.auth_url + ME, json={"password": "correct horse"}, headers=erased.headers
    )
    assert again.status == 401

    await cluster.start_referral()
    mine = await cluster.http.get(cluster.referral_url + CODES + "/me", headers=erased.headers)
    assert mine.status == 401
    with db.cursor() as cursor:

        def delivered() -> bool:
            cursor.execute("SELECT count(*) FROM auth.erasure_outbox WHERE delivered_at IS NULL")
            return cursor.fetchone()[0] == 0

        await eventually(delivered)
    assert columns_holding(db, [erased.id, erased.email]) == []

    # Statistics exact: the counters equal the recursive count, and the top referrer keeps both levels.
    counted, kept = counted_and_kept_levels(db)
    assert counted == kept
    top_levels = {(d, t) for a, d, t, _ in counted if a == top.id}
    assert top_levels == {(d, t) for a, d, t, _ in counted_before if a == top.id} == {(1, 1), (2, 1)}
    stats = await cluster.http.get(
        cluster.referral_url + f"/api/v1/referral/referrers/{top.id}/stats", headers=top.headers
    )
    body = await stats.json()
    assert [(level["level"], level["total"]) for level in body["levels"][:2]] == [(1, 1), (2, 1)]

    # The code's text is never issued again, in any case.
    other = await cluster.user(new_email("other"))
    taken = await cluster.post(
        cluster.referral_url + CODES,
        json={"expires_at": (datetime.now(UTC) + timedelta(days=1)).isoformat(), "code": mid_code.upper()},
        headers=other.headers,
    )
    assert taken.status == 409
    assert (await taken.json())["code"] == "code_taken"


async def test_a_second_internal_delete_changes_nothing(cluster, db):
    user = await cluster.user(new_email("twice"))
    code = await cluster.create_code(user)
    done = await cluster.http.delete(
        cluster.auth_url + ME, json={"password": "correct horse"}, headers=user.headers
    )
    assert done.status == 204
    with db.cursor() as cursor:

        def delivered() -> bool:
            cursor.execute("SELECT count(*) FROM auth.erasure_outbox WHERE delivered_at IS NULL")
            return cursor.fetchone()[0] == 0

        await eventually(delivered)
        cursor.execute(
            "SELECT owner_id, owner_email, deleted_at IS NOT NULL FROM referral.codes WHERE code = %s",
            (code,),
        )
        before = cursor.fetchall()
    from services.auth.adapters.referral_client import ServiceToken
    from services.auth.adapters.signing import AccessTokenIssuer, load_key_ring

    settings = cluster.auth_settings
    issuer = AccessTokenIssuer(
        load_key_ring(settings), issuer=settings.issuer, audience=settings.token_audience, ttl=300
    )
    token = ServiceToken(issuer, audience=settings.referral_audience).bearer()
    repeat = await cluster.http.delete(
        cluster.referral_url + f"/internal/v1/users/{user.id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert repeat.status == 204
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT owner_id, owner_email, deleted_at IS NOT NULL FROM referral.codes WHERE code = %s",
            (code,),
        )
        assert cursor.fetchall() == before
    assert before[0][1] == "" and before[0][2] is True
