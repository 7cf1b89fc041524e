-- Email ownership: a link is `pending` until its referral's address is proven, then `confirmed`;
-- the users whose address the auth service told us is proven; and each referrer's confirmed count,
-- kept by the database next to the total.
-- depends: 0002_referrer_totals

-- Links made before this migration predate email verification: nobody could prove an address then,
-- and the program counted every link, so they stay counted: they become 'confirmed'. (ADD COLUMN with
-- a constant default rewrites no row: the rows already there read it; the CHECK costs one read.)
-- From now on the service gives every new link its status explicitly (in the statement that checks
-- referral.verified_users, see services/referral/db/repositories.py); a row written by any other
-- means without one is 'pending', the state that promises nothing.
ALTER TABLE referral.referrals
    ADD COLUMN status text NOT NULL DEFAULT 'confirmed'
        CONSTRAINT referrals_status_known CHECK (status IN ('pending', 'confirmed'));
ALTER TABLE referral.referrals ALTER COLUMN status SET DEFAULT 'pending';

-- The users whose address is proven (the auth service's notice arrived). A link made for one of them,
-- even later, is confirmed when it is written. Kept for good: a proven address stays proven.
CREATE TABLE referral.verified_users (
    user_id uuid PRIMARY KEY,
    verified_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE referral.referrer_totals
    ADD COLUMN confirmed bigint NOT NULL DEFAULT 0
        CONSTRAINT referrer_totals_confirmed_not_negative CHECK (confirmed >= 0);

UPDATE referral.referrer_totals AS t SET confirmed = c.confirmed
FROM (
    SELECT referrer_id, count(*) AS confirmed FROM referral.referrals
    WHERE status = 'confirmed' GROUP BY referrer_id
) AS c
WHERE t.referrer_id = c.referrer_id;

-- The insert and delete counters of 0002, now counting confirmed rows too.
CREATE OR REPLACE FUNCTION referral.count_added_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO referral.referrer_totals AS t (referrer_id, total, confirmed)
    SELECT referrer_id, count(*), count(*) FILTER (WHERE status = 'confirmed') FROM added GROUP BY referrer_id
    ON CONFLICT (referrer_id) DO UPDATE
        SET total = t.total + excluded.total, confirmed = t.confirmed + excluded.confirmed;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION referral.count_removed_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE referral.referrer_totals AS t
    SET total = t.total - gone.total, confirmed = t.confirmed - gone.confirmed
    FROM (
        SELECT referrer_id, count(*) AS total, count(*) FILTER (WHERE status = 'confirmed') AS confirmed
        FROM removed GROUP BY referrer_id
    ) AS gone
    WHERE t.referrer_id = gone.referrer_id;
    RETURN NULL;
END
$$;

-- An UPDATE moves counts only where it changes a row's status (or referrer): per referrer, what the
-- new rows count minus what the old ones did, applied where that is not zero (an UPDATE of anything
-- else touches no totals row). Referrers that have a row are updated (an INSERT proposing a negative
-- change would fail its CHECK even when it conflicts); one that has none yet (rows given a new
-- referrer) gets one.
CREATE FUNCTION referral.count_changed_referrals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH change AS (
        SELECT referrer_id, sum(total) AS total, sum(confirmed) AS confirmed
        FROM (
            SELECT referrer_id, 1 AS total, (status = 'confirmed')::int AS confirmed FROM changed
            UNION ALL
            SELECT referrer_id, -1, -(status = 'confirmed')::int FROM previous
        ) AS moves
        GROUP BY referrer_id
        HAVING sum(total) <> 0 OR sum(confirmed) <> 0
    ), applied AS (
        UPDATE referral.referrer_totals AS t
        SET total = t.total + change.total, confirmed = t.confirmed + change.confirmed
        FROM change
        WHERE t.referrer_id = change.referrer_id
        RETURNING t.referrer_id
    )
    INSERT INTO referral.referrer_totals AS t (referrer_id, total, confirmed)
    SELECT referrer_id, total, confirmed FROM change
    WHERE referrer_id NOT IN (SELECT referrer_id FROM applied)
    ON CONFLICT (referrer_id) DO UPDATE
        SET total = t.total + excluded.total, confirmed = t.confirmed + excluded.confirmed;
    RETURN NULL;
END
$$;

CREATE TRIGGER referrals_counted_on_update AFTER UPDATE ON referral.referrals
    REFERENCING OLD TABLE AS previous NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION referral.count_changed_referrals();
