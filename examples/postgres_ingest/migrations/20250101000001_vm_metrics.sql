-- The manager's guest metrics table, in the shape its own migration 0024
-- gives it. Everything is "if absent": on a manager database that already
-- ran 0024 this changes nothing, and the manager keeps its own objects.

CREATE SCHEMA IF NOT EXISTS metrics;

-- One row per guest sample: the figures the manager's dashboards read.
CREATE TABLE IF NOT EXISTS metrics.vm_metrics (
    id BIGSERIAL PRIMARY KEY,
    vm_id UUID NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    cpu_usage_percent DOUBLE PRECISION,
    memory_usage_percent DOUBLE PRECISION,
    memory_used_kb BIGINT,
    memory_total_kb BIGINT,
    load_average DOUBLE PRECISION
);

-- The name 0024 uses, so that a database which has it gets no second,
-- identical index to maintain on every insert.
CREATE INDEX IF NOT EXISTS idx_vm_metrics_lookup
    ON metrics.vm_metrics (vm_id, recorded_at DESC);

-- The manager's 0024 version also purges its host and container tables:
-- replacing it would break that, so it is only created where it is missing.
DO $migration$
BEGIN
    IF to_regprocedure('metrics.purge_old_metrics(interval)') IS NULL THEN
        CREATE FUNCTION metrics.purge_old_metrics(retention INTERVAL DEFAULT '7 days')
        RETURNS void
        LANGUAGE plpgsql
        AS $purge$
        BEGIN
            DELETE FROM metrics.vm_metrics WHERE recorded_at < now() - retention;
        END;
        $purge$;
    END IF;
END
$migration$;
