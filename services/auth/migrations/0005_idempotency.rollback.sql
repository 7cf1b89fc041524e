DROP TABLE auth.idempotency_keys;
