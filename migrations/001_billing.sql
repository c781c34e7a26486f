-- Read models of the billing events, the price book, and the projector's consumed offsets.
-- Money is NUMERIC (exact); timestamps are timestamptz; every table is append- or
-- upsert-only from the services' point of view.

CREATE TABLE billing_transactions (
    request_id              text PRIMARY KEY,
    tenant_id               text NOT NULL,
    api_key_id              text,
    provider                text NOT NULL,
    provider_model_id       text NOT NULL,
    model                   text NOT NULL,
    occurred_at             timestamptz NOT NULL,
    usage_source            text NOT NULL,
    prompt_tokens           bigint NOT NULL,
    uncached_input_tokens   bigint NOT NULL,
    cache_read_tokens       bigint NOT NULL,
    cache_write_tokens      bigint NOT NULL,
    cache_write_1h_tokens   bigint NOT NULL,
    completion_tokens       bigint NOT NULL,
    reasoning_tokens        bigint NOT NULL,
    web_search_requests     bigint NOT NULL,
    images                  bigint NOT NULL,
    requests                bigint NOT NULL,
    prompt_cost             numeric NOT NULL,
    cache_read_cost         numeric NOT NULL,
    cache_write_cost        numeric NOT NULL,
    completion_cost         numeric NOT NULL,
    internal_reasoning_cost numeric NOT NULL,
    request_cost            numeric NOT NULL,
    web_search_cost         numeric NOT NULL,
    image_cost              numeric NOT NULL,
    total_cost              numeric NOT NULL,
    currency                text NOT NULL DEFAULT 'USD',
    reported_cost           numeric,
    reported_is_byok        boolean NOT NULL DEFAULT false,
    price_version           bigint NOT NULL,
    revision                integer NOT NULL,
    priced_at               timestamptz NOT NULL,
    projected_at            timestamptz NOT NULL DEFAULT now(),
    metadata                jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- Keyset pagination, newest first, per tenant (and optionally per key or model).
CREATE INDEX billing_transactions_tenant_time
    ON billing_transactions (tenant_id, occurred_at DESC, request_id DESC);

-- Per tenant x UTC day x model x api key (the finer grain sums to tenant x day x model).
CREATE TABLE tenant_billing_summary (
    tenant_id               text NOT NULL,
    day                     date NOT NULL,
    model                   text NOT NULL,
    api_key_id              text NOT NULL DEFAULT '',
    requests                bigint NOT NULL DEFAULT 0,
    prompt_tokens           bigint NOT NULL DEFAULT 0,
    uncached_input_tokens   bigint NOT NULL DEFAULT 0,
    cache_read_tokens       bigint NOT NULL DEFAULT 0,
    cache_write_tokens      bigint NOT NULL DEFAULT 0,
    cache_write_1h_tokens   bigint NOT NULL DEFAULT 0,
    completion_tokens       bigint NOT NULL DEFAULT 0,
    reasoning_tokens        bigint NOT NULL DEFAULT 0,
    web_search_requests     bigint NOT NULL DEFAULT 0,
    images                  bigint NOT NULL DEFAULT 0,
    prompt_cost             numeric NOT NULL DEFAULT 0,
    cache_read_cost         numeric NOT NULL DEFAULT 0,
    cache_write_cost        numeric NOT NULL DEFAULT 0,
    completion_cost         numeric NOT NULL DEFAULT 0,
    internal_reasoning_cost numeric NOT NULL DEFAULT 0,
    request_cost            numeric NOT NULL DEFAULT 0,
    web_search_cost         numeric NOT NULL DEFAULT 0,
    image_cost              numeric NOT NULL DEFAULT 0,
    total_cost              numeric NOT NULL DEFAULT 0,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day, model, api_key_id)
);

-- Every re-rating of a request, with the difference it made.
CREATE TABLE billing_adjustments (
    id                  bigserial PRIMARY KEY,
    request_id          text NOT NULL REFERENCES billing_transactions (request_id),
    tenant_id           text NOT NULL,
    old_revision        integer NOT NULL,
    new_revision        integer NOT NULL,
    old_total_cost      numeric NOT NULL,
    new_total_cost      numeric NOT NULL,
    delta_cost          numeric NOT NULL,
    price_version       bigint NOT NULL,
    reason              text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, new_revision)
);

-- Offsets a consumer has applied, written in the same transaction as its rows.
CREATE TABLE consumer_offsets (
    consumer    text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- The price book: every version of every model's price (nothing is updated in place).
CREATE TABLE price_versions (
    version         bigint PRIMARY KEY,
    model           text NOT NULL,
    layer           text NOT NULL CHECK (layer IN ('catalogue', 'override')),
    source          text NOT NULL,
    reason          text NOT NULL DEFAULT '',
    effective_from  timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    pricing         jsonb NOT NULL
);
CREATE INDEX price_versions_model ON price_versions (model, layer, effective_from);

CREATE TABLE price_aliases (
    alias   text PRIMARY KEY,
    model   text NOT NULL
);

-- Usage that had no price when it arrived; re-driven when its model gets one.
CREATE TABLE unpriced_usage (
    request_id      text PRIMARY KEY,
    tenant_id       text NOT NULL,
    provider_model_id text NOT NULL,
    event           jsonb NOT NULL,
    reason          text NOT NULL,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 1
);
