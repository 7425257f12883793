//! A partitioned log: the conformance suite on a store whose events span many small
//! partitions created during the run, the conversion of a store with events (cursors kept
//! exactly, a follower neither skips nor repeats), partitions created ahead under concurrent
//! appends, and the detach of an old partition.
mod support;

use dcb_core::{
    AppendCondition, Cursor, Error, EventReader, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, Tag,
};
use dcb_postgres::{PartitionConfig, PartitionError, StoreConfig};
use serde_json::json;
use std::sync::Arc;
use support::test_store;
use tokio::sync::Barrier;

/// The whole suite on partitions of 64 positions with one range ahead: tests write hundreds to
/// thousands of events, so they cross partitions, grow them in the background, and batches
/// larger than the margin meet a missing partition and run again.
mod conformance {
    use super::support;
    use dcb_postgres::PartitionConfig;

    dcb_testkit::conformance_tests!(
        support::PgFactory::partitioned(PartitionConfig::new(64).ahead(1)),
        disjoint_for = std::time::Duration::from_millis(500),
    );
}

fn event(kind: &str, key: &str, value: usize) -> NewEvent {
    NewEvent::new(
        kind,
        vec![Tag::new(key, value.to_string())],
        json!({ "n": value }),
    )
}

async fn all(store: &impl EventReader) -> Vec<Cursor> {
    store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("read all")
        .into_iter()
        .map(|e| e.cursor)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conversion_keeps_every_cursor_and_a_follower_neither_skips_nor_repeats() {
    let ts = test_store(StoreConfig::default()).await;
    for i in 0..50 {
        ts.append(vec![event("Old", "k", i % 7), event("Old", "j", i)])
            .await
            .expect("append before");
    }
    let before = all(&*ts).await;
    assert_eq!(before.len(), 100);
    let store = ts.store.clone();

    // A follower reads after its last cursor all along; a writer appends all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let follower = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<Cursor> = Vec::new();
            loop {
                let done = stop.load(std::sync::atomic::Ordering::Acquire);
                let page = store
                    .query(
                        &Query::all(),
                        ReadOptions::default().after_opt(seen.last().copied()),
                    )
                    .await
                    .expect("follow");
                seen.extend(page.iter().map(|e| e.cursor));
                if done {
                    return seen;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                store
                    .append(vec![event("During", "k", n)])
                    .await
                    .expect("append during");
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let partitions = store
        .partition(
            PartitionConfig::new(100)
                .ahead(2)
                .conversion_headroom(100_000),
        )
        .await
        .expect("partition");
    assert!(store.is_partitioned().await.expect("partitioned?"));
    assert_eq!(partitions[0].from, None, "{partitions:?}");
    assert_eq!(partitions[0].name, "events_p0");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let written = writer.await.expect("writer");
    // Once more after the writer stopped, so the follower catches up.
    let seen = follower.await.expect("follower");
    ts.append(vec![event("After", "k", 1)])
        .await
        .expect("append after");

    let after = all(&*ts).await;
    assert_eq!(&after[..100], &before[..], "old cursors changed");
    assert_eq!(after.len(), 100 + written + 1);
    let mut sorted = after.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, after, "cursor order or uniqueness broken");
    assert_eq!(
        &seen[..],
        &after[..seen.len()],
        "the follower skipped or repeated"
    );
    assert_eq!(seen.len(), 100 + written);
    // The identity sequence continued: positions only grow.
    let max_before = before.iter().map(|c| c.position).max().unwrap_or(0);
    assert!(after[100..].iter().all(|c| c.position > max_before));
    // Converting again only stores the configuration.
    store
        .partition(PartitionConfig::new(100).ahead(3))
        .await
        .expect("partition again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_are_created_ahead_under_concurrent_appends() {
    let ts = test_store(StoreConfig::default()).await;
    ts.partition(PartitionConfig::new(10).ahead(1))
        .await
        .expect("partition");
    let clients = 16;
    let rounds = 10;
    let barrier = Arc::new(Barrier::new(clients));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (store, barrier) = (ts.store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                barrier.wait().await;
                // Batches of up to 25 events: larger than the margin of one range.
                let batch = (0..=(c + r) % 25)
                    .map(|i| event("Grow", "c", c * 1000 + i))
                    .collect();
                let condition = AppendCondition::new(Query::from(
                    QueryItem::new()
                        .types(["Grow"])
                        .tag("round", format!("{c}-{r}")),
                ));
                store
                    .append_if(batch, condition)
                    .await
                    .expect("append under growth");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    let expected: usize = (0..clients)
        .flat_map(|c| (0..rounds).map(move |r| (c + r) % 25 + 1))
        .sum();
    assert_eq!(all(&*ts).await.len(), expected);
    let partitions = ts.partitions().await.expect("partitions");
    assert!(partitions.len() > expected / 10, "{partitions:?}");
    for pair in partitions.windows(2) {
        assert_eq!(
            pair[0].to,
            pair[1].from.expect("bounded"),
            "gap in {partitions:?}"
        );
    }
}

#[tokio::test]
async fn an_old_partition_is_detached_and_the_newest_refused() {
    let ts = test_store(StoreConfig::default()).await;
    ts.partition(PartitionConfig::new(20).ahead(1))
        .await
        .expect("partition");
    for i in 0..50 {
        ts.append(vec![event("CourseDefined", "course", i)])
            .await
            .expect("append");
    }
    let partitions = ts.partitions().await.expect("partitions");
    let newest = partitions
        .iter()
        .rev()
        .find(|p| p.from.is_some_and(|f| f <= 50))
        .expect("current");
    match ts.detach_partition(&newest.name, false).await {
        Err(PartitionError::TooRecent { .. }) => {}
        other => panic!("detaching the current partition: {other:?}"),
    }
    match ts.detach_partition("events_nope", false).await {
        Err(PartitionError::UnknownPartition { .. }) => {}
        other => panic!("detaching an unknown partition: {other:?}"),
    }
    // The conversion of an empty store leaves one range of headroom: events_p0 is
    // [MINVALUE, 40), positions 1..=39, courses 0..=38.
    let before = ts
        .query(
            &Query::from(QueryItem::new().tag("course", "3")),
            ReadOptions::default(),
        )
        .await
        .expect("read");
    assert_eq!(before.len(), 1);
    ts.detach_partition("events_p0", true)
        .await
        .expect("detach");
    let remaining = all(&*ts).await;
    assert_eq!(remaining.len(), 50 - 39);
    assert!(remaining.iter().all(|c| c.position >= 40));
    // What archiving means for decisions: the detached events no longer exist for conditions.
    let condition = AppendCondition::new(Query::from(
        QueryItem::new().types(["CourseDefined"]).tag("course", "3"),
    ));
    ts.append_if(vec![event("CourseDefined", "course", 3)], condition.clone())
        .await
        .expect("the archived course is gone for decisions");
    match ts
        .append_if(vec![event("CourseDefined", "course", 3)], condition)
        .await
    {
        Err(Error::Conflict(_)) => {}
        other => panic!("a live course must conflict: {other:?}"),
    }
    let names: Vec<String> = ts
        .partitions()
        .await
        .expect("partitions")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(!names.contains(&"events_p0".to_string()));
    // Appends still grow the log.
    ts.append((0..30).map(|i| event("More", "m", i)).collect())
        .await
        .expect("append more");
}

#[tokio::test]
async fn an_unpartitioned_store_refuses_partition_maintenance() {
    let ts = test_store(StoreConfig::default()).await;
    assert!(!ts.is_partitioned().await.expect("partitioned?"));
    assert!(ts.partitions().await.expect("list").is_empty());
    match ts.create_partitions_ahead(0).await {
        Err(PartitionError::NotPartitioned { .. }) => {}
        other => panic!("{other:?}"),
    }
    match ts.partition(PartitionConfig::new(0)).await {
        Err(PartitionError::InvalidConfig { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A locale whose server messages are not English, if the server accepts one for
/// `lc_messages` (the translations ship with PostgreSQL; the OS locale must exist).
async fn non_english_messages(url: &str) -> Option<&'static str> {
    let admin = dcb_testkit::pg::connect(url)
        .await
        .expect("admin connection");
    for locale in ["de_DE.UTF-8", "fr_FR.UTF-8", "es_ES.UTF-8", "it_IT.UTF-8"] {
        if admin
            .batch_execute(&format!("SET lc_messages = '{locale}'"))
            .await
            .is_err()
        {
            continue;
        }
        let translated = match admin.query_one("SELECT 1 / 0", &[]).await {
            Err(err) => err
                .as_db_error()
                .is_some_and(|db| !db.message().contains("division by zero")),
            Ok(_) => false,
        };
        if translated {
            return Some(locale);
        }
    }
    None
}

#[tokio::test]
async fn a_missing_partition_is_told_by_its_sqlstate_whatever_the_language_of_messages() {
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let Some(locale) = non_english_messages(&schema.url).await else {
        eprintln!(
            "notice: skipping a_missing_partition_is_told_by_its_sqlstate_whatever_the_language_of_messages: \
             the server accepts no non-English lc_messages (install a de_DE.UTF-8 locale)"
        );
        return;
    };
    // Every session of the store reports errors in that language (lc_messages is superuser
    // only: the test's role is one).
    let separator = if schema.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-clc_messages%3D{locale}", schema.url);
    let store = dcb_postgres::PostgresEventStore::connect(
        &url,
        StoreConfig::default()
            .schema(schema.schema.clone())
            .auto_migrate(true),
    )
    .await
    .expect("connect");
    store
        .partition(PartitionConfig::new(10).ahead(1))
        .await
        .expect("partition");
    // The server says it in that language: the English text is nowhere.
    let admin = dcb_testkit::pg::connect(&url).await.expect("admin");
    let raw = admin
        .execute(
            &format!(
                "INSERT INTO \"{}\".events (position, type, tags, data) OVERRIDING SYSTEM VALUE \
                 VALUES (1000000, 'Raw', '{{}}', '{{}}')",
                schema.schema
            ),
            &[],
        )
        .await
        .expect_err("no partition holds position 1000000");
    let db = raw.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "23514");
    assert!(db.constraint().is_none());
    assert!(
        !db.message().contains("no partition of relation"),
        "{locale} should translate: {}",
        db.message()
    );
    // The partitions end at 30, so the batch of 35 finds none for its last rows; the store
    // tells it by the SQLSTATE, creates them and runs the append again (the failed attempt's
    // positions stay unused, as for any rolled back append).
    let cursor = store
        .append((0..35).map(|i| event("Big", "b", i)).collect())
        .await
        .expect("the batch runs again after the partitions are created");
    assert!(cursor.position >= 35, "{cursor:?}");
    assert_eq!(all(&store).await.len(), 35);
    let partitions = store.partitions().await.expect("partitions");
    assert!(
        partitions.iter().any(|p| p.from == Some(30)),
        "{partitions:?}"
    );
    drop(store);
    schema.drop_now().await.expect("drop the schema");
}
