-- Balances, budgets and admission (issue #11).
--
-- The quota service folds billing.costs.v1 into the first four tables, exactly once (its
-- offsets are stored in consumer_offsets in the same transaction); the gateways hold
-- leases of a tenant's headroom in the last one.

-- One row per (request_id, revision) ever applied: delta_cost charged (negative: refunded).
-- Append-only; the primary key is what makes a duplicate cost message change nothing.
CREATE TABLE billing_credit_charges (
    request_id   text NOT NULL,
    revision     integer NOT NULL,
    tenant_id    text NOT NULL,
    api_key_id   text NOT NULL DEFAULT '',
    period       date NOT NULL,          -- first day of occurred_at's UTC month
    amount       numeric NOT NULL,
    charged_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, revision)
);
-- A grant's expiry is posted as of its expires_at: the charges applied by then.
CREATE INDEX billing_credit_charges_by_tenant ON billing_credit_charges (tenant_id, charged_at);

-- Running sums of the charges per tenant × key ('' = the whole tenant) × month.
CREATE TABLE billing_quota_spend (
    tenant_id    text NOT NULL,
    api_key_id   text NOT NULL,
    period       date NOT NULL,
    spent        numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, api_key_id, period)
);

-- What was left of a grant when it expired (posted once per grant by the quota service).
CREATE TABLE billing_credit_expiries (
    grant_id     bigint PRIMARY KEY REFERENCES billing_credit_grants (grant_id),
    tenant_id    text NOT NULL,
    amount       numeric NOT NULL CHECK (amount >= 0),
    expired_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_credit_expiries_by_tenant ON billing_credit_expiries (tenant_id);

-- Monthly budgets per tenant (api_key_id '') and per API key.
CREATE TABLE billing_budgets (
    tenant_id      text NOT NULL REFERENCES tenants (tenant_id),
    api_key_id     text NOT NULL DEFAULT '',
    monthly_limit  numeric NOT NULL CHECK (monthly_limit >= 0),
    hard           boolean NOT NULL DEFAULT true,
    alerts         integer[] NOT NULL DEFAULT '{50,80,100}',
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, api_key_id)
);

-- Alerts, written in the transaction that crossed them (the primary key makes each one
-- once per threshold per period), then published to billing.alerts.v1 and the webhook.
CREATE TABLE billing_alerts (
    alert_id              text PRIMARY KEY,
    tenant_id             text NOT NULL,
    event                 jsonb NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    published_at          timestamptz,
    webhook_attempts      integer NOT NULL DEFAULT 0,
    webhook_next_at       timestamptz,
    webhook_done_at       timestamptz,
    webhook_error         text
);
CREATE INDEX billing_alerts_unpublished ON billing_alerts (created_at) WHERE published_at IS NULL;
CREATE INDEX billing_alerts_webhook_due ON billing_alerts (webhook_next_at)
    WHERE webhook_done_at IS NULL;
CREATE INDEX billing_alerts_by_tenant ON billing_alerts (tenant_id, created_at);

-- A gateway process's slice of one scope's headroom: amount = reserved (in flight) +
-- pending (answered, not yet charged) + free (reservable without asking again). A lease
-- not renewed by expires_at no longer counts (its holder died); scope is 'balance/T' or
-- 'budget/T/KEY/YYYY-MM' (KEY empty for the tenant's budget).
CREATE TABLE billing_quota_leases (
    scope        text NOT NULL,
    holder       text NOT NULL,
    tenant_id    text NOT NULL,
    amount       numeric NOT NULL CHECK (amount >= 0),
    reserved     numeric NOT NULL DEFAULT 0,
    pending      numeric NOT NULL DEFAULT 0,
    expires_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, holder)
);
CREATE INDEX billing_quota_leases_by_holder ON billing_quota_leases (holder);
CREATE INDEX billing_quota_leases_by_tenant ON billing_quota_leases (tenant_id);
