DROP TABLE referral.referrals;
DROP TABLE referral.codes;
