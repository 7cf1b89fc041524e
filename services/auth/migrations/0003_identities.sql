-- Identities at sign-in providers (OAuth2 / OpenID Connect), each linked to one user.
-- depends: 0002_referral_outbox

CREATE TABLE auth.identities (
    provider text NOT NULL,
    -- The provider's stable id of the account (OIDC `sub`, GitHub's numeric user id as text).
    subject text NOT NULL,
    user_id uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    -- The email the provider gave when the identity was linked.
    email text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT identities_pkey PRIMARY KEY (provider, subject),
    CONSTRAINT identities_subject_length CHECK (char_length(subject) BETWEEN 1 AND 255),
    CONSTRAINT identities_email_length CHECK (char_length(email) BETWEEN 3 AND 254)
);

-- A user's identities (and the cascade when a user is deleted).
CREATE INDEX identities_user_idx ON auth.identities (user_id);
