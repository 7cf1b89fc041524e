"""SQLAlchemy Core tables of schema `auth`, mirroring the migrations (which are the source of truth)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from shared.denylist import erased_subjects_table as erased_subjects_table_of
from shared.idempotency import idempotency_keys_table as idempotency_keys_table_of
from shared.outbox_store import delivery_columns
from shared.webhooks import webhook_outbox_table as webhook_outbox_table_of

SCHEMA = "auth"
metadata = MetaData(schema=SCHEMA)

users_table = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("email", Text, nullable=False),
    Column("password_hash", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("referrer_id", Uuid),
    Column("email_check", JSONB),
    Column("profile", JSONB),
    Column("email_verified", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint("char_length(email) BETWEEN 3 AND 254", name="users_email_length"),
    CheckConstraint("referrer_id IS DISTINCT FROM id", name="users_not_own_referrer"),
)
Index("users_email_lower_key", func.lower(users_table.c.email), unique=True)

refresh_tokens_table = Table(
    "refresh_tokens",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("token_hash", LargeBinary, nullable=False, unique=True),
    Column("user_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), nullable=False),
    Column("family_id", Uuid, nullable=False),
    Column("parent_id", Uuid, ForeignKey("auth.refresh_tokens.id", ondelete="SET NULL")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("rotated_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    # The session (migration 0007): when its login happened, and the client that made this token.
    Column("login_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("user_agent", Text),
    Column("address", Text),
    CheckConstraint("octet_length(token_hash) = 32", name="refresh_tokens_hash_length"),
    CheckConstraint("char_length(user_agent) <= 256", name="refresh_tokens_user_agent_length"),
    CheckConstraint("char_length(address) <= 64", name="refresh_tokens_address_length"),
)
Index("refresh_tokens_family_idx", refresh_tokens_table.c.family_id)
Index("refresh_tokens_user_idx", refresh_tokens_table.c.user_id)
Index("refresh_tokens_parent_idx", refresh_tokens_table.c.parent_id)
Index(
    "refresh_tokens_one_live_per_family",
    refresh_tokens_table.c.family_id,
    unique=True,
    postgresql_where=text("rotated_at IS NULL AND revoked_at IS NULL"),
)

referral_outbox_table = Table(
    "referral_outbox",
    metadata,
    Column("referral_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), primary_key=True),
    Column("referrer_id", Uuid, nullable=False),
    Column("referral_email", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    Column("failed_at", DateTime(timezone=True)),
    Column("last_error", Text),
    CheckConstraint("attempts >= 0", name="referral_outbox_attempts_not_negative"),
    CheckConstraint("char_length(last_error) <= 200", name="referral_outbox_last_error_length"),
    CheckConstraint("delivered_at IS NULL OR failed_at IS NULL", name="referral_outbox_one_outcome"),
)
Index(
    "referral_outbox_pending_idx",
    referral_outbox_table.c.next_attempt_at,
    postgresql_where=text("delivered_at IS NULL AND failed_at IS NULL"),
)

identities_table = Table(
    "identities",
    metadata,
    Column("provider", Text, primary_key=True),
    Column("subject", Text, primary_key=True),
    Column("user_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), nullable=False),
    Column("email", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("char_length(subject) BETWEEN 1 AND 255", name="identities_subject_length"),
    CheckConstraint("char_length(email) BETWEEN 3 AND 254", name="identities_email_length"),
)
Index("identities_user_idx", identities_table.c.user_id)

mail_tokens_table = Table(
    "mail_tokens",
    metadata,
    Column("token_hash", LargeBinary, primary_key=True),
    Column("user_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), nullable=False),
    Column("purpose", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    CheckConstraint("octet_length(token_hash) = 32", name="mail_tokens_hash_length"),
    CheckConstraint("purpose IN ('verify_email', 'reset_password')", name="mail_tokens_purpose"),
)
Index(
    "mail_tokens_live_by_user",
    mail_tokens_table.c.user_id,
    mail_tokens_table.c.purpose,
    postgresql_where=text("used_at IS NULL"),
)


mail_outbox_table = Table(
    "mail_outbox",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("user_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), nullable=False),
    Column("recipient", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("link", Text),
    *delivery_columns("mail_outbox"),
    CheckConstraint("kind IN ('verify_email', 'reset_password')", name="mail_outbox_kind"),
)
Index(
    "mail_outbox_pending_idx",
    mail_outbox_table.c.next_attempt_at,
    postgresql_where=text("delivered_at IS NULL AND failed_at IS NULL"),
)

verified_outbox_table = Table(
    "verified_outbox",
    metadata,
    Column("user_id", Uuid, ForeignKey("auth.users.id", ondelete="CASCADE"), primary_key=True),
    *delivery_columns("verified_outbox"),
)
Index(
    "verified_outbox_pending_idx",
    verified_outbox_table.c.next_attempt_at,
    postgresql_where=text("delivered_at IS NULL AND failed_at IS NULL"),
)

# Idempotency keys of signup (migration 0005; shared/idempotency.py).
idempotency_keys_table = idempotency_keys_table_of(metadata)

# Webhook events to send, one row per (event, endpoint) (migration 0006; shared/webhooks.py).
webhook_outbox_table = webhook_outbox_table_of(metadata)

# Account erasures to carry to the referral service (migration 0008): no foreign key to users (the
# user is deleted in the transaction that writes the row); the user id is cleared once delivered.
erasure_outbox_table = Table(
    "erasure_outbox",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("user_id", Uuid),
    Column("replacement_id", Uuid),
    *delivery_columns("erasure_outbox"),
    CheckConstraint(
        "delivered_at IS NOT NULL OR (user_id IS NOT NULL AND replacement_id IS NOT NULL)",
        name="erasure_outbox_pending_has_user",
    ),
)
Index(
    "erasure_outbox_pending_idx",
    erasure_outbox_table.c.next_attempt_at,
    postgresql_where=text("delivered_at IS NULL AND failed_at IS NULL"),
)

# Erased subjects whose tokens are refused (migration 0008; shared/denylist.py).
erased_subjects_table = erased_subjects_table_of(metadata)
