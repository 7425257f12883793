//! Subscriptions on the in-memory store and the generic subscription loop of dcb-core:
//! catch-up to live, in-process wake-ups, backpressure, retries after transient errors.
use async_trait::async_trait;
use dcb_core::{
    subscribe, ChangeFeed, Cursor, Error, Event, EventReader, EventStore, EventStream, NewCommand,
    NewEvent, Query, QueryItem, ReadOptions, SubscribeExt, SubscribeOptions,
};
use dcb_memory::InMemoryEventStore;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn event(t: &str, account: &str) -> NewEvent {
    NewEvent::builder(t)
        .tag("account", account)
        .build()
        .expect("event")
}

async fn take(stream: &mut EventStream, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(e))) => out.push(e),
            Ok(Some(Err(err))) => panic!("error item: {err}"),
            Ok(None) => panic!("stream ended"),
            Err(_) => panic!("no event within 5 s after {} of {n}", out.len()),
        }
    }
    out
}

fn cursors(events: &[Event]) -> Vec<Cursor> {
    events.iter().map(|e| e.cursor).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_then_live_in_order_once_woken_in_process() {
    let store = InMemoryEventStore::new();
    let query = Query::from(QueryItem::new().types(["Deposited"]).tag("account", "a"));
    for _ in 0..20 {
        store
            .append(vec![event("Deposited", "a"), event("Deposited", "b")])
            .await
            .expect("append");
    }
    // Poll interval far beyond the test: only in-process wake-ups can deliver live events.
    let options = SubscribeOptions::default()
        .batch_size(3)
        .poll_interval(Duration::from_secs(60));
    let mut stream = store.subscribe_with(&query, None, options);
    let mut seen = take(&mut stream, 5).await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                store
                    .append(vec![event("Deposited", "a")])
                    .await
                    .expect("append");
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    seen.extend(take(&mut stream, 55).await);
    writer.await.expect("writer");
    let all = store
        .query(&query, ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(cursors(&seen), cursors(&all));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), stream.next())
            .await
            .is_err()
    );
    // Command commits wake subscribers too.
    let mut session = store.command_session().await.expect("session");
    let command = NewCommand {
        command_type: "Deposit".into(),
        data: serde_json::json!({}),
        metadata: None,
        id: None,
    };
    let outcome = session
        .commit(&command, vec![event("Deposited", "a")], None)
        .await
        .expect("commit");
    let dcb_core::CommitOutcome::Committed(record) = outcome else {
        panic!("not committed")
    };
    assert_eq!(
        Some(take(&mut stream, 1).await[0].cursor),
        record.last_event
    );
}

#[tokio::test]
async fn works_on_a_shared_dyn_store() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut stream = subscribe(
        Arc::clone(&store),
        &Query::types(["X"]),
        None,
        SubscribeOptions::default(),
    );
    let cursor = store.append(vec![event("X", "a")]).await.expect("append");
    assert_eq!(take(&mut stream, 1).await[0].cursor, cursor);
}

/// Delegates to a store, counting events handed out and failing every `fail_every`-th read.
#[derive(Clone)]
struct Instrumented {
    inner: InMemoryEventStore,
    fetched: Arc<AtomicUsize>,
    reads: Arc<AtomicUsize>,
    fail_every: usize,
    fatal: bool,
}

#[async_trait]
impl EventReader for Instrumented {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if n.checked_rem(self.fail_every) == Some(0) {
            if self.fatal {
                return Err(Error::Schema {
                    message: "gone".into(),
                });
            }
            return Err(Error::Storage {
                operation: "query",
                message: "connection reset".into(),
                outcome_unknown: false,
                source: None,
            });
        }
        let events = self.inner.query(query, options).await?;
        self.fetched.fetch_add(events.len(), Ordering::SeqCst);
        Ok(events)
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        self.inner.query_stream(query, options)
    }

    fn change_feed(&self) -> Option<ChangeFeed> {
        self.inner.change_feed()
    }
}

fn instrumented(store: &InMemoryEventStore, fail_every: usize, fatal: bool) -> Instrumented {
    Instrumented {
        inner: store.clone(),
        fetched: Arc::default(),
        reads: Arc::default(),
        fail_every,
        fatal,
    }
}

#[tokio::test]
async fn a_slow_consumer_holds_at_most_one_batch() {
    let store = InMemoryEventStore::new();
    let events: Vec<NewEvent> = (0..1000).map(|_| event("X", "a")).collect();
    store.append(events).await.expect("append");
    let reader = instrumented(&store, 0, false);
    let options = SubscribeOptions::default().batch_size(10);
    let mut stream = reader.subscribe_with(&Query::types(["X"]), None, options);
    let got = take(&mut stream, 25).await;
    assert_eq!(got.len(), 25);
    tokio::time::sleep(Duration::from_millis(50)).await; // nothing reads while nobody polls
    let fetched = reader.fetched.load(Ordering::SeqCst);
    assert!(
        fetched <= 30,
        "fetched {fetched} events for 25 consumed with batches of 10"
    );
}

#[tokio::test]
async fn transient_errors_are_items_and_the_stream_resumes_without_gap_or_duplicate() {
    let store = InMemoryEventStore::new();
    for _ in 0..50 {
        store.append(vec![event("X", "a")]).await.expect("append");
    }
    let reader = instrumented(&store, 3, false);
    let options = SubscribeOptions::default()
        .batch_size(4)
        .retry(Duration::from_millis(1), Duration::from_millis(5));
    let mut stream = reader.subscribe_with(&Query::types(["X"]), None, options);
    let mut seen = Vec::new();
    let mut errors = 0;
    while seen.len() < 50 {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(e))) => seen.push(e),
            Ok(Some(Err(err))) => {
                assert!(!dcb_core::is_fatal_for_subscription(&err));
                errors += 1;
            }
            other => panic!(
                "unexpected: {:?}",
                other.map(|o| o.map(|r| r.map(|e| e.cursor)))
            ),
        }
    }
    assert!(errors >= 5, "{errors} error items");
    let all = store
        .query(&Query::types(["X"]), ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(cursors(&seen), cursors(&all));
}

#[tokio::test]
async fn a_fatal_error_ends_the_stream() {
    let store = InMemoryEventStore::new();
    store.append(vec![event("X", "a")]).await.expect("append");
    let reader = instrumented(&store, 2, true);
    let options = SubscribeOptions::default().poll_interval(Duration::from_millis(10));
    let mut stream = reader.subscribe_with(&Query::types(["X"]), None, options);
    assert!(stream.next().await.expect("event").is_ok());
    let err = stream.next().await.expect("error item").unwrap_err();
    assert!(matches!(err, Error::Schema { .. }));
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn invalid_subscriptions_fail_at_once() {
    let store = InMemoryEventStore::new();
    let mut stream = store.subscribe(&Query { items: vec![] }, None);
    assert!(stream.next().await.expect("item").is_err());
    assert!(stream.next().await.is_none());
    let options = SubscribeOptions::default().poll_interval(Duration::ZERO);
    let mut stream = store.subscribe_with(&Query::all(), None, options);
    assert!(matches!(
        stream.next().await,
        Some(Err(Error::Config { .. }))
    ));
}

/// Counts events per account; fails `failures` times first.
struct Tally {
    seen: Arc<std::sync::Mutex<Vec<Cursor>>>,
    failures: Arc<AtomicUsize>,
}

#[async_trait]
impl dcb_memory::MemoryEventHandler for Tally {
    fn name(&self) -> &str {
        "tally"
    }

    fn query(&self) -> Query {
        Query::types(["X"])
    }

    async fn handle(&self, events: &[Event]) -> Result<(), dcb_memory::MemoryHandlerError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("not yet".into());
        }
        let mut seen = self.seen.lock().map_err(|_| "poisoned")?;
        seen.extend(events.iter().map(|e| e.cursor));
        Ok(())
    }
}

#[tokio::test]
async fn memory_handlers_retry_failed_batches_and_wait_until_processed() {
    let store = InMemoryEventStore::new();
    for _ in 0..10 {
        store
            .append(vec![event("X", "a"), event("Y", "a")])
            .await
            .expect("append");
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = Tally {
        seen: Arc::clone(&seen),
        failures: Arc::new(AtomicUsize::new(2)),
    };
    let options = dcb_memory::MemoryHandlerOptions::default()
        .batch_size(4)
        .retry(Duration::from_millis(1), Duration::from_millis(5));
    let running = store.run_handler(handler, options).expect("run");
    let mut last = None;
    for _ in 0..10 {
        last = Some(store.append(vec![event("X", "a")]).await.expect("append"));
    }
    let last = last.expect("appended");
    running
        .wait_until_processed(last, Duration::from_secs(5))
        .await
        .expect("processed");
    // A non-matching event is passed too.
    let other = store.append(vec![event("Y", "b")]).await.expect("append");
    running
        .wait_until_processed(other, Duration::from_secs(5))
        .await
        .expect("passes non-matching events");
    let all = store
        .query(&Query::types(["X"]), ReadOptions::default())
        .await
        .expect("query");
    assert_eq!(
        *seen.lock().expect("seen"),
        cursors(&all),
        "each event once, in order"
    );
    let status = running.status();
    assert_eq!((status.processed, status.attempts), (20, 0));
    assert!(status.last_error.is_none());
    running.stop().await;
}

/// Never returns from its first `hangs` batches.
struct Hang {
    hangs: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Cursor>>>,
}

#[async_trait]
impl dcb_memory::MemoryEventHandler for Hang {
    fn name(&self) -> &str {
        "hang"
    }

    fn query(&self) -> Query {
        Query::types(["X"])
    }

    async fn handle(&self, events: &[Event]) -> Result<(), dcb_memory::MemoryHandlerError> {
        if self
            .hangs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            std::future::pending::<()>().await;
        }
        let mut seen = self.seen.lock().map_err(|_| "poisoned")?;
        seen.extend(events.iter().map(|e| e.cursor));
        Ok(())
    }
}

#[tokio::test]
async fn memory_handlers_abandon_a_batch_past_its_timeout_and_retry_it() {
    let store = InMemoryEventStore::new();
    let last = store
        .append(vec![event("X", "a"), event("X", "b")])
        .await
        .expect("append");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = Hang {
        hangs: Arc::new(AtomicUsize::new(1)),
        seen: Arc::clone(&seen),
    };
    let options = dcb_memory::MemoryHandlerOptions::default()
        .retry(Duration::from_millis(1), Duration::from_millis(5))
        .batch_timeout(Some(Duration::from_millis(50)));
    let running = store.run_handler(handler, options).expect("run");
    running
        .wait_until_processed(last, Duration::from_secs(5))
        .await
        .expect("the retry after the abandoned attempt commits");
    assert_eq!(seen.lock().expect("seen").len(), 2, "each event once");
    running.stop().await;
    let bad = dcb_memory::MemoryHandlerOptions::default().batch_timeout(Some(Duration::ZERO));
    let hang = Hang {
        hangs: Arc::default(),
        seen: Arc::default(),
    };
    assert!(matches!(
        store.run_handler(hang, bad),
        Err(Error::Config {
            field: "batch_timeout",
            ..
        })
    ));
}
