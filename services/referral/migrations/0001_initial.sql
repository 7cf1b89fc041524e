-- Referral codes and referrals (schema referral, created by the migration runner).
-- depends:

CREATE TABLE referral.codes (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    code text NOT NULL CONSTRAINT codes_code_format CHECK (code ~ '^[A-Za-z0-9_-]{4,32}$'),
    owner_id uuid NOT NULL,
    owner_email text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- When the code stopped being usable: deleted by its owner, or, for an expired code closed when its
    -- owner made a new one, its expiry.
    deleted_at timestamptz,
    CONSTRAINT codes_expire_after_creation CHECK (expires_at > created_at)
);

-- A code is unique case-insensitively, forever: a code once given out never points to someone else.
CREATE UNIQUE INDEX codes_code_lower_key ON referral.codes (lower(code));

-- At most one open (not deleted) code per owner, whatever the concurrency. An expired code is closed
-- (deleted_at = expires_at) in the same transaction that opens its successor.
CREATE UNIQUE INDEX codes_one_open_per_owner ON referral.codes (owner_id) WHERE deleted_at IS NULL;

-- The public lookup of a referrer's active code by email.
CREATE INDEX codes_open_by_email ON referral.codes (lower(owner_email)) WHERE deleted_at IS NULL;

CREATE TABLE referral.referrals (
    -- A user is a referral at most once: the referral's id is the key.
    referral_id uuid PRIMARY KEY,
    referrer_id uuid NOT NULL,
    referral_email text NOT NULL,
    code text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT referrals_not_self CHECK (referrer_id <> referral_id)
);

-- A referrer's referrals, newest first, for keyset pagination.
CREATE INDEX referrals_by_referrer ON referral.referrals (referrer_id, created_at DESC, referral_id DESC);
