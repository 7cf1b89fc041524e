-- Sessions (API.md "Data rights"): a session is one login, its refresh-token family. What the list of a
-- user's sessions shows is kept on the family's tokens, so the token endpoint writes it with the
-- statements it runs anyway (no extra statement on the login or refresh path):
--   login_at: when the family's login happened, copied onto each token as it rotates;
--   user_agent, address: the client that made this token (the login, or the refresh that rotated
--     the previous one), so a family's live token says where it was last used from.
-- A family's live token (not rotated, not revoked, not expired; at most one) is the session; its
-- created_at is the session's last use.
-- depends: 0006_webhooks

ALTER TABLE auth.refresh_tokens
    ADD COLUMN login_at timestamptz,
    ADD COLUMN user_agent text CONSTRAINT refresh_tokens_user_agent_length CHECK (char_length(user_agent) <= 256),
    ADD COLUMN address text CONSTRAINT refresh_tokens_address_length CHECK (char_length(address) <= 64);

-- Tokens made before this migration: their family's first token tells when the login happened.
UPDATE auth.refresh_tokens AS t
SET login_at = f.login_at
FROM (SELECT family_id, min(created_at) AS login_at FROM auth.refresh_tokens GROUP BY family_id) AS f
WHERE t.family_id = f.family_id;

ALTER TABLE auth.refresh_tokens
    ALTER COLUMN login_at SET DEFAULT now(),
    ALTER COLUMN login_at SET NOT NULL;
