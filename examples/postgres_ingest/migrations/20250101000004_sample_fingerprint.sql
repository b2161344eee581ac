-- Each sample's fingerprint (a 64-bit hash of its JSON, key order and
-- white space aside, made by the route) beside it: a resend is told from a
-- conflict by comparing 8 bytes, and the JSONB copy becomes optional
-- (docs/manager.md, "Storage per sample"). Rows written before this
-- migration have none and are compared by their JSONB, as before.

ALTER TABLE metrics.guest_samples ADD COLUMN IF NOT EXISTS fingerprint BIGINT;
ALTER TABLE metrics.guest_samples ALTER COLUMN sample DROP NOT NULL;

-- What the route's look-up of a pair returns: one value per pair, so that
-- the look-up stays a scalar subquery (one index probe per partition).
DO $type$
BEGIN
    IF to_regtype('metrics.stored_sample') IS NULL THEN
        CREATE TYPE metrics.stored_sample AS (fingerprint BIGINT, sample JSONB);
    END IF;
END
$type$;
