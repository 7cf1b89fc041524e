DROP TABLE referral.code_reservations;
ALTER TABLE referral.codes
    DROP CONSTRAINT codes_uses_within_limit,
    DROP COLUMN uses,
    DROP COLUMN max_uses;
