-- Monthly invoices (issue #12): issued once per tenant and month, never changed afterwards.
-- Usage or re-rating that reaches a closed month later is invoiced on a later invoice as an
-- adjustment line naming that month.

-- Gapless numbers per issuer: taken in the invoice's own transaction (a rolled-back close
-- takes none), unlike a sequence.
CREATE TABLE billing_invoice_numbers (
    issuer       text PRIMARY KEY,
    last_number  bigint NOT NULL DEFAULT 0
);

CREATE TABLE billing_invoices (
    number           text PRIMARY KEY,
    issuer           text NOT NULL,
    sequence         bigint NOT NULL,
    tenant_id        text NOT NULL,
    period           date NOT NULL,           -- first day of the invoiced UTC month
    issued_at        timestamptz NOT NULL,
    currency         text NOT NULL DEFAULT 'USD',
    subtotal         numeric NOT NULL,
    credits_applied  numeric NOT NULL,
    amount_due       numeric NOT NULL,
    document         text NOT NULL,           -- the issued JSON document, byte for byte
    UNIQUE (issuer, sequence),
    UNIQUE (tenant_id, period)
);
CREATE INDEX billing_invoices_by_period ON billing_invoices (period, tenant_id);

-- One row per line, for the adjustments of later invoices (what was invoiced per month and
-- model so far). kind: usage | adjustment | credits | rounding.
CREATE TABLE billing_invoice_lines (
    number        text NOT NULL REFERENCES billing_invoices (number),
    line          integer NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('usage', 'adjustment', 'credits', 'rounding')),
    tenant_id     text NOT NULL,
    model         text,
    period_of     date,                       -- the month a usage/adjustment line is about
    requests      bigint NOT NULL DEFAULT 0,
    amount        numeric NOT NULL,           -- as shown (to 1e-9)
    exact_amount  numeric NOT NULL,           -- what it stands for, unrounded
    PRIMARY KEY (number, line)
);
CREATE INDEX billing_invoice_lines_by_month ON billing_invoice_lines (tenant_id, period_of, model);

CREATE FUNCTION billing_invoices_are_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'an issued invoice is never changed (% on %)', TG_OP, TG_TABLE_NAME;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoices_immutable BEFORE UPDATE OR DELETE ON billing_invoices
    FOR EACH ROW EXECUTE FUNCTION billing_invoices_are_immutable();
CREATE TRIGGER billing_invoice_lines_immutable BEFORE UPDATE OR DELETE ON billing_invoice_lines
    FOR EACH ROW EXECUTE FUNCTION billing_invoices_are_immutable();

-- InvoiceIssued events sent to billing.invoices.v1 (the invoices themselves stay untouched).
CREATE TABLE billing_invoices_published (
    number        text PRIMARY KEY REFERENCES billing_invoices (number),
    published_at  timestamptz NOT NULL DEFAULT now()
);
