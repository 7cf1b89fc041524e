DROP TABLE auth.referral_outbox;
