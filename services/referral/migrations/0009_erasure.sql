-- Erasure of a user (DELETE /internal/v1/users/{id}, from the auth service's outbox): the erased
-- subjects, kept as SHA-256 digests of their ids (shared/denylist.py). Their access tokens are refused
-- until `tokens_expire_at`; the row stays after that, so a link or a notice for the erased id that
-- was already on its way when the erasure arrived cannot bring the id back.
-- depends: 0008_webhooks

CREATE TABLE referral.erased_subjects (
    subject_digest bytea PRIMARY KEY,
    erased_at timestamptz NOT NULL DEFAULT now(),
    tokens_expire_at timestamptz NOT NULL,
    CONSTRAINT erased_subjects_digest_length CHECK (octet_length(subject_digest) = 32)
);

CREATE INDEX erased_subjects_by_expiry ON referral.erased_subjects (tokens_expire_at);
