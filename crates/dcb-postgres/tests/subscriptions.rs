//! Subscriptions on PostgreSQL: catch-up to live without gap or duplicate, wake-ups in process and
//! across store instances (LISTEN/NOTIFY), out-of-order commits under a live subscriber, and a
//! subscription whose connections are killed mid-stream.
mod support;

use dcb_core::{
    Cursor, Event, EventReader, EventStore, EventStream, NewEvent, Query, QueryItem, ReadOptions,
    SubscribeExt, SubscribeOptions,
};
use dcb_postgres::{PostgresEventStore, StoreConfig};
use futures_util::StreamExt;
use std::time::Duration;
use support::{install_brake, test_store, TestStore};

fn event(t: &str, key: &str, id: &str) -> NewEvent {
    NewEvent::builder(t).tag(key, id).build().expect("event")
}

/// The next `Ok` event, skipping (and counting) error items; panics after `within`.
async fn next_ok(stream: &mut EventStream, within: Duration, errors: &mut usize) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => return event,
            Ok(Some(Err(err))) => {
                *errors += 1;
                assert!(!dcb_core::is_fatal_for_subscription(&err), "fatal: {err}");
            }
            Ok(None) => panic!("the subscription ended"),
            Err(_) => panic!("no event within {within:?}"),
        }
    }
}

async fn take(stream: &mut EventStream, n: usize, within: Duration) -> Vec<Event> {
    let mut errors = 0;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_ok(stream, within, &mut errors).await);
    }
    assert_eq!(errors, 0, "unexpected error items");
    out
}

fn cursors(events: &[Event]) -> Vec<Cursor> {
    events.iter().map(|e| e.cursor).collect()
}

/// A second store instance on the same schema: its own pool, its own listener, its own notifier.
async fn other_instance(ts: &TestStore, config: StoreConfig) -> PostgresEventStore {
    PostgresEventStore::connect(&ts.schema.url, config.schema(ts.schema.schema.clone()))
        .await
        .expect("second instance")
}

fn with_application_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_then_live_delivers_every_event_once_in_order() {
    let ts = test_store(StoreConfig::default()).await;
    let query = Query::from(QueryItem::new().types(["Deposited"]).tag("account", "a"));
    for i in 0..25 {
        ts.append(vec![event("Deposited", "account", "a")])
            .await
            .expect("append");
        if i % 5 == 0 {
            ts.append(vec![event("Other", "account", "a")])
                .await
                .expect("noise");
        }
    }
    // A long poll interval: live events must arrive through wake-ups, not polling.
    let options = SubscribeOptions::default()
        .batch_size(7)
        .poll_interval(Duration::from_secs(30));
    let mut stream = ts.store.subscribe_with(&query, None, options);
    let mut seen = take(&mut stream, 10, Duration::from_secs(5)).await;

    // Appends while the subscription is still catching up, and after it is live; some from
    // this instance (woken in process), some from another instance (woken by NOTIFY).
    let remote = other_instance(&ts, StoreConfig::default()).await;
    let writer = {
        let local = ts.store.clone();
        let remote = remote.clone();
        tokio::spawn(async move {
            for i in 0..30 {
                let store: &PostgresEventStore = if i % 2 == 0 { &local } else { &remote };
                let batch = if i % 7 == 0 {
                    vec![
                        event("Deposited", "account", "a"),
                        event("Deposited", "account", "a"),
                    ]
                } else {
                    vec![
                        event("Deposited", "account", "a"),
                        event("Other", "account", "b"),
                    ]
                };
                store.append(batch).await.expect("live append");
                if i % 3 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    // 25 stored + 30 live + 5 extra (every 7th batch carries two) = 60.
    seen.extend(take(&mut stream, 50, Duration::from_secs(5)).await);
    writer.await.expect("writer");
    let stored = ts
        .query(&query, ReadOptions::default())
        .await
        .expect("read all");
    assert_eq!(stored.len(), 60);
    assert_eq!(
        cursors(&seen),
        cursors(&stored),
        "in cursor order, none skipped or repeated"
    );
    // Nothing more is owed.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );

    // A remote append alone wakes the subscriber through LISTEN/NOTIFY (poll is 30 s).
    let cursor = remote
        .append(vec![event("Deposited", "account", "a")])
        .await
        .expect("remote");
    let woken = take(&mut stream, 1, Duration::from_secs(3)).await;
    assert_eq!(woken[0].cursor, cursor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resumes_after_a_cursor_without_repeating_it() {
    let ts = test_store(StoreConfig::default()).await;
    let query = Query::types(["Tick"]);
    let mut appended = Vec::new();
    for _ in 0..10 {
        appended.push(
            ts.append(vec![NewEvent::builder("Tick").build().expect("e")])
                .await
                .expect("a"),
        );
    }
    let mut stream = ts.store.subscribe(&query, Some(appended[4]));
    let rest = take(&mut stream, 5, Duration::from_secs(5)).await;
    assert_eq!(cursors(&rest), appended[5..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_can_be_turned_off_and_polling_still_delivers() {
    let ts = test_store(StoreConfig::default()).await;
    let quiet = other_instance(&ts, StoreConfig::default().notify_on_append(false)).await;
    let options = SubscribeOptions::default().poll_interval(Duration::from_millis(200));
    let mut stream = ts
        .store
        .subscribe_with(&Query::types(["Tick"]), None, options);
    let cursor = quiet
        .append(vec![NewEvent::builder("Tick").build().expect("e")])
        .await
        .expect("a");
    let got = take(&mut stream, 1, Duration::from_secs(3)).await;
    assert_eq!(got[0].cursor, cursor);
}

/// Waits until a backend (optionally of `application_name`) waits for an advisory lock.
async fn wait_for_lock_waiter(ts: &TestStore, objid: Option<i64>, application_name: Option<&str>) {
    let admin = ts.admin().await;
    for _ in 0..250 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND NOT l.granted \
                   AND ($1::int8 IS NULL OR l.objid::int8 = $1) \
                   AND ($2::text IS NULL OR a.application_name = $2)",
                &[&objid, &application_name],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nobody got stuck on an advisory lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_commits_reach_a_live_subscriber_in_cursor_order() {
    let ts = test_store(StoreConfig::default()).await;
    let brake = install_brake(&ts, 4243).await;
    let query = Query::from(QueryItem::new().tag("stream", "s"));
    let options = SubscribeOptions::default().poll_interval(Duration::from_millis(100));
    let mut stream = ts.store.subscribe_with(&query, None, options);
    let start = ts
        .append(vec![event("Start", "stream", "s")])
        .await
        .expect("start");
    assert_eq!(
        take(&mut stream, 1, Duration::from_secs(3)).await[0].cursor,
        start
    );

    // Writer A gets the LOWER transaction id and is held mid-insert.
    let slow = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "stream", "s")]).await })
    };
    wait_for_lock_waiter(&ts, Some(4243), None).await;
    // Writer B gets a higher id and commits first; it wakes the subscriber at once.
    let fast = ts
        .append(vec![event("Fast", "stream", "s")])
        .await
        .expect("fast");
    // Delivering B now would move the subscriber past A's lower cursor forever: it must wait.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "an event was delivered while a lower-cursor writer was in flight"
    );
    brake
        .batch_execute("SELECT pg_advisory_unlock(4243)")
        .await
        .expect("release");
    let slow = slow.await.expect("join").expect("slow commits");
    assert!(
        slow < fast,
        "A holds the lower cursor although it committed last"
    );
    let got = take(&mut stream, 2, Duration::from_secs(5)).await;
    assert_eq!(cursors(&got), vec![slow, fast]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_whose_connections_are_killed_resumes_without_gap_or_duplicate() {
    let ts = test_store(StoreConfig::default()).await;
    let app = format!("sub_{}", ts.schema.schema);
    // The subscriber's instance (pool and listener) is identifiable by application_name.
    let subscriber = PostgresEventStore::connect(
        &with_application_name(&ts.schema.url, &app),
        StoreConfig::default().schema(ts.schema.schema.clone()),
    )
    .await
    .expect("subscriber instance");
    let query = Query::from(QueryItem::new().tag("stream", "k"));
    let options = SubscribeOptions::default()
        .batch_size(3)
        .poll_interval(Duration::from_millis(100))
        .retry(Duration::from_millis(20), Duration::from_millis(200));
    let mut stream = subscriber.subscribe_with(&query, None, options);
    for _ in 0..5 {
        ts.append(vec![event("E", "stream", "k")])
            .await
            .expect("append");
    }
    let mut errors = 0usize;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_ok(&mut stream, Duration::from_secs(5), &mut errors).await);
    }

    // Hold a matching writer in flight, so the subscriber's next read is stuck in its fence...
    let brake = install_brake(&ts, 4243).await;
    let slow = {
        let store = ts.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "stream", "k")]).await })
    };
    wait_for_lock_waiter(&ts, Some(4243), None).await;
    // The subscriber only reads when polled: drive it in the background.
    let consumer = tokio::spawn(async move {
        let mut errors = 0usize;
        let mut got = Vec::new();
        for _ in 0..9 {
            got.push(next_ok(&mut stream, Duration::from_secs(8), &mut errors).await);
        }
        (got, errors)
    });
    wait_for_lock_waiter(&ts, None, Some(&app)).await;
    // ... and kill every backend of the subscriber's instance (reads and listener) mid-read.
    let admin = ts.admin().await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) k",
            &[&app],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(killed >= 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    brake
        .batch_execute("SELECT pg_advisory_unlock(4243)")
        .await
        .expect("release");
    slow.await.expect("join").expect("slow commits");
    for _ in 0..8 {
        ts.append(vec![event("E", "stream", "k")])
            .await
            .expect("append after kill");
    }
    let (got, errors_after) = consumer.await.expect("consumer");
    seen.extend(got);
    let stored = ts
        .query(&query, ReadOptions::default())
        .await
        .expect("read all");
    assert_eq!(stored.len(), 14);
    assert_eq!(
        cursors(&seen),
        cursors(&stored),
        "no gap, no duplicate across the kill"
    );
    assert!(
        errors + errors_after >= 1,
        "the killed read surfaced as an error item"
    );
}
