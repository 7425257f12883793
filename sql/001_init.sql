-- crablet schema, version 1.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- The event log. Cursor order is (transaction_id, position): the id of the writing transaction,
-- then a sequence value. Writers take their advisory locks before their transaction gets an xid
-- (see docs/design.md), so the xid order agrees with the order of conflicting decisions.
CREATE TABLE __SCHEMA__.events (
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    position       bigint      GENERATED ALWAYS AS IDENTITY,
    type           text        NOT NULL CHECK (type <> ''),
    -- Tags as 'key:value'; keys never contain ':', so the first ':' splits them.
    tags           text[]      NOT NULL,
    data           jsonb       NOT NULL,
    metadata       jsonb,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transaction_id, position)
);

-- Tag lookups. fastupdate=off: a pending list would make every conditional check scan it.
CREATE INDEX events_tags_idx ON __SCHEMA__.events USING gin (tags) WITH (fastupdate = off);
-- Type-only queries and conditions, in cursor order.
CREATE INDEX events_type_idx ON __SCHEMA__.events (type, transaction_id, position);

-- The command audit trail: one row per executed command, written in the same transaction as
-- the command's events.
CREATE TABLE __SCHEMA__.commands (
    transaction_id      xid8        NOT NULL DEFAULT pg_current_xact_id() PRIMARY KEY,
    command_id          text        UNIQUE,
    type                text        NOT NULL CHECK (type <> ''),
    data                jsonb       NOT NULL,
    metadata            jsonb,
    last_event_position bigint,
    occurred_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_type_time_idx ON __SCHEMA__.commands (type, occurred_at);
CREATE INDEX commands_time_idx ON __SCHEMA__.commands (occurred_at);

-- Takes transaction-scoped advisory locks in the given order (callers sort them), exclusive
-- where `exclusive[i]`, shared otherwise. One call per transaction keeps acquisition ordered
-- and therefore deadlock-free.
CREATE FUNCTION __SCHEMA__.lock_keys(keys bigint[], exclusive boolean[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        IF exclusive[i] THEN
            PERFORM pg_advisory_xact_lock(keys[i]);
        ELSE
            PERFORM pg_advisory_xact_lock_shared(keys[i]);
        END IF;
    END LOOP;
END
$$;
