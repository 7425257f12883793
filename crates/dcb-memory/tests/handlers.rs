//! Failure policies of in-memory event handlers: a poison event among 1,000 stops the runner,
//! is parked (and replayed or dropped by an operator), or is retried forever (the default).
use async_trait::async_trait;
use dcb_core::{Cursor, Event, EventReader, EventStore, NewEvent, Query, ReadOptions};
use dcb_memory::{
    FailurePolicy, InMemoryEventStore, MemoryEventHandler, MemoryHandlerError,
    MemoryHandlerOptions, MemoryHandlerStatus, ParkedError, RunningMemoryHandler,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records the cursors it handles; fails every batch holding a poison event while `failing`.
#[derive(Clone)]
struct Poisoned {
    seen: Arc<Mutex<Vec<Cursor>>>,
    poison: Arc<HashSet<Cursor>>,
    failing: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
}

impl Poisoned {
    fn new(poison: impl IntoIterator<Item = Cursor>) -> Self {
        Self {
            seen: Arc::default(),
            poison: Arc::new(poison.into_iter().collect()),
            failing: Arc::new(AtomicBool::new(true)),
            calls: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Cursor> {
        self.seen.lock().expect("seen").clone()
    }
}

#[async_trait]
impl MemoryEventHandler for Poisoned {
    fn name(&self) -> &str {
        "poisoned"
    }

    fn query(&self) -> Query {
        Query::types(["X"])
    }

    async fn handle(&self, events: &[Event]) -> Result<(), MemoryHandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(bad) = events.iter().find(|e| self.poison.contains(&e.cursor)) {
            if self.failing.load(Ordering::SeqCst) {
                return Err(format!("cannot handle {}", bad.cursor).into());
            }
        }
        let mut seen = self.seen.lock().map_err(|_| "poisoned lock")?;
        seen.extend(events.iter().map(|e| e.cursor));
        Ok(())
    }
}

/// 1,000 matching events (with non-matching ones between), in 10 appends; their cursors.
async fn thousand(store: &InMemoryEventStore) -> Vec<Cursor> {
    for _ in 0..10 {
        let batch = (0..110)
            .map(|i| {
                let t = if i % 11 == 10 { "Y" } else { "X" };
                NewEvent::builder(t).tag("n", "1").build().expect("event")
            })
            .collect();
        store.append(batch).await.expect("append");
    }
    let all = store
        .query(&Query::types(["X"]), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(all.len(), 1_000);
    all.iter().map(|e| e.cursor).collect()
}

fn options(policy: FailurePolicy) -> MemoryHandlerOptions {
    MemoryHandlerOptions::default()
        .batch_size(50)
        .retry(Duration::from_millis(1), Duration::from_millis(4))
        .failure_policy(policy)
}

async fn wait_status(
    running: &RunningMemoryHandler,
    what: &str,
    predicate: impl Fn(&MemoryHandlerStatus) -> bool,
) -> MemoryHandlerStatus {
    let mut updates = running.status_updates();
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        updates.wait_for(|s| predicate(s)).await.map(|s| s.clone())
    })
    .await;
    match found {
        Ok(Ok(status)) => status,
        _ => panic!("status never became {what}: {:?}", running.status()),
    }
}

#[tokio::test]
async fn stop_stops_at_the_poison_event_and_handles_nothing_after_it() {
    let store = InMemoryEventStore::new();
    let cursors = thousand(&store).await;
    let poison = cursors[523];
    let handler = Poisoned::new([poison]);
    let running = store
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Stop { max_attempts: 3 }),
        )
        .expect("run");
    let status = wait_status(&running, "stopped", |s| s.stopped).await;
    assert_eq!(status.failing_at, Some(poison), "{status:?}");
    assert_eq!(status.attempts, 3);
    assert_eq!(
        status.last_error.as_deref(),
        Some(format!("cannot handle {poison}").as_str())
    );
    assert_eq!(
        status.checkpoint,
        Some(cursors[522]),
        "just before the poison"
    );
    assert_eq!(status.processed, 523);
    assert_eq!(handler.seen(), cursors[..523], "everything before it, once");
    assert!(store
        .parked_events("poisoned")
        .await
        .expect("list")
        .is_empty());
    running.stop().await;
}

#[tokio::test]
async fn park_parks_the_poison_event_and_handles_the_other_999_once() {
    let store = InMemoryEventStore::new();
    let cursors = thousand(&store).await;
    let poison = cursors[523];
    let handler = Poisoned::new([poison]);
    let running = store
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 3 }),
        )
        .expect("run");
    running
        .wait_until_processed(cursors[999], Duration::from_secs(5))
        .await
        .expect("carries on past the poison event");
    let expected: Vec<Cursor> = cursors.iter().copied().filter(|c| *c != poison).collect();
    assert_eq!(
        handler.seen(),
        expected,
        "the other 999 once each, in order"
    );
    let parked = store.parked_events("poisoned").await.expect("list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    let record = &parked[0];
    assert_eq!(
        (
            record.handler.as_str(),
            record.cursor,
            record.event_type.as_str()
        ),
        ("poisoned", poison, "X")
    );
    assert_eq!(record.error, format!("cannot handle {poison}"));
    assert_eq!(record.attempts, 3);
    let status = running.status();
    assert_eq!((status.processed, status.parked), (999, 1), "{status:?}");
    assert!(status.last_error.is_none() && status.failing_at.is_none() && !status.stopped);
    assert!(store.parked_events("other").await.expect("list").is_empty());
    running.stop().await;
}

#[tokio::test]
async fn by_default_a_failing_batch_is_retried_until_it_succeeds() {
    let store = InMemoryEventStore::new();
    let cursors = thousand(&store).await;
    let poison = cursors[523];
    let handler = Poisoned::new([poison]);
    let running = store
        .run_handler(
            handler.clone(),
            MemoryHandlerOptions::default()
                .batch_size(50)
                .retry(Duration::from_millis(1), Duration::from_millis(2)),
        )
        .expect("run");
    let status = wait_status(&running, "retried 30 times", |s| s.attempts >= 30).await;
    assert!(!status.stopped);
    assert_eq!(
        status.failing_at,
        Some(cursors[500]),
        "the batch's first event"
    );
    assert_eq!(status.checkpoint, Some(cursors[499]));
    assert_eq!(handler.seen(), cursors[..500], "whole batches only");
    assert!(store
        .parked_events("poisoned")
        .await
        .expect("list")
        .is_empty());
    handler.failing.store(false, Ordering::SeqCst);
    running
        .wait_until_processed(cursors[999], Duration::from_secs(5))
        .await
        .expect("recovers");
    assert_eq!(handler.seen(), cursors);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_is_replayed_at_most_once_and_can_be_dropped() {
    let store = InMemoryEventStore::new();
    let cursors = thousand(&store).await;
    let (first, second) = (cursors[10], cursors[700]);
    let handler = Poisoned::new([first, second]);
    let running = store
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 1 }),
        )
        .expect("run");
    running
        .wait_until_processed(cursors[999], Duration::from_secs(5))
        .await
        .expect("caught up");
    let parked = store.parked_events("poisoned").await.expect("list");
    assert_eq!(
        parked.iter().map(|p| p.cursor).collect::<Vec<_>>(),
        [first, second]
    );

    // A replay that fails again keeps the record, with one more attempt and the new error.
    let err = store.replay_parked(&handler, first).await.unwrap_err();
    assert!(
        matches!(err, ParkedError::HandlerFailed { attempts: 2, cursor, .. } if cursor == first),
        "{err}"
    );
    let record = store.parked_events("poisoned").await.expect("list")[0].clone();
    assert_eq!((record.cursor, record.attempts), (first, 2));
    assert!(record.last_attempt_at >= record.parked_at);
    assert!(!handler.seen().contains(&first));

    // Fixed: concurrent replays handle it once; the record goes with it.
    handler.failing.store(false, Ordering::SeqCst);
    let (a, b) = tokio::join!(
        store.replay_parked(&handler, first),
        store.replay_parked(&handler, first)
    );
    let outcomes = [a.is_ok(), b.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "{a:?} / {b:?}"
    );
    assert!(matches!(
        a.err().or(b.err()),
        Some(ParkedError::NotFound { .. })
    ));
    assert_eq!(handler.seen().iter().filter(|c| **c == first).count(), 1);
    assert!(matches!(
        store.replay_parked(&handler, first).await,
        Err(ParkedError::NotFound { .. })
    ));

    // Dropping removes without handling.
    let dropped = store
        .drop_parked("poisoned", second)
        .await
        .expect("dropped");
    assert_eq!(dropped.cursor, second);
    assert!(!handler.seen().contains(&second));
    assert!(store
        .parked_events("poisoned")
        .await
        .expect("list")
        .is_empty());
    assert!(matches!(
        store.drop_parked("poisoned", second).await,
        Err(ParkedError::NotFound { .. })
    ));
    running.stop().await;
}

#[tokio::test]
async fn a_zero_attempt_limit_is_rejected() {
    let store = InMemoryEventStore::new();
    let result = store.run_handler(
        Poisoned::new([]),
        options(FailurePolicy::Stop { max_attempts: 0 }),
    );
    assert!(matches!(
        result,
        Err(dcb_core::Error::Config {
            field: "failure_policy",
            ..
        })
    ));
}
