-- How many referrals each referrer has, kept by the database itself, so a page of a referrer's
-- list reads its total from one row instead of counting a list that may hold millions.
-- depends: 0001_initial

CREATE TABLE referral.referrer_totals (
    referrer_id uuid PRIMARY KEY,
    total bigint NOT NULL CONSTRAINT referrer_totals_not_negative CHECK (total >= 0)
);

INSERT INTO referral.referrer_totals (referrer_id, total)
SELECT referrer_id, count(*) FROM referral.referrals GROUP BY referrer_id;

-- Statement-level triggers with transition tables: one upsert per statement and referrer, also for
-- COPY and multi-row inserts. Links into one tree are serialized by its advisory lock (the
-- referrer is in that tree), so the row lock taken here never waits long.
CREATE FUNCTION referral.count_added_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO referral.referrer_totals AS t (referrer_id, total)
    SELECT referrer_id, count(*) FROM added GROUP BY referrer_id
    ON CONFLICT (referrer_id) DO UPDATE SET total = t.total + excluded.total;
    RETURN NULL;
END
$$;

CREATE FUNCTION referral.count_removed_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE referral.referrer_totals AS t SET total = t.total - gone.total
    FROM (SELECT referrer_id, count(*) AS total FROM removed GROUP BY referrer_id) AS gone
    WHERE t.referrer_id = gone.referrer_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER referrals_counted_on_insert AFTER INSERT ON referral.referrals
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION referral.count_added_referrals();
CREATE TRIGGER referrals_counted_on_delete AFTER DELETE ON referral.referrals
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION referral.count_removed_referrals();
