-- The referral outbox: links of signups with a referral code, written in the signup's transaction
-- and delivered to the referral service after the commit (at once, then by the relay with backoff).
-- depends: 0001_initial

CREATE TABLE auth.referral_outbox (
    referral_id uuid PRIMARY KEY REFERENCES auth.users (id) ON DELETE CASCADE,
    referrer_id uuid NOT NULL,
    referral_email text NOT NULL,
    code text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    -- While a delivery is in flight this is its lease: nobody else claims the row before then.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    -- A permanent refusal (409, 422): never retried.
    failed_at timestamptz,
    last_error text,
    CONSTRAINT referral_outbox_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT referral_outbox_last_error_length CHECK (char_length(last_error) <= 200),
    CONSTRAINT referral_outbox_one_outcome CHECK (delivered_at IS NULL OR failed_at IS NULL)
);

-- The relay's claim reads only rows still pending, oldest due first.
CREATE INDEX referral_outbox_pending_idx
    ON auth.referral_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
