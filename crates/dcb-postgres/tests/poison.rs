//! Failure policies of durable handlers on PostgreSQL: a poison event among 1,000 stops the
//! runner, is parked (checkpointed past in the same transaction, also under faults and a killed
//! backend), or is retried forever (the default); parked events are replayed exactly once with
//! their removal, or dropped.
mod support;

use async_trait::async_trait;
use dcb_core::{Cursor, Event, EventReader, EventStore, NewEvent, Query, ReadOptions};
use dcb_postgres::{
    EventHandler, FailurePolicy, HandlerError, HandlerOptions, HandlerStatus, ParkedError,
    RunningHandler, StoreConfig,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{test_store, TestStore};

const NAME: &str = "poisoned";

/// Writes one `seen` row per event in the handler's transaction; fails (after writing, so the
/// rollback matters) every batch holding a poison event while `failing`. `hang_on` makes it
/// hang on the server instead, inside its transaction, on that event.
#[derive(Clone)]
struct Poisoned {
    seen_table: String,
    poison: Arc<HashSet<Cursor>>,
    failing: Arc<AtomicBool>,
    panic_instead: bool,
    hang_on: Option<Cursor>,
    calls: Arc<AtomicU32>,
}

impl Poisoned {
    fn new(ts: &TestStore, poison: impl IntoIterator<Item = Cursor>) -> Self {
        Self {
            seen_table: ts.table("seen"),
            poison: Arc::new(poison.into_iter().collect()),
            failing: Arc::new(AtomicBool::new(true)),
            panic_instead: false,
            hang_on: None,
            calls: Arc::default(),
        }
    }
}

#[async_trait]
impl EventHandler for Poisoned {
    fn name(&self) -> &str {
        NAME
    }

    fn query(&self) -> Query {
        Query::types(["Deposited"])
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let insert = format!("INSERT INTO {} (position) VALUES ($1)", self.seen_table);
        for event in events {
            tx.execute(&insert, &[&event.cursor.position]).await?;
        }
        if events.iter().any(|e| Some(e.cursor) == self.hang_on) {
            tx.batch_execute(&hang_sql(&self.seen_table)).await?;
        }
        if let Some(bad) = events.iter().find(|e| self.poison.contains(&e.cursor)) {
            if self.failing.load(Ordering::SeqCst) {
                if self.panic_instead {
                    panic!("panicked on {}", bad.cursor);
                }
                return Err(format!("cannot handle {}", bad.cursor).into());
            }
        }
        Ok(())
    }
}

fn hang_sql(seen_table: &str) -> String {
    format!("SELECT pg_sleep(60) -- hang {seen_table}")
}

/// Small batches and delays, and the default failure policy.
fn fast() -> HandlerOptions {
    HandlerOptions::default()
        .batch_size(50)
        .poll_interval(Duration::from_millis(100))
        .lease_retry_interval(Duration::from_millis(50))
        .retry_initial(Duration::from_millis(5))
        .retry_max(Duration::from_millis(20))
}

fn options(policy: FailurePolicy) -> HandlerOptions {
    fast().failure_policy(policy)
}

async fn create_seen(ts: &TestStore) {
    ts.admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {} (position bigint NOT NULL)",
            ts.table("seen")
        ))
        .await
        .expect("create seen");
}

/// The positions in the read model, in order (duplicates kept).
async fn seen(ts: &TestStore) -> Vec<i64> {
    ts.admin()
        .await
        .query(
            &format!(
                "SELECT position FROM {} ORDER BY position",
                ts.table("seen")
            ),
            &[],
        )
        .await
        .expect("read seen")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn positions(cursors: &[Cursor]) -> Vec<i64> {
    cursors.iter().map(|c| c.position).collect()
}

/// Appends `n` matching events in appends of up to 100, with a non-matching one after each
/// append; returns the matching events' cursors.
async fn deposits(ts: &TestStore, n: usize) -> Vec<Cursor> {
    let event = |t: &str| {
        NewEvent::builder(t)
            .tag("account", "a")
            .data(&serde_json::json!({ "amount": 1 }))
            .build()
            .expect("event")
    };
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        let mut batch: Vec<NewEvent> = (0..k).map(|_| event("Deposited")).collect();
        batch.push(event("Audited"));
        ts.append(batch).await.expect("append");
        left -= k;
    }
    let all = ts
        .query(&Query::types(["Deposited"]), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(all.len(), n);
    all.iter().map(|e| e.cursor).collect()
}

async fn wait_status(
    running: &RunningHandler,
    what: &str,
    predicate: impl Fn(&HandlerStatus) -> bool,
) -> HandlerStatus {
    let mut updates = running.status_updates();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        updates.wait_for(|s| predicate(s)).await.map(|s| s.clone())
    })
    .await;
    match found {
        Ok(Ok(status)) => status,
        _ => panic!("status never became {what}: {:?}", running.status()),
    }
}

/// In one snapshot: whether `poison` is parked, and the stored checkpoint.
async fn parked_and_checkpoint(
    admin: &tokio_postgres::Client,
    ts: &TestStore,
    poison: Cursor,
) -> (bool, Option<i64>) {
    let row = admin
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE handler_name = $1 AND position = $2), \
                        (SELECT position FROM {} WHERE handler_name = $1)",
                ts.table("parked_events"),
                ts.table("handler_checkpoints")
            ),
            &[&NAME, &poison.position],
        )
        .await
        .expect("sample");
    (row.get(0), row.get(1))
}

/// Samples the store until `done` (at most 20 s), checking on every sample that the poison
/// event is parked exactly when the checkpoint is at or past it. Returns the samples' count.
async fn check_parking_is_atomic(
    ts: &TestStore,
    poison: Cursor,
    mut done: impl FnMut((bool, Option<i64>)) -> bool,
) -> usize {
    let admin = ts.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut samples = 0;
    loop {
        let sample = parked_and_checkpoint(&admin, ts, poison).await;
        samples += 1;
        let (parked, checkpoint) = sample;
        let past = checkpoint.is_some_and(|p| p >= poison.position);
        assert_eq!(parked, past, "parked row iff checkpoint moved: {sample:?}");
        if done(sample) {
            return samples;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never done: {sample:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_stops_at_the_poison_event_and_handles_nothing_after_it() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 1_000).await;
    let poison = cursors[523];
    let handler = Poisoned::new(&ts, [poison]);
    let running = ts
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
    assert_eq!((status.processed, status.holds_lease), (523, false));
    assert_eq!(
        seen(&ts).await,
        positions(&cursors[..523]),
        "everything before it, once"
    );
    // The database tells the same to any instance.
    let record = ts
        .handler_status(NAME)
        .await
        .expect("status")
        .expect("exists");
    assert_eq!(record.failing_at, Some(poison), "{record:?}");
    assert_eq!(record.checkpoint, Some(cursors[522]));
    assert_eq!(record.attempts, 3);
    assert!(record
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("cannot handle")));
    assert!(!record.lease_held, "a stopped runner releases its lease");
    assert!(ts.parked_events(NAME).await.expect("list").is_empty());
    running.stop().await;
    assert_eq!(seen(&ts).await.len(), 523, "nothing after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn park_parks_the_poison_event_and_handles_the_other_999_once() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 1_000).await;
    let poison = cursors[523];
    let handler = Poisoned::new(&ts, [poison]);
    let running = ts
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 3 }),
        )
        .expect("run");
    ts.wait_until_processed(NAME, cursors[999], Duration::from_secs(20))
        .await
        .expect("carries on past the poison event");
    let expected: Vec<Cursor> = cursors.iter().copied().filter(|c| *c != poison).collect();
    assert_eq!(
        seen(&ts).await,
        positions(&expected),
        "the other 999 once each"
    );
    let parked = ts.parked_events(NAME).await.expect("list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    let record = &parked[0];
    assert_eq!(
        (
            record.handler.as_str(),
            record.cursor,
            record.event_type.as_str()
        ),
        (NAME, poison, "Deposited")
    );
    assert_eq!(record.error, format!("cannot handle {poison}"));
    assert_eq!(record.attempts, 3);
    assert!(record.parked_at <= std::time::SystemTime::now());
    let status = running.status();
    assert_eq!((status.processed, status.parked), (999, 1), "{status:?}");
    assert!(status.failing_at.is_none() && status.last_error.is_none() && !status.stopped);
    let stored = ts
        .handler_status(NAME)
        .await
        .expect("status")
        .expect("exists");
    assert!(
        stored.attempts == 0 && stored.failing_at.is_none() && stored.last_error.is_none(),
        "{stored:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_a_failing_batch_is_retried_until_it_succeeds() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 1_000).await;
    let poison = cursors[523];
    let handler = Poisoned::new(&ts, [poison]);
    let running = ts
        .run_handler(handler.clone(), fast().retry_max(Duration::from_millis(10)))
        .expect("run");
    let status = wait_status(&running, "retried 15 times", |s| s.attempts >= 15).await;
    assert!(!status.stopped && status.holds_lease);
    assert_eq!(
        status.failing_at,
        Some(cursors[500]),
        "the whole batch is retried"
    );
    assert_eq!(status.checkpoint, Some(cursors[499]));
    assert_eq!(seen(&ts).await, positions(&cursors[..500]));
    let record = ts
        .handler_status(NAME)
        .await
        .expect("status")
        .expect("exists");
    assert_eq!(record.failing_at, Some(cursors[500]), "{record:?}");
    assert!(ts.parked_events(NAME).await.expect("list").is_empty());
    handler.failing.store(false, Ordering::SeqCst);
    ts.wait_until_processed(NAME, cursors[999], Duration::from_secs(20))
        .await
        .expect("recovers");
    assert_eq!(seen(&ts).await, positions(&cursors));
    running.stop().await;
}

/// A fault that makes one statement of the parking transaction fail.
async fn crash_while_parking(fault: &str) {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 30).await;
    let poison = cursors[12];
    let admin = ts.admin().await;
    let (table, when) = match fault {
        "insert" => (ts.table("parked_events"), "true".to_string()),
        _ => (
            ts.table("handler_checkpoints"),
            format!("NEW.position = {}", poison.position),
        ),
    };
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'injected fault'; END $$; \
             CREATE TRIGGER fault BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW \
             WHEN ({when}) EXECUTE FUNCTION {f}();",
            f = ts.table("fault"),
        ))
        .await
        .expect("install fault");
    let handler = Poisoned::new(&ts, [poison]);
    let running = ts
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 2 }),
        )
        .expect("run");
    // Parking fails again and again (each time the runner gives its lease up and starts over).
    let mut faults = HashSet::new();
    let mut updates = running.status_updates();
    check_parking_is_atomic(&ts, poison, |_| {
        let status = updates.borrow_and_update().clone();
        if status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("could not park") && e.contains("injected fault"))
        {
            faults.insert(status.last_error_at);
        }
        faults.len() >= 2
    })
    .await;
    let (parked, checkpoint) = parked_and_checkpoint(&admin, &ts, poison).await;
    assert!(!parked && checkpoint < Some(poison.position));
    assert_eq!(
        seen(&ts).await,
        positions(&cursors[..12]),
        "nothing past the poison"
    );
    // The fault goes away: the event is parked and the checkpoint moves past it, together.
    admin
        .batch_execute(&format!("DROP TRIGGER fault ON {table}"))
        .await
        .expect("drop fault");
    check_parking_is_atomic(&ts, poison, |(parked, _)| parked).await;
    ts.wait_until_processed(NAME, cursors[29], Duration::from_secs(20))
        .await
        .expect("carries on");
    let expected: Vec<Cursor> = cursors.iter().copied().filter(|c| *c != poison).collect();
    assert_eq!(seen(&ts).await, positions(&expected));
    assert_eq!(ts.parked_events(NAME).await.expect("list").len(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_parked_insert_leaves_the_checkpoint_where_it_was() {
    crash_while_parking("insert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_checkpoint_update_takes_the_parked_row_back() {
    crash_while_parking("checkpoint").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_killed_while_parking_parks_nothing_and_the_next_attempt_parks() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 30).await;
    let poison = cursors[12];
    // Hold the parked table, so the runner's parking transaction waits inside its INSERT.
    let mut blocker = ts.admin().await;
    let block = blocker.transaction().await.expect("begin");
    block
        .batch_execute(&format!(
            "LOCK TABLE {} IN EXCLUSIVE MODE",
            ts.table("parked_events")
        ))
        .await
        .expect("lock parked_events");
    let running = ts
        .run_handler(
            Poisoned::new(&ts, [poison]),
            options(FailurePolicy::Park { max_attempts: 2 }),
        )
        .expect("run");
    let admin = ts.admin().await;
    let mut pid = None;
    for _ in 0..1_000 {
        pid = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%' || $1 || '%parked_events%'",
                &[&ts.schema.schema],
            )
            .await
            .expect("activity")
            .map(|row| row.get::<_, i32>(0));
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = pid.expect("the parking transaction waits on the table");
    let (parked, checkpoint) = parked_and_checkpoint(&admin, &ts, poison).await;
    assert!(!parked && checkpoint == Some(cursors[11].position));
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed);
    // The dead transaction parked nothing and moved nothing.
    let (parked, checkpoint) = parked_and_checkpoint(&admin, &ts, poison).await;
    assert!(!parked && checkpoint == Some(cursors[11].position));
    block.commit().await.expect("release the table");
    check_parking_is_atomic(&ts, poison, |(parked, _)| parked).await;
    ts.wait_until_processed(NAME, cursors[29], Duration::from_secs(20))
        .await
        .expect("carries on after taking the lease again");
    let expected: Vec<Cursor> = cursors.iter().copied().filter(|c| *c != poison).collect();
    assert_eq!(seen(&ts).await, positions(&expected));
    let parked = ts.parked_events(NAME).await.expect("list");
    assert_eq!(parked.len(), 1, "{parked:?}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parked_event_is_replayed_exactly_once_with_its_removal() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 40).await;
    let (first, second) = (cursors[5], cursors[30]);
    let handler = Poisoned::new(&ts, [first, second]);
    let running = ts
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 1 }),
        )
        .expect("run");
    ts.wait_until_processed(NAME, cursors[39], Duration::from_secs(20))
        .await
        .expect("caught up");
    let parked = ts.parked_events(NAME).await.expect("list");
    assert_eq!(
        parked.iter().map(|p| p.cursor).collect::<Vec<_>>(),
        [first, second]
    );
    let count =
        |positions: Vec<i64>, p: Cursor| positions.iter().filter(|x| **x == p.position).count();

    // A replay that fails again rolls back the handler's write and keeps the row, with one
    // more attempt and the new error.
    let err = ts.replay_parked(&handler, first).await.unwrap_err();
    assert!(
        matches!(err, ParkedError::HandlerFailed { attempts: 2, cursor, .. } if cursor == first),
        "{err}"
    );
    let mut panicking = handler.clone();
    panicking.panic_instead = true;
    let err = ts.replay_parked(&panicking, first).await.unwrap_err();
    assert!(
        matches!(&err, ParkedError::HandlerFailed { attempts: 3, message, .. } if message.contains("panicked")),
        "{err}"
    );
    let record = ts.parked_events(NAME).await.expect("list")[0].clone();
    assert_eq!((record.cursor, record.attempts), (first, 3));
    assert!(record.error.contains("panicked") && record.last_attempt_at >= record.parked_at);
    assert_eq!(count(seen(&ts).await, first), 0);

    // A replay whose backend dies after the handler wrote commits nothing and keeps the row.
    let mut hanging = handler.clone();
    hanging.failing = Arc::new(AtomicBool::new(false));
    hanging.hang_on = Some(first);
    let store = ts.store.clone();
    let replay = tokio::spawn(async move { store.replay_parked(&hanging, first).await });
    let admin = ts.admin().await;
    let mut killed = false;
    for _ in 0..1_000 {
        killed = admin
            .query_one(
                "SELECT coalesce(bool_or(pg_terminate_backend(pid)), false) FROM pg_stat_activity \
                 WHERE query = $1 AND state = 'active'",
                &[&hang_sql(&ts.table("seen"))],
            )
            .await
            .expect("terminate")
            .get(0);
        if killed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed, "the replay hung inside its transaction");
    let err = replay.await.expect("join").unwrap_err();
    assert!(matches!(err, ParkedError::Store(_)), "{err}");
    assert_eq!(ts.parked_events(NAME).await.expect("list").len(), 2);
    assert_eq!(count(seen(&ts).await, first), 0);

    // Fixed: of two concurrent replays one handles it and deletes the row, the other finds
    // nothing.
    handler.failing.store(false, Ordering::SeqCst);
    let (a, b) = tokio::join!(
        ts.replay_parked(&handler, first),
        ts.replay_parked(&handler, first)
    );
    assert_eq!(
        [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{a:?} / {b:?}"
    );
    assert!(matches!(
        a.err().or(b.err()),
        Some(ParkedError::NotFound { .. })
    ));
    assert_eq!(count(seen(&ts).await, first), 1, "handled exactly once");
    assert!(matches!(
        ts.replay_parked(&handler, first).await,
        Err(ParkedError::NotFound { .. })
    ));

    // Dropping deletes without handling.
    let dropped = ts.drop_parked(NAME, second).await.expect("dropped");
    assert_eq!((dropped.cursor, dropped.attempts), (second, 1));
    assert!(ts.parked_events(NAME).await.expect("list").is_empty());
    assert!(matches!(
        ts.drop_parked(NAME, second).await,
        Err(ParkedError::NotFound { .. })
    ));
    assert_eq!(count(seen(&ts).await, second), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_drops_the_parked_events_it_rewinds_past() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let cursors = deposits(&ts, 40).await;
    let (first, second) = (cursors[5], cursors[30]);
    let handler = Poisoned::new(&ts, [first, second]);
    let running = ts
        .run_handler(
            handler.clone(),
            options(FailurePolicy::Park { max_attempts: 1 }),
        )
        .expect("run");
    ts.wait_until_processed(NAME, cursors[39], Duration::from_secs(20))
        .await
        .expect("caught up");
    running.stop().await;
    assert_eq!(ts.parked_events(NAME).await.expect("list").len(), 2);
    ts.reset_handler(NAME, Some(cursors[20]))
        .await
        .expect("reset");
    let left = ts.parked_events(NAME).await.expect("list");
    assert_eq!(
        left.iter().map(|p| p.cursor).collect::<Vec<_>>(),
        [first],
        "the one after the new checkpoint will be met again"
    );
    ts.reset_handler(NAME, None).await.expect("reset");
    assert!(ts.parked_events(NAME).await.expect("list").is_empty());
    assert!(ts
        .run_handler(handler, options(FailurePolicy::Park { max_attempts: 0 }))
        .is_err());
}
