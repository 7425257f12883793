//! PostgreSQL-specific consistency scenarios of docs/design.md: out-of-order commits, long open
//! transactions, unconditional writers racing conditional ones.
mod support;

use dcb_core::{
    AppendCondition, Event, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, StateProjector,
};
use dcb_postgres::StoreConfig;
use std::time::Duration;
use support::{install_brake, test_store, wait_until_stuck};

fn event(t: &str, key: &str, id: &str) -> NewEvent {
    NewEvent::builder(t).tag(key, id).build().expect("event")
}

fn types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_commit_is_never_skipped_by_a_cursor_following_reader() {
    let ts = test_store(StoreConfig::default()).await;
    let brake = install_brake(&ts, 4251).await;
    // Writer A gets the LOWER transaction id and is held open mid-insert.
    let a = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "stream", "s")]).await })
    };
    wait_until_stuck(&ts.schema.url, 4251).await;
    // Writer B starts later (higher transaction id) and commits first.
    let b = ts
        .append(vec![event("Fast", "stream", "s")])
        .await
        .expect("B commits");

    // A reader of a boundary A does not touch reads B at once.
    let fast_only = ts
        .query(&Query::types(["Fast"]), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(types(&fast_only), ["Fast"]);

    // A reader whose query covers A's event must not return B alone: that cursor would jump
    // past A's lower transaction id and skip A forever. It waits for A instead.
    let follower = {
        let store = ts.store.clone();
        tokio::spawn(async move {
            let query = Query::from(QueryItem::new().tag("stream", "s"));
            store.query(&query, ReadOptions::default()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !follower.is_finished(),
        "the read returned while a matching writer was in flight"
    );
    brake
        .batch_execute("SELECT pg_advisory_unlock(4251)")
        .await
        .expect("release");
    let cursor_a = a.await.expect("join").expect("A commits");
    assert!(
        cursor_a < b,
        "A holds the lower cursor although it committed last"
    );
    let seen = follower.await.expect("join").expect("follower read");
    assert_eq!(
        types(&seen),
        ["Slow", "Fast"],
        "cursor order, nothing skipped"
    );

    // And a reader that had continued after B's cursor would never have been owed A:
    let after_b = ts
        .query(
            &Query::from(QueryItem::new().tag("stream", "s")),
            ReadOptions::default().after(b),
        )
        .await
        .expect("read after b");
    assert!(after_b.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_are_detected_and_own_writes_read_while_an_unrelated_transaction_is_open() {
    let ts = test_store(StoreConfig::default()).await;
    // An unrelated transaction with an id stays open for the whole test (holds the xmin horizon).
    let long = ts.admin().await;
    long.batch_execute("BEGIN; SELECT pg_current_xact_id();")
        .await
        .expect("open long tx");

    let course = Query::from(
        QueryItem::new()
            .types(["CourseDefined"])
            .tag("course_id", "c1"),
    );
    for attempt in 0..2 {
        let decision = ts
            .project(StateProjector::exists(course.clone()))
            .await
            .expect("project");
        let result = if decision.states {
            Err(dcb_core::Error::Conflict(dcb_core::ConflictInfo::new(
                None, None,
            )))
        } else {
            ts.append_if(
                vec![event("CourseDefined", "course_id", "c1")],
                decision.condition,
            )
            .await
        };
        assert_eq!(
            result.is_ok(),
            attempt == 0,
            "attempt {attempt}: {result:?}"
        );
    }
    // A replayed stale decision conflicts too.
    let stale = AppendCondition::new(course.clone());
    let err = ts
        .append_if(vec![event("CourseDefined", "course_id", "c1")], stale)
        .await
        .unwrap_err();
    assert!(err.is_conflict());
    // Reads see the store's own committed writes despite the open transaction.
    let seen = ts
        .query(&course, ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(seen.len(), 1);
    long.batch_execute("ROLLBACK").await.expect("close long tx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_append_waits_for_an_in_flight_matching_writer_and_then_fails() {
    let ts = test_store(StoreConfig::default()).await;
    let brake = install_brake(&ts, 4252).await;
    let boundary = Query::from(QueryItem::new().tag("account", "a1"));
    let decision = ts
        .project(StateProjector::counter(boundary.clone()))
        .await
        .expect("project");
    assert_eq!(decision.states, 0);
    // An unconditional writer of a matching event is in flight (has its transaction id).
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "account", "a1")]).await })
    };
    wait_until_stuck(&ts.schema.url, 4252).await;
    let conditional = {
        let store = ts.store.clone();
        let condition = decision.condition.clone();
        tokio::spawn(async move {
            store
                .append_if(vec![event("Withdrawn", "account", "a1")], condition)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !conditional.is_finished(),
        "the check must wait for the in-flight writer"
    );
    brake
        .batch_execute("SELECT pg_advisory_unlock(4252)")
        .await
        .expect("release");
    writer.await.expect("join").expect("writer");
    let err = conditional.await.expect("join").unwrap_err();
    assert!(err.is_conflict(), "{err}");
    // ... while a conditional append on a disjoint boundary never waited.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_boundary_is_not_blocked_by_an_in_flight_writer() {
    let ts = test_store(StoreConfig::default()).await;
    let brake = install_brake(&ts, 4253).await;
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "account", "a1")]).await })
    };
    wait_until_stuck(&ts.schema.url, 4253).await;
    let other = Query::from(QueryItem::new().types(["Withdrawn"]).tag("account", "a2"));
    let decision = tokio::time::timeout(
        Duration::from_secs(5),
        ts.project(StateProjector::counter(other.clone())),
    )
    .await
    .expect("a disjoint decision read does not wait")
    .expect("project");
    tokio::time::timeout(
        Duration::from_secs(5),
        ts.append_if(
            vec![event("Withdrawn", "account", "a2")],
            decision.condition,
        ),
    )
    .await
    .expect("a disjoint conditional append does not wait")
    .expect("append_if");
    brake
        .batch_execute("SELECT pg_advisory_unlock(4253)")
        .await
        .expect("release");
    writer.await.expect("join").expect("writer");
}

/// A batch stuck mid-insert with 60 events on 60 accounts (about 120 lock keys) and, once it
/// holds its locks, a decision on another account: does the decision wait for the batch?
async fn decision_waits_for_a_large_batch(max_lock_keys: usize, brake_key: i64) -> bool {
    let ts = test_store(StoreConfig::default().max_lock_keys(max_lock_keys)).await;
    let brake = install_brake(&ts, brake_key).await;
    let batch: Vec<NewEvent> = (0..60)
        .map(|i| event("Slow", "account", &format!("b{i}")))
        .collect();
    let writer = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(batch).await })
    };
    wait_until_stuck(&ts.schema.url, brake_key).await;
    let other = Query::from(QueryItem::new().types(["Withdrawn"]).tag("account", "a2"));
    let read = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.project(StateProjector::counter(other)).await })
    };
    // Waiting shows in pg_locks as the read's fence, of this schema, not granted an advisory
    // lock; finishing shows as the read's task ending.
    let admin = ts.admin().await;
    let mut waited = false;
    for _ in 0..500 {
        if read.is_finished() {
            break;
        }
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                 WHERE l.locktype = 'advisory' AND NOT l.granted \
                   AND a.query LIKE '%' || $1 || '%fence%'",
                &[&ts.schema.schema],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if n > 0 {
            waited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        waited || read.is_finished(),
        "the read neither finished nor waited within 10 s"
    );
    brake
        .batch_execute(&format!("SELECT pg_advisory_unlock({brake_key})"))
        .await
        .expect("release");
    writer.await.expect("join").expect("batch");
    read.await
        .expect("join")
        .expect("the read completes once the batch is done");
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_batch_holds_up_unrelated_decisions_only_past_max_lock_keys() {
    assert!(
        decision_waits_for_a_large_batch(48, 4256).await,
        "past 48 keys the batch escalates to the key every read shares"
    );
    assert!(
        !decision_waits_for_a_large_batch(400, 4257).await,
        "with room for its fine keys the batch leaves other boundaries alone"
    );
    assert!(matches!(
        StoreConfig::default().max_lock_keys(0).validate(),
        Err(dcb_core::Error::Config {
            field: "max_lock_keys",
            ..
        })
    ));
}
