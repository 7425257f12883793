-- crablet schema, version 5: operators ask a running handler to replay a parked event.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- Set by `request_replay` (`crablet handlers replay`): the handler's code lives in the
-- application, so the instance holding the handler's lease performs the replay between two
-- batches, with `replay_parked`'s all-or-nothing transaction. Cleared by every replay attempt
-- (a success deletes the row; a failure records the error and one more attempt). Nullable
-- without a default: adding it rewrites nothing.
ALTER TABLE __SCHEMA__.parked_events
    ADD COLUMN replay_requested_at timestamptz;
