//! Fault tests: timeouts, killed connections, missing or mismatched schema, bad configuration.
mod support;

use dcb_core::{
    Error, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem, ReadOptions,
    StateProjector,
};
use dcb_postgres::{PostgresEventStore, StoreConfig};
use futures_util::StreamExt;
use std::time::Duration;
use support::{install_brake, test_store, TestStore};

fn event(t: &str, id: &str) -> NewEvent {
    NewEvent::builder(t).tag("id", id).build().expect("event")
}

async fn count(ts: &TestStore) -> i64 {
    ts.admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {}", ts.table("events")), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn append_timeout_is_enforced_and_writes_nothing() {
    let ts = test_store(StoreConfig::default().append_timeout(Duration::from_millis(300))).await;
    let _brake = install_brake(&ts, 4141).await;
    let err = ts.append(vec![event("Slow", "1")]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                operation: "append",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(count(&ts).await, 0);
    // The pool recovers: the next append works.
    ts.append(vec![event("Fast", "1")])
        .await
        .expect("append after timeout");
    assert_eq!(count(&ts).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_timeout_is_enforced_while_a_matching_writer_is_stuck() {
    let ts = test_store(StoreConfig::default().query_timeout(Duration::from_millis(300))).await;
    let brake = install_brake(&ts, 4343).await;
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fence of a read that could see the stuck event must wait for it: it times out.
    let err = ts
        .query(&Query::types(["Slow"]), ReadOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                operation: "query",
                ..
            }
        ),
        "{err}"
    );
    // A read of an unrelated boundary is not held up.
    let other = ts
        .query(&Query::types(["Other"]), ReadOptions::default())
        .await;
    assert!(other.expect("unrelated read").is_empty());
    brake
        .batch_execute("SELECT pg_advisory_unlock(4343)")
        .await
        .expect("release");
    writer
        .await
        .expect("join")
        .expect("writer commits once released");
    // The timed-out fence must have released its keys, or this writer of a matching event would
    // wait on a pooled connection's leftover lock.
    tokio::time::timeout(Duration::from_secs(5), ts.append(vec![event("Slow", "2")]))
        .await
        .expect("no fence lock left behind")
        .expect("append after the timed-out fence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_backend_mid_append_leaves_nothing_and_the_pool_recovers() {
    let ts = test_store(StoreConfig::default().pool_size(2)).await;
    let brake = install_brake(&ts, 4242).await;
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move {
            store
                .append(vec![event("Slow", "1"), event("Slow", "2")])
                .await
        })
    };
    // Find the backend stuck on the brake and kill it.
    let admin = ts.admin().await;
    let mut killed = false;
    for _ in 0..50 {
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted",
                &[],
            )
            .await
            .expect("terminate");
        if !rows.is_empty() {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed, "the stuck append was never seen waiting");
    let err = writer.await.expect("join").unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err}");
    drop(brake);
    assert_eq!(
        count(&ts).await,
        0,
        "a killed append must leave nothing behind"
    );
    for i in 0..4 {
        ts.append(vec![event("Fast", &i.to_string())])
            .await
            .expect("pool recovers after a killed connection");
    }
    assert_eq!(count(&ts).await, 4);
}

#[tokio::test]
async fn missing_schema_is_a_clear_error() {
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let err = PostgresEventStore::connect(
        &schema.url,
        StoreConfig::default().schema(schema.schema.clone()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("migrate"), "{err}");
}

#[tokio::test]
async fn newer_or_older_schema_version_is_refused() {
    let ts = test_store(StoreConfig::default()).await;
    let admin = ts.admin().await;
    let versions = ts.table("schema_version");
    admin
        .batch_execute(&format!("INSERT INTO {versions} (version) VALUES (99)"))
        .await
        .expect("bump version");
    let config = StoreConfig::default().schema(ts.schema.schema.clone());
    let err = PostgresEventStore::connect(&ts.schema.url, config.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Schema { .. }) && err.to_string().contains("newer"),
        "{err}"
    );
    admin
        .batch_execute(&format!("DELETE FROM {versions}"))
        .await
        .expect("clear versions");
    let err = PostgresEventStore::connect(&ts.schema.url, config)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_are_safe() {
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let config = StoreConfig::default()
        .schema(schema.schema.clone())
        .auto_migrate(true);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = schema.url.clone();
            let config = config.clone();
            tokio::spawn(async move { PostgresEventStore::connect(&url, config).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        task.await.expect("join").expect("concurrent migrate");
    }
}

#[tokio::test]
async fn invalid_configuration_is_rejected_before_connecting() {
    let url = "postgres://postgres@127.0.0.1:1/never";
    let cases = [
        StoreConfig::default().stream_buffer(0),
        StoreConfig::default().max_batch_size(0),
        StoreConfig::default().append_timeout(Duration::ZERO),
        StoreConfig::default().max_concurrent_projections(0),
        StoreConfig::default().pool_size(0),
        StoreConfig::default().schema(""),
    ];
    for config in cases {
        let err = PostgresEventStore::connect(url, config.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{config:?}: {err}");
    }
    let err = PostgresEventStore::connect("not a url", StoreConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config { field: "url", .. }), "{err}");
}

#[tokio::test]
async fn max_batch_size_takes_effect() {
    let ts = test_store(StoreConfig::default().max_batch_size(3)).await;
    let events: Vec<_> = (0..4).map(|i| event("E", &i.to_string())).collect();
    let err = ts.append(events).await.unwrap_err();
    assert!(err.is_validation(), "{err}");
    assert_eq!(count(&ts).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_concurrent_projections_takes_effect() {
    let ts = test_store(StoreConfig::default().max_concurrent_projections(1)).await;
    ts.append(vec![event("E", "1")]).await.expect("append");
    let query = Query::types(["E"]);
    // An unfinished project_stream holds the only slot.
    let held = ts.project_stream(StateProjector::counter(query.clone()), 1);
    let err = ts
        .project(StateProjector::counter(query.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::TooManyProjections { limit: 1 }),
        "{err}"
    );
    drop(held);
    ts.project(StateProjector::counter(query))
        .await
        .expect("slot freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_stream_returns_its_connection() {
    let ts = test_store(StoreConfig::default().pool_size(1).stream_buffer(10)).await;
    let events: Vec<_> = (0..100).map(|i| event("E", &i.to_string())).collect();
    ts.append(events).await.expect("append");
    for _ in 0..5 {
        let mut stream = ts.query_stream(&Query::all(), ReadOptions::default());
        for _ in 0..15 {
            stream.next().await.expect("item").expect("event");
        }
        drop(stream);
    }
    // With a pool of one, this only works if every abandoned stream gave its connection back.
    let all = tokio::time::timeout(
        Duration::from_secs(10),
        ts.query(&Query::all(), ReadOptions::default()),
    )
    .await
    .expect("a connection is free again")
    .expect("query");
    assert_eq!(all.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_reports_errors_as_items() {
    let ts = test_store(StoreConfig::default()).await;
    ts.admin()
        .await
        .batch_execute(&format!("DROP TABLE {} CASCADE", ts.table("events")))
        .await
        .expect("drop table");
    let items: Vec<_> = ts
        .query_stream(
            &Query::from(QueryItem::new().types(["E"])),
            ReadOptions::default(),
        )
        .collect()
        .await;
    assert_eq!(items.len(), 1);
    assert!(items[0].is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_fence_leaves_no_lock_behind() {
    // The store's sessions are recognisable by their application name.
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let sep = if schema.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}application_name=crablet_fence_leak", schema.url);
    let config = StoreConfig::default()
        .schema(schema.schema.clone())
        .auto_migrate(true)
        .query_timeout(Duration::from_millis(300));
    let store = PostgresEventStore::connect(&url, config)
        .await
        .expect("store");
    let ts = TestStore { store, schema };
    let brake = install_brake(&ts, 4444).await;
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Many keys, so the fence almost surely holds some of them when it times out on `Slow`.
    let items = (0..30)
        .map(|i| QueryItem::new().types([format!("Other{i}")]))
        .chain([QueryItem::new().types(["Slow"])]);
    let err = ts
        .query(&Query::from_items(items), ReadOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    // An idle session holds no transaction locks: any advisory lock it holds is a session lock.
    let held: i64 = ts
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND a.application_name = 'crablet_fence_leak' \
             AND a.state = 'idle'",
            &[],
        )
        .await
        .expect("pg_locks")
        .get(0);
    assert_eq!(held, 0, "a timed-out fence left locks behind");
    brake
        .batch_execute("SELECT pg_advisory_unlock(4444)")
        .await
        .expect("release");
    writer.await.expect("join").expect("writer commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_defaulting_to_another_isolation_append_in_explicit_transactions() {
    // A role or database defaulting to SERIALIZABLE: the one-statement append would run under
    // it, so the store notices at connect and appends in READ COMMITTED transactions instead.
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let sep = if schema.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{sep}options=-c%20default_transaction_isolation%3Dserializable",
        schema.url
    );
    let config = StoreConfig::default()
        .schema(schema.schema.clone())
        .auto_migrate(true);
    let store = PostgresEventStore::connect(&url, config)
        .await
        .expect("store");
    let ts = TestStore { store, schema };
    let first = ts.append(vec![event("Opened", "1")]).await.expect("append");
    let second = ts.append(vec![event("Opened", "2")]).await.expect("append");
    assert!(second > first);
    let decision = ts
        .project(StateProjector::counter(Query::types(["Opened"])))
        .await
        .expect("project");
    assert_eq!(decision.states, 2);
    ts.append(vec![event("Opened", "3")]).await.expect("append");
    let err = ts
        .append_if(vec![event("Opened", "4")], decision.condition)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_2_store_upgrades_in_place_and_keeps_its_events() {
    // A schema as the previous release left it: migrations 1 and 2, with events in it.
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let quoted = format!("\"{}\"", schema.schema);
    let admin = schema.connect().await.expect("admin");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {quoted}.schema_version (\
                version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); \
             {} {} \
             INSERT INTO {quoted}.schema_version (version) VALUES (1), (2); \
             INSERT INTO {quoted}.events (type, tags, data) \
             VALUES ('Opened', ARRAY['id:1'], '{{}}'), ('Opened', ARRAY['id:2'], '{{}}')",
            include_str!("../../../sql/001_init.sql").replace("__SCHEMA__", &quoted),
            include_str!("../../../sql/002_handlers.sql").replace("__SCHEMA__", &quoted),
        ))
        .await
        .expect("version 2 schema");
    let config = StoreConfig::default().schema(schema.schema.clone());
    let err = PostgresEventStore::connect(&schema.url, config.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("migrate"), "{err}");

    let store = PostgresEventStore::connect(&schema.url, config.auto_migrate(true))
        .await
        .expect("upgrade to the current version");
    let ts = TestStore { store, schema };
    let before = ts
        .query(&Query::types(["Opened"]), ReadOptions::default())
        .await
        .expect("read old events");
    assert_eq!(before.len(), 2);
    let decision = ts
        .project(StateProjector::counter(Query::types(["Opened"])))
        .await
        .expect("project");
    assert_eq!(decision.states, 2);
    ts.append_if(vec![event("Opened", "3")], decision.condition)
        .await
        .expect("append_if after the upgrade");
    let version: i32 = admin
        .query_one(
            &format!("SELECT max(version) FROM {quoted}.schema_version"),
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, dcb_postgres::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_3_store_with_handler_checkpoints_upgrades_to_the_current_schema() {
    // A schema as the previous release left it: migrations 1 to 3, a handler with a checkpoint
    // and a failure streak.
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let quoted = format!("\"{}\"", schema.schema);
    let admin = schema.connect().await.expect("admin");
    admin
        .batch_execute(&format!(
            "CREATE TABLE {quoted}.schema_version (\
                version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); \
             {} {} {} \
             INSERT INTO {quoted}.schema_version (version) VALUES (1), (2), (3); \
             INSERT INTO {quoted}.events (type, tags, data) VALUES ('Opened', ARRAY['id:1'], '{{}}'); \
             INSERT INTO {quoted}.handler_checkpoints \
                 (handler_name, transaction_id, position, attempts, last_error, last_error_at) \
             SELECT 'balances', transaction_id, position, 2, 'boom', now() FROM {quoted}.events",
            include_str!("../../../sql/001_init.sql").replace("__SCHEMA__", &quoted),
            include_str!("../../../sql/002_handlers.sql").replace("__SCHEMA__", &quoted),
            include_str!("../../../sql/003_fence.sql").replace("__SCHEMA__", &quoted),
        ))
        .await
        .expect("version 3 schema");
    let config = StoreConfig::default().schema(schema.schema.clone());
    let store = PostgresEventStore::connect(&schema.url, config.auto_migrate(true))
        .await
        .expect("upgrade to the current version");
    let events = store
        .query(&Query::types(["Opened"]), ReadOptions::default())
        .await
        .expect("read old events");
    let record = store
        .handler_status("balances")
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.checkpoint, Some(events[0].cursor));
    assert_eq!(
        (
            record.attempts,
            record.last_error.as_deref(),
            record.failing_at
        ),
        (2, Some("boom"), None)
    );
    assert!(store
        .parked_events("balances")
        .await
        .expect("parked table")
        .is_empty());
    let version: i32 = admin
        .query_one(
            &format!("SELECT max(version) FROM {quoted}.schema_version"),
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, dcb_postgres::SCHEMA_VERSION);
    assert_eq!(dcb_postgres::SCHEMA_VERSION, 6);
}

/// Inserts a row straight into the events table (as another tool might) and returns its cursor.
async fn insert_raw(ts: &TestStore, event_type: &str, tags: &str, data: &str) -> dcb_core::Cursor {
    let row = ts
        .admin()
        .await
        .query_one(
            &format!(
                "INSERT INTO {} (type, tags, data) VALUES ($1, $2::text::text[], $3::text::jsonb) \
                 RETURNING transaction_id::text::int8, position",
                ts.table("events")
            ),
            &[&event_type, &tags, &data],
        )
        .await
        .expect("raw insert");
    dcb_core::Cursor::new(row.get::<_, i64>(0) as u64, row.get(1))
}

/// A row no append writes (a tag without ':', JSON nested past serde_json's limit) fails every
/// read that touches it with `CorruptEvent` naming its cursor, type and reason; a stream first
/// delivers the events before it; reads that do not touch it are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_rows_fail_reads_with_their_cursor_type_and_reason() {
    let ts = test_store(StoreConfig::default()).await;
    let good = |id: &str| event("Good", id);
    ts.append(vec![good("1")]).await.expect("append");
    let bad_tag = insert_raw(&ts, "BadTag", "{no-colon}", "{}").await;
    ts.append(vec![good("2")]).await.expect("append");
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let too_deep = insert_raw(&ts, "TooDeep", "{id:3}", &deep).await;

    let expect_corrupt = |err: Error, cursor, event_type: &str, reason: &str| match &err {
        Error::CorruptEvent {
            cursor: c,
            event_type: t,
            reason: r,
        } => {
            assert_eq!((*c, t.as_str()), (cursor, event_type), "{err}");
            assert!(r.contains(reason), "reason {r:?} should mention {reason:?}");
            let shown = err.to_string();
            assert!(
                shown.contains(&cursor.to_string()) && shown.contains(event_type),
                "{shown}"
            );
        }
        other => panic!("expected CorruptEvent, got {other:?}"),
    };
    let all = ts.query(&Query::all(), ReadOptions::default()).await;
    expect_corrupt(all.unwrap_err(), bad_tag, "BadTag", "no ':'");
    let deep_read = ts
        .query(&Query::types(["TooDeep"]), ReadOptions::default())
        .await;
    expect_corrupt(
        deep_read.unwrap_err(),
        too_deep,
        "TooDeep",
        "recursion limit",
    );
    let fine = ts
        .query(&Query::types(["Good"]), ReadOptions::default())
        .await
        .expect("reads that skip the bad rows work");
    assert_eq!(fine.len(), 2);

    let mut stream = ts.query_stream(&Query::all(), ReadOptions::default());
    let first = stream
        .next()
        .await
        .expect("an item")
        .expect("the first event");
    assert_eq!(first.tag("id"), Some("1"));
    let second = stream.next().await.expect("an item").unwrap_err();
    expect_corrupt(second, bad_tag, "BadTag", "no ':'");
    assert!(stream.next().await.is_none(), "the error ends the stream");

    let projected = ts
        .project(StateProjector::counter(Query::types(["TooDeep"])))
        .await;
    expect_corrupt(
        projected.unwrap_err(),
        too_deep,
        "TooDeep",
        "recursion limit",
    );
}
