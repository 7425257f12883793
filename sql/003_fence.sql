-- crablet schema, version 3: reads fenced in the same round trip as the read itself.
-- `__SCHEMA__` is replaced by the store's (quoted) schema name when the migration runs.

-- The fence of a read. Takes the read's keys (exclusive where `exclusive[i]`, shared otherwise;
-- callers sort them), so it waits for every in-flight append of an event the read could match;
-- then records the snapshot that pins the read and releases the keys at once instead of holding
-- them through the read. The snapshot is returned and also kept in the transaction-local
-- setting `crablet.fence`, where the read statement that follows in the same transaction finds
-- it (docs/design.md, "Fenced reads").
--
-- The keys are transaction locks taken inside a block whose subtransaction is always rolled
-- back, which releases them: on the deliberate exception below, and equally on any error,
-- cancellation or statement timeout at any point in between. No lock can outlive the call.
--
-- Must be called in its own statement under READ COMMITTED: a statement's snapshot predates its
-- lock waits, and the read needs one taken after them; the next statement gets one.
CREATE FUNCTION __SCHEMA__.fence(keys bigint[], exclusive boolean[]) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    snapshot text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'crablet fence() must run under READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    BEGIN
        PERFORM CASE WHEN u.x THEN pg_advisory_xact_lock(u.k)
                     ELSE pg_advisory_xact_lock_shared(u.k) END
        FROM unnest(keys, exclusive) AS u(k, x);
        -- A separate SQL statement: it runs with a snapshot taken after the locks were granted.
        SELECT pg_current_snapshot()::text INTO snapshot;
        RAISE SQLSTATE 'CRFNC';
    EXCEPTION WHEN SQLSTATE 'CRFNC' THEN
        NULL;
    END;
    PERFORM set_config('crablet.fence', snapshot, true);
    RETURN snapshot;
END
$$;
