"""SQLAlchemy Core tables of schema `referral`, mirroring the migrations (the source of truth)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
    text,
)

from shared.denylist import erased_subjects_table as erased_subjects_table_of
from shared.idempotency import idempotency_keys_table as idempotency_keys_table_of
from shared.webhooks import webhook_outbox_table as webhook_outbox_table_of

SCHEMA = "referral"
metadata = MetaData(schema=SCHEMA)

codes_table = Table(
    "codes",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("code", Text, nullable=False),
    Column("owner_id", Uuid, nullable=False),
    Column("owner_email", Text, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deleted_at", DateTime(timezone=True)),
    # The usage limit (migration 0005): NULL for none; `uses` counts links and reserved signups.
    Column("max_uses", Integer),
    Column("uses", Integer, nullable=False, server_default=text("0")),
    CheckConstraint("code ~ '^[A-Za-z0-9_-]{4,32}$'", name="codes_code_format"),
    CheckConstraint("expires_at > created_at", name="codes_expire_after_creation"),
    CheckConstraint("max_uses BETWEEN 1 AND 1000000", name="codes_max_uses_range"),
    CheckConstraint("uses >= 0 AND (max_uses IS NULL OR uses <= max_uses)", name="codes_uses_within_limit"),
)
Index("codes_code_lower_key", func.lower(codes_table.c.code), unique=True)
Index(
    "codes_one_open_per_owner",
    codes_table.c.owner_id,
    unique=True,
    postgresql_where=text("deleted_at IS NULL"),
)
Index(
    "codes_open_by_email", func.lower(codes_table.c.owner_email), postgresql_where=text("deleted_at IS NULL")
)

referrals_table = Table(
    "referrals",
    metadata,
    Column("referral_id", Uuid, primary_key=True),
    Column("referrer_id", Uuid, nullable=False),
    Column("referral_email", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # 'pending' until the referral's address is proven, then 'confirmed' (migration 0003). The service
    # always writes it; the default only covers rows written by other means.
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    # When the link became confirmed; stamped by the database (migration 0006).
    Column("confirmed_at", DateTime(timezone=True)),
    CheckConstraint("referrer_id <> referral_id", name="referrals_not_self"),
    CheckConstraint("status IN ('pending', 'confirmed')", name="referrals_status_known"),
    CheckConstraint(
        "(status = 'confirmed') = (confirmed_at IS NOT NULL)", name="referrals_confirmed_at_iff_confirmed"
    ),
)
Index(
    "referrals_by_referrer",
    referrals_table.c.referrer_id,
    referrals_table.c.created_at.desc(),
    referrals_table.c.referral_id.desc(),
)

# Kept by triggers on referrals (migrations 0002, 0003): how many referrals each referrer has, and how
# many of them are confirmed.
referrer_totals_table = Table(
    "referrer_totals",
    metadata,
    Column("referrer_id", Uuid, primary_key=True),
    Column("total", BigInteger, nullable=False),
    Column("confirmed", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("total >= 0", name="referrer_totals_not_negative"),
    CheckConstraint("confirmed >= 0", name="referrer_totals_confirmed_not_negative"),
)

# The users whose address is proven, as the auth service's notices said (migration 0003).
verified_users_table = Table(
    "verified_users",
    metadata,
    Column("user_id", Uuid, primary_key=True),
    Column("verified_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Uses of codes taken for signups whose link has not arrived yet (migration 0005).
code_reservations_table = Table(
    "code_reservations",
    metadata,
    Column("referral_id", Uuid, primary_key=True),
    Column("code_id", Uuid, ForeignKey("referral.codes.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("expires_at > created_at", name="code_reservations_expire_after_creation"),
)
Index("code_reservations_by_expiry", code_reservations_table.c.expires_at)

# Idempotency keys of code creation and activation (migration 0004; shared/idempotency.py).
idempotency_keys_table = idempotency_keys_table_of(metadata)

# --- the referral program (migration 0006), kept by triggers on referrals --------------------------

Index("codes_by_owner", codes_table.c.owner_id, codes_table.c.created_at.desc())

# Per referrer and level (1: direct referrals, 2: theirs, ... 5), the referrals and the confirmed ones.
referrer_levels_table = Table(
    "referrer_levels",
    metadata,
    Column("referrer_id", Uuid, nullable=False),
    Column("level", SmallInteger, nullable=False),
    Column("total", BigInteger, nullable=False),
    Column("confirmed", BigInteger, nullable=False),
    PrimaryKeyConstraint("referrer_id", "level"),
    CheckConstraint("level BETWEEN 1 AND 5", name="referrer_levels_level_range"),
    CheckConstraint("total >= 0", name="referrer_levels_total_not_negative"),
    CheckConstraint("confirmed BETWEEN 0 AND total", name="referrer_levels_confirmed_range"),
)

# Per leaderboard period (week, month, all; `period_start` its first day, UTC) and referrer: the links
# confirmed in it and the first of those confirmations.
leaderboard_counts_table = Table(
    "leaderboard_counts",
    metadata,
    Column("period", Text, nullable=False),
    Column("period_start", Date, nullable=False),
    Column("referrer_id", Uuid, nullable=False),
    Column("confirmed", BigInteger, nullable=False),
    Column("first_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("period", "period_start", "referrer_id"),
    CheckConstraint("period IN ('week', 'month', 'all')", name="leaderboard_counts_period_known"),
    CheckConstraint("confirmed >= 0", name="leaderboard_counts_confirmed_not_negative"),
)
Index(
    "leaderboard_ranked",
    leaderboard_counts_table.c.period,
    leaderboard_counts_table.c.period_start,
    leaderboard_counts_table.c.confirmed.desc(),
    leaderboard_counts_table.c.first_at,
    leaderboard_counts_table.c.referrer_id,
)

# Webhook events to send, one row per (event, endpoint) (migration 0007; shared/webhooks.py).
webhook_outbox_table = webhook_outbox_table_of(metadata)
# Erased users, as digests of their ids (migration 0009; shared/denylist.py).
erased_subjects_table = erased_subjects_table_of(metadata)
