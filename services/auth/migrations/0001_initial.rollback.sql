DROP TABLE auth.refresh_tokens;
DROP TABLE auth.users;
