-- Account erasure (DELETE /api/v1/auth/me): the outbox of erasures to carry to the referral service,
-- and the erased subjects whose access tokens both services refuse until they expire.
-- depends: 0007_sessions

-- One row per erasure, written in the erasure's transaction. No foreign key to auth.users: the user is
-- deleted in that same transaction, and the row must outlive them until the referral service has
-- erased its part. Once delivered, the row keeps neither id (the relay clears them).
CREATE TABLE auth.erasure_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid,
    -- The random id the referral service re-keys the person's place in the referral trees to; other
    -- users' referrer_id and undelivered links already name it.
    replacement_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    -- While a delivery is in flight this is its lease: nobody else claims the row before then.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    failed_at timestamptz,
    last_error text,
    CONSTRAINT erasure_outbox_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT erasure_outbox_last_error_length CHECK (char_length(last_error) <= 200),
    CONSTRAINT erasure_outbox_one_outcome CHECK (delivered_at IS NULL OR failed_at IS NULL),
    CONSTRAINT erasure_outbox_pending_has_user CHECK (delivered_at IS NOT NULL OR (user_id IS NOT NULL AND replacement_id IS NOT NULL))
);

CREATE INDEX erasure_outbox_pending_idx ON auth.erasure_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- Erased subjects (shared/denylist.py): the SHA-256 of the user id, never the id, and when the longest
-- access token they could hold has expired. Read when Redis cannot be; pushed back into Redis when it
-- returns. Kept after expiry (only unexpired rows are read).
CREATE TABLE auth.erased_subjects (
    subject_digest bytea PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now(),
    tokens_expire_at timestamptz NOT NULL,
    CONSTRAINT erased_subjects_digest_length CHECK (octet_length(subject_digest) = 32)
);

CREATE INDEX erased_subjects_by_expiry ON auth.erased_subjects (tokens_expire_at);
