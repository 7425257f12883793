//! The executor on a partitioned store, whose `commands` table is range-partitioned by
//! transaction id and whose idempotency keys live in `command_ids`: the whole executor suite
//! (the 16 barrier-synchronized racers with one id included), retries of an id whose original
//! lies in an older commands partition (barrier-synchronized, none runs), a retry after that
//! partition was detached and dropped (still a duplicate), the conversion of a store with
//! commands (every row kept), and migration 6's backfill of `command_ids`.
//!
//! Every test gets its own schema, dropped when the test ends.

#[macro_use]
mod common;

use dcb_command::{handler_fn, Command, CommandExecutor, Decision, HandlerError};
use dcb_core::{CommandFilter, EventReader, EventStore, NewEvent, Query, ReadOptions};
use dcb_postgres::{
    PartitionConfig, PartitionError, PartitionInfo, PostgresEventStore, StoreConfig,
};
use dcb_testkit::pg::TestSchema;
use serde_json::json;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

async fn connect(schema: &TestSchema) -> PostgresEventStore {
    PostgresEventStore::connect(
        &schema.url,
        StoreConfig::default()
            .schema(&schema.schema)
            .auto_migrate(true),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to {} failed: {e}", schema.url))
}

async fn partitioned(range: i64) -> (PostgresEventStore, TestSchema) {
    let schema = TestSchema::new().await;
    let store = connect(&schema).await;
    store
        .partition(PartitionConfig::new(range).command_range(range).ahead(1))
        .await
        .expect("partition");
    (store, schema)
}

/// For the suite: ranges of 1000 positions and 1000 transaction ids (the cluster's other tests
/// draw ids too, so commands partitions are created as the suite runs).
async fn store() -> (Arc<dyn EventStore>, TestSchema) {
    let (store, schema) = partitioned(1000).await;
    (Arc::new(store), schema)
}

all_backend_tests!();

/// Draws `n` transaction ids (one autocommit write transaction each).
async fn burn_xids(schema: &TestSchema, n: usize) {
    let admin = dcb_testkit::pg::connect(&schema.url).await.expect("admin");
    for _ in 0..n {
        admin
            .batch_execute("SELECT pg_current_xact_id()")
            .await
            .expect("draw a transaction id");
    }
}

fn holding(partitions: &[PartitionInfo], xid: u64) -> Option<PartitionInfo> {
    let xid = i64::try_from(xid).expect("xid");
    partitions
        .iter()
        .find(|p| p.from.is_none_or(|from| from <= xid) && xid < p.to)
        .cloned()
}

type Opened = Command<String>;

fn open(id: &str) -> Opened {
    Command::new("OpenAccount", id.to_string()).with_id(format!("open-{id}"))
}

/// 16 executions of `command`, released together by a barrier, each handler run counted.
async fn race(
    executor: &Arc<CommandExecutor>,
    command: Opened,
) -> (u32, Vec<dcb_command::CommandOutcome>) {
    const RACERS: usize = 16;
    let start = Arc::new(Barrier::new(RACERS));
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (executor, start, runs, command) = (
            executor.clone(),
            start.clone(),
            runs.clone(),
            command.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let handler = handler_fn(move |command: &Opened, _reader| {
                let runs = runs.clone();
                Box::pin(async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let opened = NewEvent::builder("AccountOpened")
                        .tag("account", command.payload.as_str())
                        .build()?;
                    Ok::<_, HandlerError>(Decision::append([opened]))
                })
            });
            start.wait().await;
            executor.execute(command, &handler).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("racers finish")
            .expect("racer task")
            .expect("execution");
        outcomes.push(outcome);
    }
    (runs.load(Ordering::SeqCst), outcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_of_an_id_recorded_in_an_older_or_archived_commands_partition_are_duplicates() {
    let range = 64;
    let (store, schema) = partitioned(range).await;
    let store = Arc::new(store);
    let executor = Arc::new(CommandExecutor::new(store.clone() as Arc<dyn EventStore>));

    // The original: the racers decide at once, exactly one of them commits.
    let (runs, outcomes) = race(&executor, open("a1")).await;
    assert!(runs >= 1);
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    let original = outcomes
        .iter()
        .find(|o| !o.replayed)
        .expect("the original")
        .record
        .clone();
    assert!(outcomes.iter().all(|o| o.record == original));
    let first = holding(
        &store.command_partitions().await.expect("partitions"),
        original.transaction_id,
    )
    .expect("the original's partition");

    // Move the transaction ids past the original's partition (and create the partitions for
    // them): the retries' transactions are in later partitions.
    burn_xids(&schema, usize::try_from(2 * range).expect("range")).await;
    store
        .create_partitions_ahead(0)
        .await
        .expect("partitions ahead");
    let (runs, outcomes) = race(&executor, open("a1")).await;
    assert_eq!(runs, 0, "a retry in a later partition does not run");
    assert!(outcomes.iter().all(|o| o.replayed && o.record == original));

    // Archive the original's partition: its row leaves `commands`, its id stays recorded.
    let mut detached = false;
    for _ in 0..200 {
        match store.detach_partition(&first.name, true).await {
            Ok(()) => {
                detached = true;
                break;
            }
            // Another test's transaction may still be running below the partition's end.
            Err(PartitionError::CommandsTooRecent { .. }) => {
                burn_xids(&schema, 1).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("detach {}: {other:?}", first.name),
        }
    }
    assert!(detached, "{} was never old enough to detach", first.name);
    let names: Vec<String> = store
        .command_partitions()
        .await
        .expect("partitions")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(!names.contains(&first.name), "{names:?}");
    let listed = store
        .commands(&CommandFilter::default())
        .await
        .expect("commands");
    assert!(listed.is_empty(), "the archived command left: {listed:?}");

    let (runs, outcomes) = race(&executor, open("a1")).await;
    assert_eq!(runs, 0, "a retry of an archived command does not run");
    for outcome in &outcomes {
        assert!(outcome.replayed);
        // What is kept of an archived original: id, type, transaction, last event, time.
        assert_eq!(outcome.record.id, original.id);
        assert_eq!(outcome.record.command_type, original.command_type);
        assert_eq!(outcome.record.transaction_id, original.transaction_id);
        assert_eq!(outcome.record.last_event, original.last_event);
        assert_eq!(outcome.record.data, serde_json::Value::Null);
    }
    // A new id still commits, once.
    let (_, outcomes) = race(&executor, open("a2")).await;
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    let accounts = store
        .query(&Query::types(["AccountOpened"]), ReadOptions::default())
        .await
        .expect("events");
    assert_eq!(accounts.len(), 2, "one event per id: {accounts:?}");

    // The newest commands partition is refused.
    let partitions = store.command_partitions().await.expect("partitions");
    let newest = partitions.last().expect("partitions").name.clone();
    match store.detach_partition(&newest, false).await {
        Err(PartitionError::CommandsTooRecent { .. }) => {}
        other => panic!("detaching the newest commands partition: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_conversion_keeps_every_command_row_and_its_idempotency() {
    let schema = TestSchema::new().await;
    let store = Arc::new(connect(&schema).await);
    let executor = CommandExecutor::new(store.clone() as Arc<dyn EventStore>);
    let handler = handler_fn(|command: &Command<String>, _reader| {
        Box::pin(async move {
            let opened = NewEvent::builder("AccountOpened")
                .tag("account", command.payload.as_str())
                .data(&json!({ "account": command.payload }))
                .build()?;
            Ok::<_, HandlerError>(Decision::append([opened]))
        })
    });
    for i in 0..30 {
        let command =
            Command::new("OpenAccount", format!("acc-{i}")).with_metadata(json!({ "i": i }));
        // Every other one with an id; commands without one are recorded too.
        let command = if i % 2 == 0 {
            command.with_id(format!("open-{i}"))
        } else {
            command
        };
        executor.execute(command, &handler).await.expect("execute");
    }
    let before = store
        .commands(&CommandFilter::default())
        .await
        .expect("commands");
    assert_eq!(before.len(), 30);

    store
        .partition(PartitionConfig::new(1000).command_range(1000).ahead(1))
        .await
        .expect("partition");
    let partitions = store.command_partitions().await.expect("partitions");
    assert_eq!(partitions[0].name, "commands_x0");
    assert_eq!(partitions[0].from, None);
    assert!(partitions.len() >= 2, "{partitions:?}");
    let after = store
        .commands(&CommandFilter::default())
        .await
        .expect("commands");
    assert_eq!(after, before, "every command row, unchanged");

    // The old ids are still duplicates; new commands land in the new partitions.
    let replay = executor
        .execute(
            Command::new("OpenAccount", "acc-0".to_string()).with_id("open-0"),
            &handler,
        )
        .await
        .expect("replay");
    assert!(replay.replayed);
    assert_eq!(Some(&replay.record), before.first());
    // Past the first partition's end (the conversion left one range of headroom), with no
    // partition created for those transaction ids yet: the commit finds none, creates it and
    // runs again.
    let first_end = usize::try_from(partitions[0].to).expect("bound");
    let next: i64 = dcb_testkit::pg::connect(&schema.url)
        .await
        .expect("admin")
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .expect("next xid")
        .get(0);
    burn_xids(
        &schema,
        first_end.saturating_sub(usize::try_from(next).expect("xid")) + 2000,
    )
    .await;
    let fresh = executor
        .execute(
            Command::new("OpenAccount", "acc-new".to_string()).with_id("open-new"),
            &handler,
        )
        .await
        .expect("new command");
    assert!(!fresh.replayed);
    let partitions = store.command_partitions().await.expect("partitions");
    let home = holding(&partitions, fresh.record.transaction_id).expect("its partition");
    assert_ne!(home.name, "commands_x0", "{partitions:?}");
    assert_eq!(
        store
            .commands(&CommandFilter::default())
            .await
            .expect("commands")
            .len(),
        31
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migration_6_records_the_ids_of_a_version_5_store() {
    let schema = TestSchema::new().await;
    let quoted = format!("\"{}\"", schema.schema);
    let admin = dcb_testkit::pg::connect(&schema.url).await.expect("admin");
    let migrations = [
        include_str!("../../../sql/001_init.sql"),
        include_str!("../../../sql/002_handlers.sql"),
        include_str!("../../../sql/003_fence.sql"),
        include_str!("../../../sql/004_parked.sql"),
        include_str!("../../../sql/005_replay_requests.sql"),
    ]
    .map(|m| m.replace("__SCHEMA__", &quoted))
    .join("\n");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {quoted}.schema_version (\
                version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); \
             {migrations} \
             INSERT INTO {quoted}.schema_version (version) VALUES (1), (2), (3), (4), (5);"
        ))
        .await
        .expect("a version 5 store");
    // Two transactions: a command's transaction id is its key.
    for (id, data) in [("'old-1'", "acc-old"), ("NULL", "no-id")] {
        admin
            .batch_execute(&format!(
                "INSERT INTO {quoted}.commands (command_id, type, data) \
                 VALUES ({id}, 'OpenAccount', '\"{data}\"')"
            ))
            .await
            .expect("a command of version 5");
    }
    let store = Arc::new(connect(&schema).await);
    let count: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {quoted}.command_ids"), &[])
        .await
        .expect("command_ids")
        .get(0);
    assert_eq!(count, 1, "the id, not the command without one");
    // The migration runs again without harm (a backfilled id is kept).
    admin
        .batch_execute(
            &include_str!("../../../sql/006_command_ids.sql").replace("__SCHEMA__", &quoted),
        )
        .await
        .expect("migration 6 again");

    let executor = CommandExecutor::new(store.clone() as Arc<dyn EventStore>);
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let handler = handler_fn(move |_command: &Command<String>, _reader| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok::<_, HandlerError>(Decision::nothing()) })
    });
    let replay = executor
        .execute(
            Command::new("OpenAccount", "acc-old".to_string()).with_id("old-1"),
            &handler,
        )
        .await
        .expect("replay");
    assert!(replay.replayed);
    assert_eq!(replay.record.data, json!("acc-old"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_whose_events_alone_were_partitioned_gets_its_commands_partitioned_next() {
    let schema = TestSchema::new().await;
    let quoted = format!("\"{}\"", schema.schema);
    let store = Arc::new(connect(&schema).await);
    let executor = CommandExecutor::new(store.clone() as Arc<dyn EventStore>);
    let handler = handler_fn(|command: &Command<String>, _reader| {
        Box::pin(async move {
            let opened = NewEvent::builder("AccountOpened")
                .tag("account", command.payload.as_str())
                .build()?;
            Ok::<_, HandlerError>(Decision::append([opened]))
        })
    });
    for i in 0..10 {
        executor
            .execute(
                Command::new("OpenAccount", format!("acc-{i}")).with_id(format!("open-{i}")),
                &handler,
            )
            .await
            .expect("execute");
    }
    // What the previous version's conversion left: events partitioned, commands not.
    let admin = dcb_testkit::pg::connect(&schema.url).await.expect("admin");
    admin
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {quoted}.events IN ACCESS EXCLUSIVE MODE; \
             ALTER TABLE {quoted}.events ALTER COLUMN position DROP IDENTITY; \
             ALTER TABLE {quoted}.events RENAME TO events_p0; \
             ALTER INDEX {quoted}.events_pkey RENAME TO events_p0_pkey; \
             ALTER INDEX {quoted}.events_tags_idx RENAME TO events_p0_tags_idx; \
             ALTER INDEX {quoted}.events_type_idx RENAME TO events_p0_type_idx; \
             CREATE TABLE {quoted}.events (LIKE {quoted}.events_p0 INCLUDING DEFAULTS \
                INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION) \
                PARTITION BY RANGE (position); \
             ALTER TABLE {quoted}.events ALTER COLUMN position \
                ADD GENERATED ALWAYS AS IDENTITY (START WITH 11); \
             ALTER TABLE {quoted}.events ADD PRIMARY KEY (transaction_id, position); \
             CREATE INDEX events_tags_idx ON {quoted}.events USING gin (tags) \
                WITH (fastupdate = off); \
             CREATE INDEX events_type_idx ON {quoted}.events (type, transaction_id, position); \
             ALTER TABLE {quoted}.events ATTACH PARTITION {quoted}.events_p0 \
                FOR VALUES FROM (MINVALUE) TO (1000); \
             CREATE TABLE {quoted}.partitioning (\
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), \
                range_size bigint NOT NULL CHECK (range_size > 0), \
                ahead integer NOT NULL CHECK (ahead > 0)); \
             INSERT INTO {quoted}.partitioning (range_size, ahead) VALUES (1000, 1); \
             COMMIT"
        ))
        .await
        .expect("partition the events alone");
    drop(executor);
    drop(store);
    let store = Arc::new(connect(&schema).await);
    assert!(store.is_partitioned().await.expect("partitioned"));
    assert!(store
        .command_partitions()
        .await
        .expect("partitions")
        .is_empty());
    let before = store
        .commands(&CommandFilter::default())
        .await
        .expect("commands");

    // `partition` on it converts the commands table, keeping every row.
    store
        .partition(PartitionConfig::new(1000).command_range(1000).ahead(1))
        .await
        .expect("partition again");
    let commands = store.command_partitions().await.expect("partitions");
    assert_eq!(commands[0].name, "commands_x0", "{commands:?}");
    assert_eq!(
        store
            .commands(&CommandFilter::default())
            .await
            .expect("commands"),
        before
    );
    let events = store.partitions().await.expect("partitions");
    assert_eq!(events[0].name, "events_p0");
    assert_eq!(events[0].to, 1000);
    let executor = CommandExecutor::new(store.clone() as Arc<dyn EventStore>);
    let replay = executor
        .execute(
            Command::new("OpenAccount", "acc-3".to_string()).with_id("open-3"),
            &handler,
        )
        .await
        .expect("replay");
    assert!(replay.replayed);
    let fresh = executor
        .execute(
            Command::new("OpenAccount", "acc-new".to_string()).with_id("open-new"),
            &handler,
        )
        .await
        .expect("new");
    assert!(!fresh.replayed);
    let unique: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'commands_command_id_key' \
             AND connamespace = to_regnamespace($1)",
            &[&schema.schema],
        )
        .await
        .expect("constraints")
        .get(0);
    assert_eq!(unique, 0, "the per-table unique constraint is gone");
}
