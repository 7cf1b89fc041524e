DROP TABLE referral.idempotency_keys;
