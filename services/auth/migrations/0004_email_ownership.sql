-- Email ownership: whether a user's address is proven, the single-use tokens mailed to prove it or to
-- reset a password, the outbox of those mails, and the outbox of "verified" notices to the referral
-- service.
-- depends: 0003_identities

-- Accounts made before this migration count as unproven: their owners verify at their next request.
ALTER TABLE auth.users ADD COLUMN email_verified boolean NOT NULL DEFAULT false;

-- Only a digest of each token is kept: a database leak yields no usable link.
CREATE TABLE auth.mail_tokens (
    token_hash bytea PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    purpose text NOT NULL,
    -- The address the token was mailed to: proving it proves nothing about another.
    email text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    -- Used, or voided (a newer reset mail, a password change): never accepted again.
    used_at timestamptz,
    CONSTRAINT mail_tokens_hash_length CHECK (octet_length(token_hash) = 32),
    CONSTRAINT mail_tokens_purpose CHECK (purpose IN ('verify_email', 'reset_password'))
);

-- The live tokens of a user, to void them.
CREATE INDEX mail_tokens_live_by_user ON auth.mail_tokens (user_id, purpose) WHERE used_at IS NULL;

CREATE TABLE auth.mail_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    recipient text NOT NULL,
    kind text NOT NULL,
    -- The link with its token, until the mail is sent (then cleared: a leak later holds no live link).
    link text,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    -- While a delivery is in flight this is its lease: nobody else claims the row before then.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    failed_at timestamptz,
    last_error text,
    CONSTRAINT mail_outbox_kind CHECK (kind IN ('verify_email', 'reset_password')),
    CONSTRAINT mail_outbox_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT mail_outbox_last_error_length CHECK (char_length(last_error) <= 200),
    CONSTRAINT mail_outbox_one_outcome CHECK (delivered_at IS NULL OR failed_at IS NULL)
);

CREATE INDEX mail_outbox_pending_idx ON auth.mail_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- A user's address became proven: the referral service confirms their pending link (idempotent).
CREATE TABLE auth.verified_outbox (
    user_id uuid PRIMARY KEY REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    failed_at timestamptz,
    last_error text,
    CONSTRAINT verified_outbox_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT verified_outbox_last_error_length CHECK (char_length(last_error) <= 200),
    CONSTRAINT verified_outbox_one_outcome CHECK (delivered_at IS NULL OR failed_at IS NULL)
);

CREATE INDEX verified_outbox_pending_idx ON auth.verified_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
