-- Codes with a usage limit: `max_uses` (NULL: no limit) and `uses`, the links made with the code plus
-- the uses reserved for signups not yet linked; and those reservations.
-- depends: 0004_idempotency

-- `uses` only moves in statements that check the limit under the code's row lock (activation, a
-- signup's reservation) or give a reserved use back; the CHECK is the backstop: no interleaving can
-- leave a code with more uses than `max_uses`. Codes made before this migration have no limit, and
-- their past links are not counted (a limit cannot be set on an existing code).
ALTER TABLE referral.codes
    ADD COLUMN max_uses integer
        CONSTRAINT codes_max_uses_range CHECK (max_uses BETWEEN 1 AND 1000000),
    ADD COLUMN uses integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT codes_uses_within_limit CHECK (uses >= 0 AND (max_uses IS NULL OR uses <= max_uses));

-- A use taken for a signup with a code before its user is created (the auth service asks first), kept
-- until the signup's link arrives (it consumes the reservation: the use is not taken twice), the auth
-- service gives it back (its signup failed), or it expires (the signup never happened: a sweep gives
-- the use back). One per referral: taking it again for the same user is the same reservation.
CREATE TABLE referral.code_reservations (
    referral_id uuid PRIMARY KEY,
    code_id uuid NOT NULL REFERENCES referral.codes (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    CONSTRAINT code_reservations_expire_after_creation CHECK (expires_at > created_at)
);

-- The sweep of expired reservations.
CREATE INDEX code_reservations_by_expiry ON referral.code_reservations (expires_at);
