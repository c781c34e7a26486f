-- Every billing reprice run that emitted revisions, so a new run can refuse to start while
-- an earlier one's revisions are not all applied yet (both would use the same revision
-- numbers, and the projector keeps only the first it sees).
CREATE TABLE reprice_runs (
    run_id       text PRIMARY KEY,
    reason       text NOT NULL,          -- carried by every adjustment of the run
    since        timestamptz NOT NULL,
    until        timestamptz NOT NULL,
    model        text,
    tenant_id    text,
    source       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    emitted      bigint NOT NULL DEFAULT 0,
    applied_at   timestamptz             -- when every emitted revision was seen applied
);

CREATE INDEX billing_adjustments_reason ON billing_adjustments (reason);
