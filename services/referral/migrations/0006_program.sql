-- The referral program's counters, kept by the database in the transaction that changes a link, so
-- a referrer's statistics and the leaderboard are read from a few rows, never by walking the links:
--   referral.referrer_levels: per referrer and level (1: direct referrals, 2: theirs, ... up to 5),
--     how many referrals and how many confirmed ones (REFERRAL_STATS_DEPTH shows up to 5 of them);
--   referral.leaderboard_counts: per period (week, month, all) and referrer, the confirmed links and
--     the first confirmation in the period, indexed in rank order;
--   referral.referrals.confirmed_at: when a link became confirmed, stamped by the database.
-- Links into one tree are serialized by the tree's advisory lock (services/referral/domain/use_cases.py),
-- so the ancestors the triggers walk do not move under them.
-- depends: 0003_email_verification

ALTER TABLE referral.referrals ADD COLUMN confirmed_at timestamptz;
-- Links confirmed before this migration: their confirmation time was not kept; their creation is the
-- closest known moment (links older than 0003 were confirmed when made).
UPDATE referral.referrals SET confirmed_at = created_at WHERE status = 'confirmed';
ALTER TABLE referral.referrals ADD CONSTRAINT referrals_confirmed_at_iff_confirmed
    CHECK ((status = 'confirmed') = (confirmed_at IS NOT NULL));

-- A link written or turned confirmed without a time gets the transaction's time.
CREATE FUNCTION referral.stamp_confirmation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.confirmed_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER referrals_confirmation_stamped BEFORE INSERT OR UPDATE OF status ON referral.referrals
    FOR EACH ROW WHEN (NEW.status = 'confirmed' AND NEW.confirmed_at IS NULL)
    EXECUTE FUNCTION referral.stamp_confirmation();

CREATE TABLE referral.referrer_levels (
    referrer_id uuid NOT NULL,
    level smallint NOT NULL CONSTRAINT referrer_levels_level_range CHECK (level BETWEEN 1 AND 5),
    total bigint NOT NULL CONSTRAINT referrer_levels_total_not_negative CHECK (total >= 0),
    confirmed bigint NOT NULL CONSTRAINT referrer_levels_confirmed_range CHECK (confirmed BETWEEN 0 AND total),
    PRIMARY KEY (referrer_id, level)
);

-- Periods of the leaderboard, in UTC: the ISO week (from Monday 00:00), the calendar month, and
-- 'all' (one period, starting 1970-01-01).
CREATE FUNCTION referral.period_starts(at timestamptz) RETURNS TABLE (period text, period_start date)
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('week', date_trunc('week', at AT TIME ZONE 'UTC')::date),
           ('month', date_trunc('month', at AT TIME ZONE 'UTC')::date),
           ('all', date '1970-01-01')
$$;
CREATE FUNCTION referral.period_end(period text, period_start date) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE period
        WHEN 'week' THEN (period_start + 7)::timestamp AT TIME ZONE 'UTC'
        WHEN 'month' THEN (period_start + interval '1 month') AT TIME ZONE 'UTC'
        ELSE 'infinity'::timestamptz
    END
$$;

CREATE TABLE referral.leaderboard_counts (
    period text NOT NULL CONSTRAINT leaderboard_counts_period_known CHECK (period IN ('week', 'month', 'all')),
    period_start date NOT NULL,
    referrer_id uuid NOT NULL,
    confirmed bigint NOT NULL CONSTRAINT leaderboard_counts_confirmed_not_negative CHECK (confirmed >= 0),
    first_at timestamptz NOT NULL,
    PRIMARY KEY (period, period_start, referrer_id)
);
-- A page of the leaderboard is a range scan of `limit` entries of this index.
CREATE INDEX leaderboard_ranked
    ON referral.leaderboard_counts (period, period_start, confirmed DESC, first_at, referrer_id);

-- A referrer's codes, newest first: the leaderboard shows the email of the newest.
CREATE INDEX codes_by_owner ON referral.codes (owner_id, created_at DESC);

-- Backfill from the links there are.
INSERT INTO referral.referrer_levels (referrer_id, level, total, confirmed)
WITH RECURSIVE up(status, ancestor, distance) AS (
    SELECT status, referrer_id, 1 FROM referral.referrals
    UNION ALL
    SELECT up.status, r.referrer_id, up.distance + 1
    FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
    WHERE up.distance < 5
)
SELECT ancestor, distance, count(*), count(*) FILTER (WHERE status = 'confirmed') FROM up GROUP BY 1, 2;

INSERT INTO referral.leaderboard_counts (period, period_start, referrer_id, confirmed, first_at)
SELECT p.period, p.period_start, r.referrer_id, count(*), min(r.confirmed_at)
FROM referral.referrals r CROSS JOIN LATERAL referral.period_starts(r.confirmed_at) AS p
WHERE r.confirmed_at IS NOT NULL
GROUP BY 1, 2, 3;

-- Confirmations leaving the leaderboard (links removed, or their confirmation moved): their counts
-- go down, an entry at zero goes, and an entry whose first confirmation left finds its new first one
-- among the referrer's links (only then: a confirmation that is not the first costs no lookup).
CREATE TYPE referral.confirmation AS (referrer_id uuid, confirmed_at timestamptz);
CREATE FUNCTION referral.leaderboard_uncount(confirmations referral.confirmation[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    WITH gone AS (
        SELECT p.period, p.period_start, g.referrer_id, count(*) AS n, min(g.confirmed_at) AS first_gone
        FROM unnest(confirmations) AS g CROSS JOIN LATERAL referral.period_starts(g.confirmed_at) AS p
        GROUP BY 1, 2, 3
    )
    UPDATE referral.leaderboard_counts AS t
    SET confirmed = t.confirmed - gone.n,
        first_at = CASE WHEN gone.first_gone > t.first_at THEN t.first_at ELSE coalesce((
            SELECT min(r.confirmed_at) FROM referral.referrals r
            WHERE r.referrer_id = t.referrer_id
              AND r.confirmed_at >= t.period_start::timestamp AT TIME ZONE 'UTC'
              AND r.confirmed_at < referral.period_end(t.period, t.period_start)
        ), t.first_at) END
    FROM gone
    WHERE t.period = gone.period AND t.period_start = gone.period_start AND t.referrer_id = gone.referrer_id;

    DELETE FROM referral.leaderboard_counts AS t
    USING (
        SELECT p.period, p.period_start, g.referrer_id
        FROM unnest(confirmations) AS g CROSS JOIN LATERAL referral.period_starts(g.confirmed_at) AS p
    ) AS gone
    WHERE t.period = gone.period AND t.period_start = gone.period_start AND t.referrer_id = gone.referrer_id
      AND t.confirmed = 0;
END
$$;

-- Links added by one statement (any number, in any shape). Each (ancestor, descendant) pair the
-- statement joins is counted once, for the lowest new link on the path between them: the ancestors
-- of that link's referrer as the links are now, times the levels its referral already had before the
-- statement (its referrer_levels rows, not yet touched by it) plus the referral itself.
CREATE FUNCTION referral.levels_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH RECURSIVE up(link, ancestor, distance) AS (
        SELECT referral_id, referrer_id, 1 FROM added
        UNION ALL
        SELECT up.link, r.referrer_id, up.distance + 1
        FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
        WHERE up.distance < 5
    ), below(link, depth, total, confirmed) AS (
        SELECT referral_id, 0, 1::bigint, (status = 'confirmed')::int::bigint FROM added
        UNION ALL
        SELECT a.referral_id, l.level, l.total, l.confirmed
        FROM added a JOIN referral.referrer_levels l ON l.referrer_id = a.referral_id AND l.level < 5
    )
    INSERT INTO referral.referrer_levels AS t (referrer_id, level, total, confirmed)
    SELECT up.ancestor, up.distance + below.depth, sum(below.total), sum(below.confirmed)
    FROM up JOIN below ON below.link = up.link AND up.distance + below.depth <= 5
    GROUP BY 1, 2
    ON CONFLICT (referrer_id, level) DO UPDATE
        SET total = t.total + excluded.total, confirmed = t.confirmed + excluded.confirmed;

    INSERT INTO referral.leaderboard_counts AS t (period, period_start, referrer_id, confirmed, first_at)
    SELECT p.period, p.period_start, a.referrer_id, count(*), min(a.confirmed_at)
    FROM added a CROSS JOIN LATERAL referral.period_starts(a.confirmed_at) AS p
    WHERE a.confirmed_at IS NOT NULL
    GROUP BY 1, 2, 3
    ON CONFLICT (period, period_start, referrer_id) DO UPDATE
        SET confirmed = t.confirmed + excluded.confirmed, first_at = least(t.first_at, excluded.first_at);
    RETURN NULL;
END
$$;

-- Links removed by one statement: each pair is uncounted once, for the highest removed link on its
-- path: the ancestors of that link's referrer as the links are now (above it nothing was removed),
-- times the levels its referral had before the statement.
CREATE FUNCTION referral.levels_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH RECURSIVE up(link, ancestor, distance) AS (
        SELECT referral_id, referrer_id, 1 FROM removed
        UNION ALL
        SELECT up.link, r.referrer_id, up.distance + 1
        FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
        WHERE up.distance < 5
    ), below(link, depth, total, confirmed) AS (
        SELECT referral_id, 0, 1::bigint, (status = 'confirmed')::int::bigint FROM removed
        UNION ALL
        SELECT g.referral_id, l.level, l.total, l.confirmed
        FROM removed g JOIN referral.referrer_levels l ON l.referrer_id = g.referral_id AND l.level < 5
    ), gone AS (
        SELECT up.ancestor, up.distance + below.depth AS level, sum(below.total) AS total,
               sum(below.confirmed) AS confirmed
        FROM up JOIN below ON below.link = up.link AND up.distance + below.depth <= 5
        GROUP BY 1, 2
    )
    UPDATE referral.referrer_levels AS t
    SET total = t.total - gone.total, confirmed = t.confirmed - gone.confirmed
    FROM gone WHERE t.referrer_id = gone.ancestor AND t.level = gone.level;

    PERFORM referral.leaderboard_uncount(array_agg((referrer_id, confirmed_at)::referral.confirmation))
    FROM removed WHERE confirmed_at IS NOT NULL HAVING count(*) > 0;
    RETURN NULL;
END
$$;

-- Links changed in place: a status that became confirmed counts at every level above the link, and a
-- confirmation that appeared, moved or went moves the leaderboard. A link keeps its referral and its
-- referrer (a new referrer is a new link: delete and insert), so the levels above it do not move.
CREATE FUNCTION referral.levels_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM changed c LEFT JOIN previous p ON p.referral_id = c.referral_id
        WHERE p.referral_id IS NULL OR p.referrer_id <> c.referrer_id
    ) THEN
        RAISE EXCEPTION 'a link keeps its referral and referrer: delete it and insert the new one';
    END IF;

    WITH RECURSIVE up(ancestor, distance, confirmed) AS (
        SELECT c.referrer_id, 1, (c.status = 'confirmed')::int - (p.status = 'confirmed')::int
        FROM changed c JOIN previous p ON p.referral_id = c.referral_id
        WHERE c.status <> p.status
        UNION ALL
        SELECT r.referrer_id, up.distance + 1, up.confirmed
        FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
        WHERE up.distance < 5
    )
    UPDATE referral.referrer_levels AS t SET confirmed = t.confirmed + moved.confirmed
    FROM (SELECT ancestor, distance, sum(confirmed) AS confirmed FROM up GROUP BY 1, 2) AS moved
    WHERE t.referrer_id = moved.ancestor AND t.level = moved.distance AND moved.confirmed <> 0;

    PERFORM referral.leaderboard_uncount(array_agg((p.referrer_id, p.confirmed_at)::referral.confirmation))
    FROM previous p JOIN changed c ON c.referral_id = p.referral_id
    WHERE p.confirmed_at IS NOT NULL AND p.confirmed_at IS DISTINCT FROM c.confirmed_at
    HAVING count(*) > 0;

    INSERT INTO referral.leaderboard_counts AS t (period, period_start, referrer_id, confirmed, first_at)
    SELECT p.period, p.period_start, c.referrer_id, count(*), min(c.confirmed_at)
    FROM changed c JOIN previous o ON o.referral_id = c.referral_id
    CROSS JOIN LATERAL referral.period_starts(c.confirmed_at) AS p
    WHERE c.confirmed_at IS NOT NULL AND c.confirmed_at IS DISTINCT FROM o.confirmed_at
    GROUP BY 1, 2, 3
    ON CONFLICT (period, period_start, referrer_id) DO UPDATE
        SET confirmed = t.confirmed + excluded.confirmed, first_at = least(t.first_at, excluded.first_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER referrals_program_on_insert AFTER INSERT ON referral.referrals
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION referral.levels_added();
CREATE TRIGGER referrals_program_on_update AFTER UPDATE ON referral.referrals
    REFERENCING OLD TABLE AS previous NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION referral.levels_changed();
CREATE TRIGGER referrals_program_on_delete AFTER DELETE ON referral.referrals
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION referral.levels_removed();
