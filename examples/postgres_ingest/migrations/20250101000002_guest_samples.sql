-- Every sample the push route accepted, whole, keyed by the agent's
-- (run_id, seq). The primary key is what de-duplicates: a batch the agent
-- resends (its answer was lost, the manager restarted) hits it and is not
-- stored again, whatever the receiving process remembers.

CREATE TABLE IF NOT EXISTS metrics.guest_samples (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    vm_id UUID NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The sample as the library's Sample type serialises it: every field of
    -- schema 1, including those vm_metrics has no column for.
    sample JSONB NOT NULL,
    CONSTRAINT guest_samples_run_seq PRIMARY KEY (run_id, seq)
);

-- A VM's full samples, newest first, as vm_metrics is read.
CREATE INDEX IF NOT EXISTS guest_samples_vm_time
    ON metrics.guest_samples (vm_id, recorded_at DESC);

-- Retention for this table, beside metrics.purge_old_metrics for
-- vm_metrics. Dropping a pair forgets it: keep the retention far longer
-- than an agent can hold a sample (its buffer, 1000 samples by default).
CREATE OR REPLACE FUNCTION metrics.purge_guest_samples(retention INTERVAL DEFAULT '7 days')
RETURNS void
LANGUAGE plpgsql
AS $purge$
BEGIN
    DELETE FROM metrics.guest_samples WHERE recorded_at < now() - retention;
END;
$purge$;
