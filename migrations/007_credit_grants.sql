-- Prepaid credits (issue #11): an append-only ledger of grants. A grant is never updated or
-- deleted; a client may give it an idempotency key, unique per tenant, so a retried grant
-- is recorded once.

CREATE TABLE billing_credit_grants (
    grant_id         bigserial PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (tenant_id),
    amount           numeric NOT NULL CHECK (amount > 0),
    reason           text NOT NULL CHECK (reason <> ''),
    idempotency_key  text,
    expires_at       timestamptz,
    granted_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX billing_credit_grants_by_tenant ON billing_credit_grants (tenant_id, grant_id);
