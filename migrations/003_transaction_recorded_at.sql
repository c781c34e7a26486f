-- When the usage fact was recorded, kept with its transaction: a re-rating from PostgreSQL
-- (billing reprice --source db) re-states the fact as it was, recorded_at included.
-- Rows projected before this column existed have NULL (re-rated with occurred_at).
ALTER TABLE billing_transactions ADD COLUMN recorded_at timestamptz;

-- Re-rating and reconciliation scan by time across tenants.
CREATE INDEX billing_transactions_occurred ON billing_transactions (occurred_at);
