-- crablet schema, version 6: the command executor's idempotency key in a table of its own.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- One row per command that carried an id, written by the command's own transaction (the
-- statement that records the command). Its primary key is what makes a command id unique
-- across the whole history: `commands` can then be range-partitioned (a unique constraint of
-- a partitioned table must contain the partition key, so `commands.command_id UNIQUE` could
-- only be unique per partition), and a detached (archived) commands partition takes no id
-- with it: a retry of an archived command is still a duplicate. The type, last event and time
-- are kept so that the duplicate's record can be reported after its `commands` row left.
CREATE TABLE IF NOT EXISTS __SCHEMA__.command_ids (
    command_id          text        PRIMARY KEY,
    transaction_id      xid8        NOT NULL,
    command_type        text        NOT NULL,
    last_event_position bigint,
    occurred_at         timestamptz NOT NULL
);

-- The ids recorded so far (idempotent: a row already there is kept).
INSERT INTO __SCHEMA__.command_ids
    (command_id, transaction_id, command_type, last_event_position, occurred_at)
SELECT command_id, transaction_id, type, last_event_position, occurred_at
FROM __SCHEMA__.commands
WHERE command_id IS NOT NULL
ON CONFLICT (command_id) DO NOTHING;
