DROP TABLE auth.webhook_outbox;
