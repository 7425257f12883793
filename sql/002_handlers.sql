-- crablet schema, version 2: checkpoints of durable event handlers.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- One row per handler name. The checkpoint (transaction_id, position) is the cursor up to which
-- the handler has processed its query (NULL: nothing yet). A runner advances it in the SAME
-- transaction as the handler's own writes, so a read model is updated exactly once per event.
-- last_error / attempts / last_error_at describe the current failure streak of the batch after
-- the checkpoint (cleared when a batch commits), so a stuck handler is visible from anywhere.
CREATE TABLE __SCHEMA__.handler_checkpoints (
    handler_name   text        PRIMARY KEY CHECK (handler_name <> ''),
    transaction_id xid8,
    position       bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    last_error     text,
    attempts       integer     NOT NULL DEFAULT 0,
    last_error_at  timestamptz,
    CHECK ((transaction_id IS NULL) = (position IS NULL))
);
