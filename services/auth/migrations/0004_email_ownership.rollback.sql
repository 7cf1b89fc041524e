DROP TABLE auth.verified_outbox;
DROP TABLE auth.mail_outbox;
DROP TABLE auth.mail_tokens;
ALTER TABLE auth.users DROP COLUMN email_verified;
