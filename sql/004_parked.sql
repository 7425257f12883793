-- crablet schema, version 4: parked events of durable handlers, and the event a handler is
-- failing on.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- The first event of the batch the handler is currently failing on (the poison event itself
-- once the runner tries events one by one, and where a runner stopped by its failure policy is
-- stuck). Written with attempts / last_error, cleared when a batch commits. Nullable columns
-- without a default: adding them rewrites nothing.
ALTER TABLE __SCHEMA__.handler_checkpoints
    ADD COLUMN failing_transaction_id xid8,
    ADD COLUMN failing_position       bigint,
    ADD CONSTRAINT handler_checkpoints_failing_check
        CHECK ((failing_transaction_id IS NULL) = (failing_position IS NULL));

-- Events a handler gave up on under FailurePolicy::Park. The runner inserts the row and moves
-- the handler's checkpoint past the event in the SAME transaction, so an event is either parked
-- and skipped, or neither. A replay runs the handler and deletes the row in one transaction.
-- attempts / error / last_attempt_at describe the latest failure (when parked, or of the last
-- failed replay).
CREATE TABLE __SCHEMA__.parked_events (
    handler_name    text        NOT NULL CHECK (handler_name <> ''),
    transaction_id  xid8        NOT NULL,
    position        bigint      NOT NULL,
    event_type      text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL CHECK (attempts > 0),
    parked_at       timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler_name, transaction_id, position)
);
