-- Users and refresh tokens of the auth service (schema auth, created by the migration runner).
-- depends:

CREATE TABLE auth.users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL CONSTRAINT users_email_length CHECK (char_length(email) BETWEEN 3 AND 254),
    password_hash text,
    created_at timestamptz NOT NULL DEFAULT now(),
    referrer_id uuid,
    email_check jsonb,
    profile jsonb,
    CONSTRAINT users_not_own_referrer CHECK (referrer_id IS DISTINCT FROM id)
);

-- Emails are unique case-insensitively; lookups by lower(email) use this index.
CREATE UNIQUE INDEX users_email_lower_key ON auth.users (lower(email));

CREATE TABLE auth.refresh_tokens (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash bytea NOT NULL CONSTRAINT refresh_tokens_token_hash_key UNIQUE,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    family_id uuid NOT NULL,
    parent_id uuid REFERENCES auth.refresh_tokens (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz,
    revoked_at timestamptz,
    CONSTRAINT refresh_tokens_hash_length CHECK (octet_length(token_hash) = 32)
);

CREATE INDEX refresh_tokens_family_idx ON auth.refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON auth.refresh_tokens (user_id);
CREATE INDEX refresh_tokens_parent_idx ON auth.refresh_tokens (parent_id);

-- A login's token family has at most one live token, whatever the concurrency.
CREATE UNIQUE INDEX refresh_tokens_one_live_per_family
    ON auth.refresh_tokens (family_id)
    WHERE rotated_at IS NULL AND revoked_at IS NULL;
