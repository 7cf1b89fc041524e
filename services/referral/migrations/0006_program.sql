-- The referral program's counters, kept by the database in the transaction that changes a link, so
-- a referrer's statistics and the leaderboard are read from a few rows, never by walking the links:
--   referral.referrer_levels: per referrer and level (1: direct referrals, 2: theirs, ... up to 5),
--     how many referrals and how many confirmed ones (REFERRAL_STATS_DEPTH shows up to 5 of them);
--   referral.leaderboard_counts: per period (week, month, all) and referrer, the confirmed links and
--     the first confirmation in the period, indexed in rank order;
--   referral.referrals.confirmed_at: when a link became confirmed, stamped by the database.
-- Links into one tree are serialized by the tree's advisory lock (services/referral/domain/use_cases.py),
-- so the ancestors the triggers walk do not move under them.
-- depends: 0005_code_limits

ALTER TABLE referral.referrals ADD COLUMN confirmed_at timestamptz;
-- Links confirmed before this migration: their confirmation time was not kept; their creation is the
-- closest known moment (links older than 0003 were confirmed when made).
UPDATE referral.referrals SET confirmed_at = created_at WHERE status = 'confirmed';
ALTER TABLE referral.referrals ADD CONSTRAINT referrals_confirmed_at_iff_confirmed
    CHECK ((status = 'confirmed') = (confirmed_at IS NOT NULL));

-- A link written or turned confirmed without a time gets the transaction's time; one turned back to
-- pending (the service never does) loses its time.
CREATE FUNCTION referral.stamp_confirmation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.confirmed_at := CASE WHEN NEW.status = 'confirmed' THEN now() END;
    RETURN NEW;
END
$$;
CREATE TRIGGER referrals_confirmation_stamped BEFORE INSERT OR UPDATE ON referral.referrals
    FOR EACH ROW WHEN ((NEW.status = 'confirmed') <> (NEW.confirmed_at IS NOT NULL))
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

-- Links changed in place. A link given another referrer (or referral) is moved: taken out as a delete
-- would, from the links as they are without the moved ones (referral.levels_remove), then put back as
-- an insert would (referral.levels_add). Then a status changed on a link that stayed moves the
-- confirmed counts of its ancestors as they are now. The leaderboard loses the confirmations that
-- went (or moved to another referrer or time) and gains the ones that came.
CREATE TYPE referral.link AS (referral_id uuid, referrer_id uuid, status text);

CREATE FUNCTION referral.levels_remove(links referral.link[], hidden uuid[]) RETURNS void
LANGUAGE sql AS $$
    WITH RECURSIVE up(link, ancestor, distance) AS (
        SELECT g.referral_id, g.referrer_id, 1 FROM unnest(links) AS g
        UNION ALL
        SELECT up.link, r.referrer_id, up.distance + 1
        FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor AND r.referral_id <> ALL (hidden)
        WHERE up.distance < 5
    ), below(link, depth, total, confirmed) AS (
        SELECT g.referral_id, 0, 1::bigint, (g.status = 'confirmed')::int::bigint FROM unnest(links) AS g
        UNION ALL
        SELECT g.referral_id, l.level, l.total, l.confirmed
        FROM unnest(links) AS g JOIN referral.referrer_levels l ON l.referrer_id = g.referral_id AND l.level < 5
    ), gone AS (
        SELECT up.ancestor, up.distance + below.depth AS level, sum(below.total) AS total,
               sum(below.confirmed) AS confirmed
        FROM up JOIN below ON below.link = up.link AND up.distance + below.depth <= 5
        GROUP BY 1, 2
    )
    UPDATE referral.referrer_levels AS t
    SET total = t.total - gone.total, confirmed = t.confirmed - gone.confirmed
    FROM gone WHERE t.referrer_id = gone.ancestor AND t.level = gone.level;
$$;

CREATE FUNCTION referral.levels_add(links referral.link[]) RETURNS void LANGUAGE sql AS $$
    WITH RECURSIVE up(link, ancestor, distance) AS (
        SELECT g.referral_id, g.referrer_id, 1 FROM unnest(links) AS g
        UNION ALL
        SELECT up.link, r.referrer_id, up.distance + 1
        FROM up JOIN referral.referrals r ON r.referral_id = up.ancestor
        WHERE up.distance < 5
    ), below(link, depth, total, confirmed) AS (
        SELECT g.referral_id, 0, 1::bigint, (g.status = 'confirmed')::int::bigint FROM unnest(links) AS g
        UNION ALL
        SELECT g.referral_id, l.level, l.total, l.confirmed
        FROM unnest(links) AS g JOIN referral.referrer_levels l ON l.referrer_id = g.referral_id AND l.level < 5
    )
    INSERT INTO referral.referrer_levels AS t (referrer_id, level, total, confirmed)
    SELECT up.ancestor, up.distance + below.depth, sum(below.total), sum(below.confirmed)
    FROM up JOIN below ON below.link = up.link AND up.distance + below.depth <= 5
    GROUP BY 1, 2
    ON CONFLICT (referrer_id, level) DO UPDATE
        SET total = t.total + excluded.total, confirmed = t.confirmed + excluded.confirmed;
$$;

CREATE FUNCTION referral.levels_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved_out referral.link[];
    moved_in referral.link[];
BEGIN
    SELECT array_agg((p.referral_id, p.referrer_id, p.status)::referral.link) INTO moved_out
    FROM previous p
    WHERE NOT EXISTS (
        SELECT 1 FROM changed c WHERE c.referral_id = p.referral_id AND c.referrer_id = p.referrer_id
    );
    SELECT array_agg((c.referral_id, c.referrer_id, c.status)::referral.link) INTO moved_in
    FROM changed c
    WHERE NOT EXISTS (
        SELECT 1 FROM previous p WHERE p.referral_id = c.referral_id AND p.referrer_id = c.referrer_id
    );
    IF moved_out IS NOT NULL OR moved_in IS NOT NULL THEN
        PERFORM referral.levels_remove(
            coalesce(moved_out, '{}'),
            coalesce(ARRAY(SELECT (m).referral_id FROM unnest(moved_in) AS m), '{}')
        );
        PERFORM referral.levels_add(coalesce(moved_in, '{}'));
    END IF;

    WITH RECURSIVE up(ancestor, distance, confirmed) AS (
        SELECT c.referrer_id, 1, (c.status = 'confirmed')::int - (p.status = 'confirmed')::int
        FROM changed c JOIN previous p ON p.referral_id = c.referral_id AND p.referrer_id = c.referrer_id
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
    FROM previous p
    WHERE p.confirmed_at IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM changed c
        WHERE c.referral_id = p.referral_id AND c.referrer_id = p.referrer_id
          AND c.confirmed_at IS NOT DISTINCT FROM p.confirmed_at
    )
    HAVING count(*) > 0;

    INSERT INTO referral.leaderboard_counts AS t (period, period_start, referrer_id, confirmed, first_at)
    SELECT w.period, w.period_start, c.referrer_id, count(*), min(c.confirmed_at)
    FROM changed c CROSS JOIN LATERAL referral.period_starts(c.confirmed_at) AS w
    WHERE c.confirmed_at IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM previous p
        WHERE p.referral_id = c.referral_id AND p.referrer_id = c.referrer_id
          AND p.confirmed_at IS NOT DISTINCT FROM c.confirmed_at
    )
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
