-- The leaderboard's read as a function whose statement runs on a generic plan.
-- As a prepared statement from the service, PostgreSQL planned it afresh on every execution: with
-- `LIMIT $n` unknown, the generic plan's estimate (a tenth of the period's entries, each with its
-- email subquery) looks far dearer than a custom plan for LIMIT 10, so the planner kept choosing
-- custom plans, and planning cost twice the execution (measured on the benchmark's dataset: 300 us
-- of backend CPU per read against 60-90 us on a generic plan; S3's first page costs 60-120 us).
-- The generic plan is the right one for every limit the API allows (1 to 100): a range scan of
-- leaderboard_ranked and one index probe per entry for its email.
-- depends: 0006_program

CREATE FUNCTION referral.leaderboard_top(top_period text, top_limit integer)
RETURNS TABLE (referrer_id uuid, confirmed bigint, email text)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- The email is the one of the referrer's newest code (codes_by_owner), else of their own link;
    -- NULL when the referral service never saw it, or the person was erased (their codes and link
    -- keep an empty address: migration 0009_erasure).
    RETURN QUERY
    SELECT b.referrer_id, b.confirmed,
           coalesce(
               nullif((SELECT c.owner_email FROM referral.codes c WHERE c.owner_id = b.referrer_id
                       ORDER BY c.created_at DESC LIMIT 1), ''),
               nullif((SELECT r.referral_email FROM referral.referrals r WHERE r.referral_id = b.referrer_id), '')
           )
    FROM referral.leaderboard_counts AS b
    WHERE b.period = top_period
      AND b.period_start = (
          SELECT p.period_start FROM referral.period_starts(now()) AS p WHERE p.period = top_period
      )
    ORDER BY b.confirmed DESC, b.first_at, b.referrer_id
    LIMIT top_limit;
END
$$;
