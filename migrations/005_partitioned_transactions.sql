-- billing_transactions partitioned by UTC month of occurred_at (declarative RANGE
-- partitioning): each month's rows and indexes stay apart, so a month's pages and scans
-- touch one partition, and retention detaches or drops whole months.
--
-- PostgreSQL enforces uniqueness on a partitioned table only with the partition key in the
-- key: the primary key becomes (request_id, occurred_at). One row per request_id across
-- months stays the projector's rule: under its fence it looks every batch's request_ids up
-- in every partition before it writes (services/projector/apply.py). For the same reason
-- billing_adjustments no longer has a foreign key to the transactions (an adjustment
-- outlives a retired month's rows); it is written in the same transaction as the row.
--
-- Existing rows are copied once, in this transaction: for a large table, plan the window.

ALTER TABLE billing_adjustments DROP CONSTRAINT IF EXISTS billing_adjustments_request_id_fkey;
CREATE INDEX billing_adjustments_request ON billing_adjustments (request_id);

ALTER TABLE billing_transactions RENAME TO billing_transactions_unpartitioned;
ALTER INDEX billing_transactions_pkey RENAME TO billing_transactions_unpartitioned_pkey;
ALTER INDEX billing_transactions_tenant_time RENAME TO billing_transactions_unpartitioned_tenant_time;
ALTER INDEX billing_transactions_occurred RENAME TO billing_transactions_unpartitioned_occurred;

CREATE TABLE billing_transactions (
    LIKE billing_transactions_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (request_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX billing_transactions_tenant_time
    ON billing_transactions (tenant_id, occurred_at DESC, request_id DESC);
CREATE INDEX billing_transactions_occurred ON billing_transactions (occurred_at);

-- One partition per month that has rows, and this month and the next two (the projector
-- keeps creating them ahead, and creates a late month's on demand). Their indexes are
-- named <partition>_<role of the parent index>, as services/adapters/partitions.py does.
DO $$
DECLARE
    month date;
    part text;
    idx record;
BEGIN
    FOR month IN
        SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date
          FROM billing_transactions_unpartitioned
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n))::date
          FROM generate_series(0, 2) AS n
    LOOP
        part := 'billing_transactions_' || to_char(month, '"y"YYYY"m"MM');
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF billing_transactions FOR VALUES FROM (%L) TO (%L)',
            part,
            month::timestamp AT TIME ZONE 'UTC',
            (month + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        FOR idx IN
            SELECT ci.relname AS name, cp.relname AS parent
              FROM pg_index x
              JOIN pg_class ci ON ci.oid = x.indexrelid
              JOIN pg_inherits h ON h.inhrelid = x.indexrelid
              JOIN pg_class cp ON cp.oid = h.inhparent
             WHERE x.indrelid = part::regclass
               AND ci.relname <> part || substr(cp.relname, length('billing_transactions') + 1)
        LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.name,
                           part || substr(idx.parent, length('billing_transactions') + 1));
        END LOOP;
    END LOOP;
END $$;

INSERT INTO billing_transactions SELECT * FROM billing_transactions_unpartitioned;
DROP TABLE billing_transactions_unpartitioned;

-- Months whose transactions were retired (BILLING_RETENTION_MONTHS): the summary keeps
-- their totals, the log keeps their events; events for them are no longer applied.
CREATE TABLE billing_retired_months (
    month         date PRIMARY KEY,            -- first day of the UTC month
    transactions  bigint NOT NULL,             -- rows the partition held when retired
    total_cost    numeric NOT NULL,
    action        text NOT NULL CHECK (action IN ('detach', 'drop')),
    partition     text NOT NULL,               -- the detached table's name (gone if dropped)
    retired_at    timestamptz NOT NULL DEFAULT now()
);
