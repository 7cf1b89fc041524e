DROP TABLE referral.erased_subjects;
