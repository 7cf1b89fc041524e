DROP TRIGGER referrals_counted_on_delete ON referral.referrals;
DROP TRIGGER referrals_counted_on_insert ON referral.referrals;
DROP FUNCTION referral.count_removed_referrals();
DROP FUNCTION referral.count_added_referrals();
DROP TABLE referral.referrer_totals;
