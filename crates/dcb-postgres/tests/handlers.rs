//! Durable event handlers on PostgreSQL: exactly-once read models, replay after a failure
//! between handling and checkpointing, one processing instance at a time with takeover, and
//! `wait_until_processed`.
mod support;

use async_trait::async_trait;
use dcb_core::{Cursor, Error, Event, EventReader, EventStore, NewEvent, Query};
use dcb_postgres::{
    EventHandler, HandlerError, HandlerOptions, HandlerStatus, PostgresEventStore, RunningHandler,
    StoreConfig,
};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{test_store, TestStore};

fn deposit(account: &str) -> NewEvent {
    NewEvent::builder("Deposited")
        .tag("account", account)
        .data(&serde_json::json!({ "amount": 1 }))
        .build()
        .expect("event")
}

fn options() -> HandlerOptions {
    HandlerOptions::default()
        .batch_size(7)
        .lease_retry_interval(Duration::from_millis(100))
        .retry_initial(Duration::from_millis(20))
        .retry_max(Duration::from_millis(200))
}

/// Records every event it sees in `<schema>.seen`, tagged with the instance that processed it,
/// and checks that no two instances ever process at the same time.
struct Recorder {
    name: String,
    instance: &'static str,
    seen_table: String,
    busy: Arc<AtomicBool>,
    overlaps: Arc<AtomicU32>,
    /// Fail (after writing!) this many times when the batch contains position `fail_at`.
    fail_at: Option<i64>,
    failures_left: Arc<AtomicU32>,
    panic_instead: bool,
}

impl Recorder {
    fn new(
        ts: &TestStore,
        instance: &'static str,
        busy: Arc<AtomicBool>,
        overlaps: Arc<AtomicU32>,
    ) -> Self {
        Self {
            name: "recorder".into(),
            instance,
            seen_table: ts.table("seen"),
            busy,
            overlaps,
            fail_at: None,
            failures_left: Arc::new(AtomicU32::new(0)),
            panic_instead: false,
        }
    }
}

#[async_trait]
impl EventHandler for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn query(&self) -> Query {
        Query::types(["Deposited"])
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        let result = async {
            record_seen(tx, &self.seen_table, events, self.instance).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let hit = self
                .fail_at
                .is_some_and(|p| events.iter().any(|e| e.cursor.position == p));
            if hit
                && self
                    .failures_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                if self.panic_instead && self.failures_left.load(Ordering::SeqCst) == 0 {
                    self.busy.store(false, Ordering::SeqCst);
                    panic!("crash after writing");
                }
                return Err::<(), HandlerError>("failure after writing".into());
            }
            Ok(())
        }
        .await;
        self.busy.store(false, Ordering::SeqCst);
        result
    }
}

/// Writes one row of `seen_table` per event, in the handler's transaction.
async fn record_seen(
    tx: &tokio_postgres::Transaction<'_>,
    seen_table: &str,
    events: &[Event],
    instance: &str,
) -> Result<(), tokio_postgres::Error> {
    let insert = format!("INSERT INTO {seen_table} (position, instance) VALUES ($1, $2)");
    for event in events {
        tx.execute(&insert, &[&event.cursor.position, &instance])
            .await?;
    }
    Ok(())
}

async fn create_seen(ts: &TestStore) {
    ts.admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {} (position bigint NOT NULL, instance text NOT NULL)",
            ts.table("seen")
        ))
        .await
        .expect("create seen");
}

/// (rows, distinct positions) of the read model.
async fn seen_counts(ts: &TestStore, instance: Option<&str>) -> (i64, i64) {
    let row = ts
        .admin()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT position) FROM {} WHERE $1::text IS NULL OR instance = $1",
                ts.table("seen")
            ),
            &[&instance],
        )
        .await
        .expect("count seen");
    (row.get(0), row.get(1))
}

async fn append_deposits(store: &PostgresEventStore, n: usize) -> Cursor {
    let mut last = None;
    for i in 0..n {
        let batch = if i % 4 == 0 {
            vec![deposit("a"), deposit("b")]
        } else {
            vec![deposit("a")]
        };
        last = Some(store.append(batch).await.expect("append"));
    }
    last.expect("at least one append")
}

async fn wait_status(
    running: &RunningHandler,
    what: &str,
    predicate: impl Fn(&HandlerStatus) -> bool,
) -> HandlerStatus {
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

fn with_application_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_model_is_built_exactly_once_and_wait_until_processed_reads_own_writes() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let busy = Arc::default();
    let overlaps = Arc::default();
    append_deposits(&ts, 20).await; // 25 events before the handler starts
    let running = ts
        .run_handler(Recorder::new(&ts, "one", busy, overlaps), options())
        .expect("run");
    let last = append_deposits(&ts, 20).await; // 25 more while it runs
    ts.wait_until_processed("recorder", last, Duration::from_secs(5))
        .await
        .expect("caught up");
    assert_eq!(seen_counts(&ts, None).await, (50, 50));
    let status = running.status();
    assert!(
        status.holds_lease && status.checkpoint >= Some(last) && status.processed == 50,
        "{status:?}"
    );

    // An event the handler does not care about is "processed" too (the checkpoint moves past it).
    let other = ts
        .append(vec![NewEvent::builder("Unrelated").build().expect("e")])
        .await
        .expect("append");
    ts.wait_until_processed("recorder", other, Duration::from_secs(5))
        .await
        .expect("checkpoint passes non-matching events");
    // A cursor that will not be reached soon times out cleanly.
    let far = Cursor::new(other.transaction_id + 1_000_000, 0);
    let err = ts
        .wait_until_processed("recorder", far, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    let record = ts
        .handler_status("recorder")
        .await
        .expect("status")
        .expect("exists");
    assert!(
        record.lease_held && record.attempts == 0 && record.last_error.is_none(),
        "{record:?}"
    );
    assert!(record.checkpoint >= Some(other));
    running.stop().await;
    let record = ts
        .handler_status("recorder")
        .await
        .expect("status")
        .expect("exists");
    assert!(!record.lease_held, "stopping releases the lease");
    assert_eq!(seen_counts(&ts, None).await, (50, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_between_handling_and_checkpointing_replays_the_batch_but_never_skips() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    append_deposits(&ts, 8).await; // 10 events
    let target = ts
        .query(
            &Query::types(["Deposited"]),
            dcb_core::ReadOptions::default(),
        )
        .await
        .expect("read")[5]
        .cursor;
    let mut handler = Recorder::new(&ts, "one", Arc::default(), Arc::default());
    handler.fail_at = Some(target.position);
    // Three failures after writing: two errors, then a panic.
    handler.failures_left = Arc::new(AtomicU32::new(3));
    handler.panic_instead = true;
    let failures_left = Arc::clone(&handler.failures_left);
    let running = ts
        .run_handler(
            handler,
            options()
                .retry_initial(Duration::from_millis(150))
                .retry_max(Duration::from_millis(300)),
        )
        .expect("run");

    // While it fails, the failure is visible locally and from the database.
    let stuck = wait_status(&running, "failing", |s| s.attempts >= 1).await;
    assert!(
        stuck
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("failure after writing"),
        "{stuck:?}"
    );
    assert!(stuck.holds_lease);
    let record = ts
        .handler_status("recorder")
        .await
        .expect("status")
        .expect("exists");
    assert!(record.attempts >= 1 && record.lease_held, "{record:?}");
    assert!(record.last_error.is_some());
    assert!(
        record.checkpoint < Some(target),
        "the failed batch is not checkpointed"
    );

    let last = append_deposits(&ts, 4).await;
    ts.wait_until_processed("recorder", last, Duration::from_secs(8))
        .await
        .expect("recovers");
    assert_eq!(
        failures_left.load(Ordering::SeqCst),
        0,
        "it failed three times, the last by panicking"
    );
    // The writes of the failed attempts were rolled back with them: every event exactly once.
    assert_eq!(seen_counts(&ts, None).await, (15, 15));
    let status = running.status();
    assert_eq!(status.attempts, 0);
    assert!(status.last_error.is_none());
    let record = ts
        .handler_status("recorder")
        .await
        .expect("status")
        .expect("exists");
    assert!(
        record.attempts == 0 && record.last_error.is_none(),
        "{record:?}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_processes_at_a_time_and_another_takes_over_when_it_dies() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let app_b = format!("b_{}", ts.schema.schema);
    let instance = |url: String| {
        let config = StoreConfig::default().schema(ts.schema.schema.clone());
        async move {
            PostgresEventStore::connect(&url, config)
                .await
                .expect("instance")
        }
    };
    let store_a = instance(ts.schema.url.clone()).await;
    let store_b = instance(with_application_name(&ts.schema.url, &app_b)).await;
    let busy: Arc<AtomicBool> = Arc::default();
    let overlaps: Arc<AtomicU32> = Arc::default();
    // Poll rarely: B must be woken by NOTIFY from the writer instance.
    let opts = options().poll_interval(Duration::from_secs(3));
    let a = store_a
        .run_handler(
            Recorder::new(&ts, "a", busy.clone(), overlaps.clone()),
            opts,
        )
        .expect("run a");
    wait_status(&a, "leading", |s| s.holds_lease).await;
    let b = store_b
        .run_handler(
            Recorder::new(&ts, "b", busy.clone(), overlaps.clone()),
            opts,
        )
        .expect("run b");

    let last = append_deposits(&ts, 16).await; // 20 events
    ts.wait_until_processed("recorder", last, Duration::from_secs(5))
        .await
        .expect("a processes");
    assert!(a.status().holds_lease && !b.status().holds_lease);
    assert_eq!(seen_counts(&ts, Some("a")).await, (20, 20));
    assert_eq!(
        seen_counts(&ts, Some("b")).await,
        (0, 0),
        "the standby processed nothing"
    );

    // A dies (aborted like a crashed process): B takes over from the committed checkpoint.
    a.abort();
    wait_status(&b, "leading after takeover", |s| s.holds_lease).await;
    let last = append_deposits(&ts, 8).await; // 10 events
    ts.wait_until_processed("recorder", last, Duration::from_secs(5))
        .await
        .expect("b processes");
    assert_eq!(seen_counts(&ts, Some("b")).await, (10, 10));

    // B's lease connection is killed under it: B gives the lease up, takes it again, goes on.
    let admin = ts.admin().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app_b],
        )
        .await
        .expect("terminate");
    let last = append_deposits(&ts, 8).await; // 10 events
    ts.wait_until_processed("recorder", last, Duration::from_secs(8))
        .await
        .expect("b resumes");
    wait_status(&b, "leading again", |s| s.holds_lease).await;

    assert_eq!(
        seen_counts(&ts, None).await,
        (40, 40),
        "every event exactly once"
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two instances processed at the same time"
    );
    b.stop().await;
}

#[tokio::test]
async fn invalid_handlers_and_options_are_rejected() {
    let ts = test_store(StoreConfig::default()).await;
    let mut unnamed = Recorder::new(&ts, "x", Arc::default(), Arc::default());
    unnamed.name = String::new();
    assert!(ts.run_handler(unnamed, options()).is_err());
    let recorder = Recorder::new(&ts, "x", Arc::default(), Arc::default());
    assert!(ts.run_handler(recorder, options().batch_size(0)).is_err());
    assert_eq!(
        ts.handler_checkpoint("never-ran")
            .await
            .expect("checkpoint"),
        None
    );
    assert!(ts
        .handler_status("never-ran")
        .await
        .expect("status")
        .is_none());
}

/// The backend holding `handler`'s lease (its session advisory lock), if any.
async fn lease_pid(ts: &TestStore, handler: &str) -> Option<i32> {
    let key = format!("crablet/handler/{}/{handler}", ts.schema.schema);
    ts.admin()
        .await
        .query_opt(
            "SELECT l.pid FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) hk \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::int8 = ((hk.k >> 32) & 4294967295) \
               AND l.objid::int8 = (hk.k & 4294967295)",
            &[&key],
        )
        .await
        .expect("pg_locks")
        .map(|row| row.get(0))
}

/// Set if `running` ever gives up its lease after having held it (watched in the background).
fn lease_drops(running: &RunningHandler) -> Arc<AtomicBool> {
    let dropped = Arc::new(AtomicBool::new(false));
    let mut updates = running.status_updates();
    let flag = Arc::clone(&dropped);
    tokio::spawn(async move {
        let mut held = false;
        while updates.changed().await.is_ok() {
            let status = updates.borrow_and_update().clone();
            if status.stopped {
                break;
            }
            if status.holds_lease {
                held = true;
            } else if held {
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    dropped
}

/// Writes a row, then hangs on the server (`pg_sleep`) while `hangs_left` lasts.
struct Hanger {
    seen_table: String,
    hangs_left: Arc<AtomicU32>,
    calls: Arc<AtomicU32>,
}

#[async_trait]
impl EventHandler for Hanger {
    fn name(&self) -> &str {
        "hanger"
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
        record_seen(tx, &self.seen_table, events, "hanger").await?;
        if self
            .hangs_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            tx.batch_execute(&sleep_sql(&self.seen_table)).await?;
        }
        Ok(())
    }
}

/// The hanging statement, unique to the test's schema (so other tests' sleeps do not count).
fn sleep_sql(seen_table: &str) -> String {
    format!("SELECT pg_sleep(60) -- {seen_table}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_over_its_timeout_is_cancelled_rolled_back_and_retried() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let last = append_deposits(&ts, 3).await; // 4 events, one batch
    let calls = Arc::new(AtomicU32::new(0));
    let hanger = Hanger {
        seen_table: ts.table("seen"),
        hangs_left: Arc::new(AtomicU32::new(2)),
        calls: Arc::clone(&calls),
    };
    let started = std::time::Instant::now();
    let running = ts
        .run_handler(
            hanger,
            options()
                .batch_size(100)
                .batch_timeout(Some(Duration::from_secs(1))),
        )
        .expect("run");
    let dropped = lease_drops(&running);
    // Every failure the status shows (updates may coalesce; each hung attempt shows for ~1 s).
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let mut updates = running.status_updates();
        let errors = Arc::clone(&errors);
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let error = updates.borrow_and_update().last_error.clone();
                if let Some(error) = error {
                    errors.lock().expect("errors").push(error);
                }
            }
        });
    }
    wait_status(&running, "leading", |s| s.holds_lease).await;
    let holder = lease_pid(&ts, "hanger").await.expect("lease held");
    // Two hung attempts, then a good one. Without the cancellation the rollback would wait for
    // the 60 s sleep, and the lease with it.
    ts.wait_until_processed("hanger", last, Duration::from_secs(15))
        .await
        .expect("the third attempt commits");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "two abandoned attempts, then one that committed"
    );
    // The client's timer or the server's statement_timeout, whichever answered first.
    let errors = errors.lock().expect("errors").clone();
    assert!(
        errors
            .iter()
            .all(|e| e.contains("batch_timeout") || e.contains("statement timeout")),
        "{errors:?}"
    );
    assert!(
        !dropped.load(Ordering::SeqCst) && lease_pid(&ts, "hanger").await == Some(holder),
        "abandoned batches do not cost the lease"
    );
    assert_eq!(
        seen_counts(&ts, None).await,
        (4, 4),
        "the abandoned attempts' writes were rolled back"
    );
    let status = running.status();
    assert!(
        status.attempts == 0 && status.last_error.is_none() && status.holds_lease,
        "{status:?}"
    );
    let sleeping: i64 = ts
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
            &[&sleep_sql(&ts.table("seen"))],
        )
        .await
        .expect("activity")
        .get(0);
    assert_eq!(sleeping, 0, "the hung statements were cancelled");
    running.stop().await;
    assert!(ts
        .run_handler(
            Recorder::new(&ts, "x", Arc::default(), Arc::default()),
            options().batch_timeout(Some(Duration::ZERO)),
        )
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_handler_rebuilds_the_read_model_while_the_handler_runs() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let running = ts
        .run_handler(
            Recorder::new(&ts, "one", Arc::default(), Arc::default()),
            options().poll_interval(Duration::from_millis(100)),
        )
        .expect("run");
    let last = append_deposits(&ts, 8).await; // 10 events
    ts.wait_until_processed("recorder", last, Duration::from_secs(5))
        .await
        .expect("caught up");
    assert_eq!(seen_counts(&ts, None).await, (10, 10));

    // Rebuild: clear the read model and rewind the checkpoint in one transaction, while idle.
    let mut admin = ts.admin().await;
    let tx = admin.transaction().await.expect("begin");
    ts.reset_handler_in(&tx, "recorder", None)
        .await
        .expect("reset in tx");
    tx.batch_execute(&format!("TRUNCATE {}", ts.table("seen")))
        .await
        .expect("truncate");
    tx.commit().await.expect("commit");
    wait_status(&running, "rebuilt", |s| s.processed >= 20).await;
    assert_eq!(
        seen_counts(&ts, None).await,
        (10, 10),
        "every event processed once more, exactly once"
    );
    assert!(ts.handler_checkpoint("recorder").await.expect("checkpoint") >= Some(last));

    // Skip ahead: events up to `skip_to`, appended while no instance runs, are never processed.
    running.stop().await;
    let skip_to = append_deposits(&ts, 1).await; // 2 events
    ts.reset_handler("recorder", Some(skip_to))
        .await
        .expect("reset");
    let running = ts
        .run_handler(
            Recorder::new(&ts, "two", Arc::default(), Arc::default()),
            options().poll_interval(Duration::from_millis(100)),
        )
        .expect("run again");
    let after = append_deposits(&ts, 3).await; // 2 + 1 + 1 events
    ts.wait_until_processed("recorder", after, Duration::from_secs(5))
        .await
        .expect("caught up after the skip");
    assert_eq!(seen_counts(&ts, None).await, (14, 14));
    assert_eq!(seen_counts(&ts, Some("two")).await, (4, 4));

    // A handler that never ran starts where it is told; bad names are rejected.
    ts.reset_handler("fresh", Some(after)).await.expect("reset");
    assert_eq!(
        ts.handler_checkpoint("fresh").await.expect("checkpoint"),
        Some(after)
    );
    assert!(ts.reset_handler("", None).await.is_err());
    let record = ts
        .handler_status("recorder")
        .await
        .expect("status")
        .expect("exists");
    assert!(record.lease_held && record.attempts == 0, "{record:?}");
    running.stop().await;
}

/// Records like `Recorder`, but each batch first takes a permit of `gate` (none at the start).
struct Gated {
    seen_table: String,
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl EventHandler for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    fn query(&self) -> Query {
        Query::types(["Deposited"])
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        self.entered.notify_one();
        self.gate.acquire().await?.forget();
        record_seen(tx, &self.seen_table, events, "gated").await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_waits_for_the_batch_in_progress_and_the_runner_keeps_its_lease() {
    let ts = test_store(StoreConfig::default()).await;
    create_seen(&ts).await;
    let last = append_deposits(&ts, 8).await; // 10 events
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let running = ts
        .run_handler(
            Gated {
                seen_table: ts.table("seen"),
                gate: Arc::clone(&gate),
                entered: Arc::clone(&entered),
            },
            options().batch_size(4),
        )
        .expect("run");
    let dropped = lease_drops(&running);
    tokio::time::timeout(Duration::from_secs(5), entered.notified())
        .await
        .expect("the first batch starts");
    let holder = lease_pid(&ts, "gated").await.expect("lease held");
    // The first batch is now blocked inside its transaction, holding the checkpoint row.
    let store = ts.store.clone();
    let reset = tokio::spawn(async move { store.reset_handler("gated", None).await });
    let admin = ts.admin().await;
    let mut waiting = false;
    for _ in 0..100 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%' || $1 || '%handler_checkpoints%'",
                &[&ts.schema.schema],
            )
            .await
            .expect("activity")
            .get(0);
        if n > 0 {
            waiting = true;
            break;
        }
        assert!(
            !reset.is_finished(),
            "the reset must wait for the batch in progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(waiting, "the reset waits on the checkpoint row");
    gate.add_permits(1_000);
    reset.await.expect("join").expect("reset");
    ts.wait_until_processed("gated", last, Duration::from_secs(5))
        .await
        .expect("caught up");
    // The batch in progress committed (4 events), then everything again from the start.
    assert_eq!(seen_counts(&ts, None).await, (14, 10));
    let status = running.status();
    assert!(
        status.last_error.is_none() && status.attempts == 0,
        "{status:?}"
    );
    assert!(
        !dropped.load(Ordering::SeqCst) && lease_pid(&ts, "gated").await == Some(holder),
        "a moved checkpoint does not cost the lease"
    );
    running.stop().await;
}
