DROP TABLE referral.webhook_outbox;
