-- Webhooks out (API.md "Events out: webhooks"; shared/webhooks.py): the events to send, written in the
-- transaction of the change they report, one row per (event, configured endpoint) so each endpoint is
-- retried on its own. No endpoint configured: no row is written.
-- depends: 0007_leaderboard_read

CREATE TABLE referral.webhook_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The webhook-id header: the same on every attempt and for every endpoint.
    event_id uuid NOT NULL,
    event_type text NOT NULL,
    endpoint text NOT NULL,
    -- The exact body sent, {type, timestamp, data}: the same bytes on every attempt. Cleared once the
    -- row is delivered or failed for good: an event names people, a settled one is only bookkeeping.
    body text,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    -- While a delivery is in flight this is its lease: nobody else claims the row before then.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    failed_at timestamptz,
    last_error text,
    CONSTRAINT webhook_outbox_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT webhook_outbox_last_error_length CHECK (char_length(last_error) <= 200),
    CONSTRAINT webhook_outbox_one_outcome CHECK (delivered_at IS NULL OR failed_at IS NULL),
    CONSTRAINT webhook_outbox_pending_has_body
        CHECK (body IS NOT NULL OR delivered_at IS NOT NULL OR failed_at IS NOT NULL)
);

CREATE INDEX webhook_outbox_pending_idx ON referral.webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
-- The age of the oldest undelivered event (a metric): one probe of this index.
CREATE INDEX webhook_outbox_oldest_idx ON referral.webhook_outbox (created_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
