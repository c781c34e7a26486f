-- A tenant's transactions of one model, newest first: the transactions page filtered by
-- model (GET /v1/billing/transactions?model=…) walked every row of the tenant in the window
-- without it (bench/readmodels.py: 420-570 ms p99 at 50 million rows).
CREATE INDEX billing_transactions_tenant_model_time
    ON billing_transactions (tenant_id, model, occurred_at DESC, request_id DESC);

-- Each partition's copy named <partition>_tenant_model_time, as services/adapters/partitions.py
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
         WHERE h.inhparent = 'billing_transactions_tenant_model_time'::regclass
    LOOP
        IF idx.name <> left(idx.part || '_tenant_model_time', 63) THEN
            EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.name,
                           left(idx.part || '_tenant_model_time', 63));
        END IF;
    END LOOP;
END $$;
