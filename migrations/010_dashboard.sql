-- The live dashboard (issue #13).

-- Requests and spend per tenant and UTC minute: the dashboard's chart by hour and the
-- operator's requests/min and spend/min read these instead of billing_transactions. The
-- projector keeps them in each batch's transaction, by the same deltas as
-- tenant_billing_summary (a revision moves its request from its old minute to its new one),
-- and drops minutes older than 35 days; `billing rebuild` re-derives the minutes it keeps.
CREATE TABLE billing_spend_minutes (
    tenant_id   text NOT NULL,
    minute      timestamptz NOT NULL,
    requests    bigint NOT NULL,
    total_cost  numeric NOT NULL,
    PRIMARY KEY (tenant_id, minute)
);
CREATE INDEX billing_spend_minutes_by_minute ON billing_spend_minutes (minute);

INSERT INTO billing_spend_minutes (tenant_id, minute, requests, total_cost)
SELECT tenant_id, date_trunc('minute', occurred_at, 'UTC'), count(*), sum(total_cost)
FROM billing_transactions
WHERE occurred_at >= now() - interval '35 days'
GROUP BY 1, 2;

-- Dashboard sign-ins. The browser holds a signed cookie carrying a random session id; this
-- table holds only its SHA-256, so reading it gives no usable cookie. A session ends at
-- expires_at or at sign-out (ended_at), whichever is first, in every gateway process; a
-- tenant's when its API key is revoked, an operator's when the admin token changes
-- (token_hash: the SHA-256 of the token it signed in with).
CREATE TABLE billing_dashboard_sessions (
    session_hash  bytea PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('tenant', 'operator')),
    tenant_id     text,
    api_key_id    text,
    token_hash    bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    CHECK ((role = 'tenant') = (tenant_id IS NOT NULL AND api_key_id IS NOT NULL)),
    CHECK ((role = 'operator') = (token_hash IS NOT NULL))
);
CREATE INDEX billing_dashboard_sessions_by_expiry ON billing_dashboard_sessions (expires_at);
