-- Which log the stored consumer offsets (consumer_offsets) are positions in. `billing up`
-- names its embedded broker's log (a new name for every in-memory log, one per objects dir
-- for the durable one, the bootstrap for an external broker) and clears the offsets when
-- the log is not the one they were stored against: offsets of another log would skip
-- records of this one.
CREATE TABLE billing_log_identity (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    log_id      text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
