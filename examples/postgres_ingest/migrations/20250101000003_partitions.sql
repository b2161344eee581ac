-- Both tables partitioned by day (UTC) on recorded_at, the sample's own
-- time (docs/manager.md, "Partitions and retention"). Retention drops whole
-- partitions: instant, no DELETE, no vacuum, no bloat.
--
-- A unique key of a partitioned table must hold the partition key, so the
-- companion table's key becomes (run_id, seq, recorded_at). A resent sample
-- carries its original timestamp_ms, so it meets its first copy in the same
-- partition; the route also looks a pair up in every partition before
-- inserting it, so the same pair with another time is a conflict, never a
-- second row.
--
-- A table that already holds rows (the manager's vm_metrics, or an earlier
-- guest_samples) is kept whole as one partition covering everything up to
-- the end of the day after its newest row; maintain_partitions drops it once
-- all of it is past the retention. An empty one is replaced.

DO $migration$
DECLARE
    upper_bound timestamptz;
    partitioned boolean;
    old_key name;
BEGIN
    -- vm_metrics: the manager's table.
    SELECT c.relkind = 'p' INTO partitioned
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'metrics' AND c.relname = 'vm_metrics';
    IF NOT partitioned THEN
        ALTER TABLE metrics.vm_metrics RENAME TO vm_metrics_unpartitioned;
        ALTER INDEX metrics.idx_vm_metrics_lookup RENAME TO vm_metrics_unpartitioned_lookup;
        CREATE TABLE metrics.vm_metrics (
            id BIGINT NOT NULL DEFAULT nextval('metrics.vm_metrics_id_seq'),
            vm_id UUID NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            cpu_usage_percent DOUBLE PRECISION,
            memory_usage_percent DOUBLE PRECISION,
            memory_used_kb BIGINT,
            memory_total_kb BIGINT,
            load_average DOUBLE PRECISION,
            CONSTRAINT vm_metrics_id_time PRIMARY KEY (id, recorded_at)
        ) PARTITION BY RANGE (recorded_at);
        -- The sequence outlives the old table, dropped or kept as a partition.
        ALTER SEQUENCE metrics.vm_metrics_id_seq OWNED BY metrics.vm_metrics.id;
        CREATE INDEX idx_vm_metrics_lookup ON metrics.vm_metrics (vm_id, recorded_at DESC);
        IF EXISTS (SELECT 1 FROM metrics.vm_metrics_unpartitioned) THEN
            SELECT date_trunc('day', greatest(max(recorded_at), now()) AT TIME ZONE 'UTC')
                       AT TIME ZONE 'UTC' + interval '1 day'
            INTO upper_bound FROM metrics.vm_metrics_unpartitioned;
            -- A partition's primary key must be its parent's: (id, recorded_at).
            SELECT conname INTO old_key FROM pg_constraint
            WHERE conrelid = 'metrics.vm_metrics_unpartitioned'::regclass AND contype = 'p';
            IF old_key IS NOT NULL THEN
                EXECUTE format('ALTER TABLE metrics.vm_metrics_unpartitioned DROP CONSTRAINT %I', old_key);
            END IF;
            ALTER TABLE metrics.vm_metrics_unpartitioned
                ADD CONSTRAINT vm_metrics_unpartitioned_id_time PRIMARY KEY (id, recorded_at);
            EXECUTE format('ALTER TABLE metrics.vm_metrics ATTACH PARTITION '
                'metrics.vm_metrics_unpartitioned FOR VALUES FROM (MINVALUE) TO (%L)', upper_bound);
        ELSE
            DROP TABLE metrics.vm_metrics_unpartitioned;
        END IF;
    END IF;

    -- guest_samples: the companion table.
    SELECT c.relkind = 'p' INTO partitioned
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'metrics' AND c.relname = 'guest_samples';
    IF NOT partitioned THEN
        ALTER TABLE metrics.guest_samples RENAME TO guest_samples_unpartitioned;
        -- A partition's primary key must be its parent's, with recorded_at.
        ALTER TABLE metrics.guest_samples_unpartitioned DROP CONSTRAINT guest_samples_run_seq;
        ALTER INDEX metrics.guest_samples_vm_time RENAME TO guest_samples_unpartitioned_vm_time;
        CREATE TABLE metrics.guest_samples (
            run_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            vm_id UUID NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL,
            received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            sample JSONB NOT NULL,
            CONSTRAINT guest_samples_run_seq PRIMARY KEY (run_id, seq, recorded_at)
        ) PARTITION BY RANGE (recorded_at);
        CREATE INDEX guest_samples_vm_time ON metrics.guest_samples (vm_id, recorded_at DESC);
        IF EXISTS (SELECT 1 FROM metrics.guest_samples_unpartitioned) THEN
            SELECT date_trunc('day', greatest(max(recorded_at), now()) AT TIME ZONE 'UTC')
                       AT TIME ZONE 'UTC' + interval '1 day'
            INTO upper_bound FROM metrics.guest_samples_unpartitioned;
            ALTER TABLE metrics.guest_samples_unpartitioned
                ADD CONSTRAINT guest_samples_unpartitioned_run_seq PRIMARY KEY (run_id, seq, recorded_at);
            EXECUTE format('ALTER TABLE metrics.guest_samples ATTACH PARTITION '
                'metrics.guest_samples_unpartitioned FOR VALUES FROM (MINVALUE) TO (%L)', upper_bound);
        ELSE
            DROP TABLE metrics.guest_samples_unpartitioned;
        END IF;
    END IF;
END
$migration$;

-- The upper bound of a range partition, from its bound expression (the
-- text carries its UTC offset, so the session's TimeZone does not matter).
CREATE OR REPLACE FUNCTION metrics.partition_upper_bound(part regclass)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $fn$
    SELECT (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz
    FROM pg_class c WHERE c.oid = part
$fn$;

-- Creates each day's partition of both tables from the oldest day a sample
-- may still be accepted for (now_at - samples_retention) to days_ahead days
-- after now_at, and drops every partition whose newest possible row is past
-- its table's retention: guest_samples after samples_retention (as long as
-- de-duplication needs it), vm_metrics after metrics_retention. Returns
-- what it did, one line per partition. Safe to run at any time and from
-- several processes at once (an advisory lock serialises them); the route
-- runs it at start and on a timer. now_at is for tests.
CREATE OR REPLACE FUNCTION metrics.maintain_partitions(
    samples_retention interval DEFAULT '2 days',
    metrics_retention interval DEFAULT '7 days',
    days_ahead integer DEFAULT 2,
    now_at timestamptz DEFAULT now())
RETURNS SETOF text
LANGUAGE plpgsql
AS $fn$
DECLARE
    today date := (now_at AT TIME ZONE 'UTC')::date;
    day date;
    tbl text;
    part record;
    name text;
    keep interval;
BEGIN
    IF samples_retention > metrics_retention THEN
        RAISE EXCEPTION 'samples_retention % is longer than metrics_retention %: a sample accepted for de-duplication would have no vm_metrics partition',
            samples_retention, metrics_retention;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('metrics.maintain_partitions'));
    FOREACH tbl IN ARRAY ARRAY['guest_samples', 'vm_metrics'] LOOP
        keep := CASE tbl WHEN 'guest_samples' THEN samples_retention ELSE metrics_retention END;
        day := ((now_at - samples_retention) AT TIME ZONE 'UTC')::date;
        WHILE day <= today + days_ahead LOOP
            name := format('%s_p%s', tbl, to_char(day, 'YYYYMMDD'));
            IF to_regclass(format('metrics.%I', name)) IS NULL THEN
                BEGIN
                    EXECUTE format(
                        'CREATE TABLE metrics.%I PARTITION OF metrics.%I FOR VALUES FROM (%L) TO (%L)',
                        name, tbl,
                        (day::timestamp AT TIME ZONE 'UTC'),
                        ((day + 1)::timestamp AT TIME ZONE 'UTC'));
                    RETURN NEXT format('created metrics.%s', name);
                EXCEPTION WHEN invalid_object_definition THEN
                    -- Covered already (the partition kept from before the
                    -- migration): its rows stay there.
                    NULL;
                END;
            END IF;
            day := day + 1;
        END LOOP;
        FOR part IN
            SELECT c.oid::regclass AS rel, c.relname
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = format('metrics.%I', tbl)::regclass
        LOOP
            IF metrics.partition_upper_bound(part.rel) <= now_at - keep THEN
                EXECUTE format('DROP TABLE %s', part.rel);
                RETURN NEXT format('dropped metrics.%s', part.relname);
            END IF;
        END LOOP;
    END LOOP;
END;
$fn$;
