DROP TRIGGER referrals_counted_on_update ON referral.referrals;
DROP FUNCTION referral.count_changed_referrals();

-- The counters as 0002 made them: totals only.
CREATE OR REPLACE FUNCTION referral.count_added_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO referral.referrer_totals AS t (referrer_id, total)
    SELECT referrer_id, count(*) FROM added GROUP BY referrer_id
    ON CONFLICT (referrer_id) DO UPDATE SET total = t.total + excluded.total;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION referral.count_removed_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE referral.referrer_totals AS t SET total = t.total - gone.total
    FROM (SELECT referrer_id, count(*) AS total FROM removed GROUP BY referrer_id) AS gone
    WHERE t.referrer_id = gone.referrer_id;
    RETURN NULL;
END
$$;

ALTER TABLE referral.referrer_totals DROP COLUMN confirmed;
DROP TABLE referral.verified_users;
ALTER TABLE referral.referrals DROP COLUMN status;
