ALTER TABLE auth.refresh_tokens
    DROP COLUMN address,
    DROP COLUMN user_agent,
    DROP COLUMN login_at;
