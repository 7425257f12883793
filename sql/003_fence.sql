-- crablet schema, version 3: reads fenced in the same round trip as the read itself.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- The fence of a read. Takes the read's keys (exclusive where `exclusive[i]`, shared otherwise;
-- callers sort them) as SESSION locks, so it waits for every in-flight append of an event the read
-- could match; then records the snapshot that pins the read and releases the locks at once instead
-- of holding them through the read. The snapshot is returned and also kept in the
-- transaction-local setting `crablet.fence`, where the read statement that follows in the same
-- transaction finds it (docs/design.md, "Fenced reads").
--
-- Must be called in its own statement: a statement's snapshot predates its lock waits, and the
-- read needs one taken after them. Under READ COMMITTED the next statement gets one.
CREATE FUNCTION __SCHEMA__.fence(keys bigint[], exclusive boolean[]) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    taken int := 0;
    snapshot text;
BEGIN
    BEGIN
        FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
            IF exclusive[i] THEN
                PERFORM pg_advisory_lock(keys[i]);
            ELSE
                PERFORM pg_advisory_lock_shared(keys[i]);
            END IF;
            taken := i;
        END LOOP;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- Session locks outlive the statement: never leave one behind on a pooled connection.
        FOR i IN 1 .. taken LOOP
            IF exclusive[i] THEN
                PERFORM pg_advisory_unlock(keys[i]);
            ELSE
                PERFORM pg_advisory_unlock_shared(keys[i]);
            END IF;
        END LOOP;
        RAISE;
    END;
    -- A separate SQL statement: it runs with a snapshot taken after the locks were granted.
    SELECT pg_current_snapshot()::text INTO snapshot;
    FOR i IN 1 .. taken LOOP
        IF exclusive[i] THEN
            PERFORM pg_advisory_unlock(keys[i]);
        ELSE
            PERFORM pg_advisory_unlock_shared(keys[i]);
        END IF;
    END LOOP;
    PERFORM set_config('crablet.fence', snapshot, true);
    RETURN snapshot;
END
$$;

-- Appends take their locks with plain SQL now (no function call per key).
DROP FUNCTION __SCHEMA__.lock_keys(bigint[], boolean[]);
