-- The dashboard's transactions filtered by API key (GET /dashboard/api/transactions?api_key_id=…,
-- and GET /v1/billing/transactions?api_key_id=…) walked every row of the tenant in the window
-- to find one key's; this index reads that key's newest first, as 006's does for a model.
CREATE INDEX billing_transactions_tenant_key_time
    ON billing_transactions (tenant_id, api_key_id, occurred_at DESC, request_id DESC);

-- Each partition's copy named <partition>_tenant_key_time, as services/adapters/partitions.py
-- names them.
DO $$
DECLARE
    idx record;
BEGIN
    FOR idx IN
        SELECT ci.relname AS name, ct.relname AS part
          FROM pg_inherits h
          JOIN pg_class ci ON ci.oid = h.inhrelid
          JOIN pg_index x ON x.indexrelid = ci.oid
          JOIN pg_class ct ON ct.oid = x.indrelid
         WHERE h.inhparent = 'billing_transactions_tenant_key_time'::regclass
    LOOP
        IF idx.name <> left(idx.part || '_tenant_key_time', 63) THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.name,
                           left(idx.part || '_tenant_key_time', 63));
        END IF;
    END LOOP;
END $$;

-- The operator's ranking sums this month's summary rows of every tenant (day >= the 1st):
-- without it, every summary row of every month was read.
CREATE INDEX tenant_billing_summary_by_day ON tenant_billing_summary (day);
