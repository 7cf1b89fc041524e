-- Idempotency keys (API.md "Idempotent writes", shared/idempotency.py): one row per (scope, key),
-- 'running' while its first request executes, then 'finished' with the answer replayed to retries.
-- depends: 0004_email_ownership

CREATE TABLE auth.idempotency_keys (
    -- Whose key: the token's subject, or a fixed name for requests without a caller (signup).
    scope text NOT NULL,
    key text NOT NULL,
    -- SHA-256 of method, path and body: the same key with another request is refused.
    fingerprint bytea NOT NULL,
    -- Which request holds the claim: only it may finish or release it (a taken-over claim is not).
    claim_id uuid NOT NULL,
    state text NOT NULL DEFAULT 'running',
    status integer,
    headers jsonb,
    -- The answer's bytes, replayed as they were sent.
    body bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- When the claim was taken: a running claim older than the lease is abandoned and taken over.
    locked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key),
    CONSTRAINT idempotency_keys_state CHECK (state IN ('running', 'finished')),
    CONSTRAINT idempotency_keys_finished_has_answer
        CHECK (state = 'running' OR (status IS NOT NULL AND headers IS NOT NULL AND body IS NOT NULL))
);

-- The cleanup deletes keys older than 24 hours, oldest first, a batch at a time.
CREATE INDEX idempotency_keys_by_age ON auth.idempotency_keys (created_at);
