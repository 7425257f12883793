//! Reads on a real streaming hot standby (docs/scale-out.md): routing, gap safety under
//! out-of-order commits on the primary, stale decisions that can only conflict,
//! read-your-writes, lag and a standby that disappears.
//!
//! The primary and the standby are started from the local PostgreSQL server binaries
//! (`dcb_testkit::pg::replicated_pair`); without them every test prints a notice and passes.
mod support;

use dcb_core::{
    Cursor, Error, Event, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, StandbyError, StandbyProblem, StateProjector, SubscribeExt, SubscribeOptions,
};
use dcb_postgres::{PostgresEventStore, ReadFrom, ReplicaConfig, StandbyFallback, StoreConfig};
use dcb_testkit::pg::{replicated_pair, LocalStandby, ReplicatedPair, TestSchema};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

fn event(t: &str, key: &str, id: &str) -> NewEvent {
    NewEvent::builder(t).tag(key, id).build().expect("event")
}

fn types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

/// A store on the pair's primary, in its own schema, reading from `standby`.
struct Fixture {
    store: PostgresEventStore,
    schema: TestSchema,
    primary_url: String,
    standby_url: String,
}

impl Fixture {
    async fn new(pair: &ReplicatedPair, standby: &LocalStandby, replicas: ReplicaConfig) -> Self {
        let schema = TestSchema::create_in(pair.primary.url())
            .await
            .expect("schema on the primary");
        let mut replicas = replicas;
        replicas.standby_urls = vec![standby.url().to_owned()];
        let store = PostgresEventStore::connect_with_standbys(
            pair.primary.url(),
            StoreConfig::default()
                .schema(schema.schema.clone())
                .auto_migrate(true)
                .query_timeout(Duration::from_secs(5)),
            replicas,
        )
        .await
        .expect("store with a standby");
        let fixture = Self {
            store,
            schema,
            primary_url: pair.primary.url().to_owned(),
            standby_url: standby.url().to_owned(),
        };
        fixture.wait_until_replayed().await;
        fixture
    }

    async fn primary(&self) -> tokio_postgres::Client {
        dcb_testkit::pg::connect(&self.primary_url)
            .await
            .expect("primary connection")
    }

    async fn standby(&self) -> tokio_postgres::Client {
        dcb_testkit::pg::connect(&self.standby_url)
            .await
            .expect("standby connection")
    }

    fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.schema.schema)
    }

    /// Waits until the standby has replayed everything the primary wrote so far.
    async fn wait_until_replayed(&self) {
        let primary = self.primary().await;
        let standby = self.standby().await;
        let target: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        for _ in 0..500 {
            let done: bool = standby
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&target],
                )
                .await
                .expect("replay lsn")
                .get(0);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the standby did not replay {target} within 5 s");
    }

    /// Holds every insert of a `Slow` event on the primary in its transaction (which already
    /// has its id and its row written) while the returned connection holds lock `lock`.
    async fn install_brake(&self, lock: i64) -> tokio_postgres::Client {
        support::install_brake_at(&self.primary_url, &self.schema.schema, lock).await
    }

    async fn wait_until_stuck(&self, lock: i64) {
        support::wait_until_stuck(&self.primary_url, lock).await
    }
}

async fn pair() -> Option<&'static ReplicatedPair> {
    let pair = replicated_pair().await;
    if pair.is_none() {
        eprintln!("standby tests skipped: no local PostgreSQL server binaries");
    }
    pair
}

fn stream_query() -> Query {
    Query::from(QueryItem::new().tag("stream", "s"))
}

async fn pause_replay(standby: &tokio_postgres::Client) {
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
}

async fn resume_replay(standby: &tokio_postgres::Client) {
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
}

fn is_problem(err: &Error, want: fn(&StandbyProblem) -> bool) -> bool {
    matches!(err, Error::Standby(StandbyError { problem, .. }) if want(problem))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_transaction_the_standby_has_no_wal_of_holds_its_horizon_back() {
    // The claim the horizon rests on: the standby counts every xid up to the latest one it has
    // observed in WAL as running until it replays its end, even one that wrote nothing yet.
    let Some(pair) = pair().await else { return };
    let f = Fixture::new(pair, &pair.standby, ReplicaConfig::new([""])).await;
    let quiet = f.primary().await;
    quiet.batch_execute("BEGIN").await.expect("begin");
    let quiet_xid: String = quiet
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("xid without any WAL")
        .get(0);
    // A later transaction commits (its xid is observed by the standby).
    f.store
        .append(vec![event("Later", "k", "1")])
        .await
        .expect("append");
    f.wait_until_replayed().await;
    let standby = f.standby().await;
    let row = standby
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) <= $1::text::xid8, \
                    pg_visible_in_snapshot($1::text::xid8, pg_current_snapshot())",
            &[&quiet_xid],
        )
        .await
        .expect("standby snapshot");
    let (held_back, visible): (bool, bool) = (row.get(0), row.get(1));
    assert!(
        held_back,
        "the standby's horizon passed a running primary xid"
    );
    // The trap beside it: during recovery PostgreSQL keeps the running xids in the snapshot's
    // subxip array, and pg_current_snapshot() lists only xip, so its text on a standby has no
    // in-flight xids at all: a snapshot recorded there and tested with pg_visible_in_snapshot
    // (the primary's fence) would count the running transaction as visible. Only the xmin is
    // sound on a standby.
    let snapshot: String = standby
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .expect("snapshot")
        .get(0);
    assert!(
        snapshot.ends_with(':') && visible,
        "PostgreSQL now lists in-flight xids on a standby ({snapshot}): revisit docs/scale-out.md"
    );
    quiet.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_go_to_the_primary_and_standby_reads_run_on_the_standby() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    let f = Fixture::new(
        pair,
        &standby,
        ReplicaConfig::new([""]).default_read(ReadFrom::Standby),
    )
    .await;
    assert_eq!(f.store.read_from(), ReadFrom::Standby);
    assert_eq!(f.store.on_primary().read_from(), ReadFrom::Primary);
    let first = f
        .store
        .append(vec![event("Opened", "stream", "s")])
        .await
        .expect("append through a store that reads on a standby");
    f.store
        .wait_for_standby(first, Duration::from_secs(5))
        .await
        .expect("replayed");
    let seen = f
        .store
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("standby read");
    assert_eq!(types(&seen), ["Opened"]);

    // With replay paused, a new write shows on the primary only: the default read is on the
    // standby, and so are project and query_stream.
    let control = f.standby().await;
    pause_replay(&control).await;
    let second = f
        .store
        .append(vec![event("Closed", "stream", "s")])
        .await
        .expect("append");
    let on_standby = f
        .store
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("standby read");
    assert_eq!(types(&on_standby), ["Opened"]);
    let streamed: Vec<Event> = f
        .store
        .query_stream(&stream_query(), ReadOptions::default())
        .map(|e| e.expect("event"))
        .collect()
        .await;
    assert_eq!(types(&streamed), ["Opened"]);
    let count = StateProjector::new(stream_query(), 0u32, |n, _| *n += 1);
    let projection = f.store.project(count).await.expect("project");
    assert_eq!(projection.states, 1);
    let on_primary = f
        .store
        .on_primary()
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("primary read");
    assert_eq!(types(&on_primary), ["Opened", "Closed"]);
    assert_eq!(on_primary[1].cursor, second);
    resume_replay(&control).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_commits_on_the_primary_are_never_skipped_by_a_standby_follower() {
    let Some(pair) = pair().await else { return };
    let f = Fixture::new(pair, &pair.standby, ReplicaConfig::new([""])).await;
    let reader = f.store.on_standby();
    let brake = f.install_brake(4261).await;
    f.wait_until_replayed().await;
    // Writer A gets the LOWER transaction id and is held open mid-insert on the primary.
    let a = {
        let store = f.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "stream", "s")]).await })
    };
    f.wait_until_stuck(4261).await;
    // Writer B starts later (higher id), commits first and is replayed by the standby.
    let b = f
        .store
        .append(vec![event("Fast", "stream", "s")])
        .await
        .expect("B commits");
    f.wait_until_replayed().await;

    // On the standby the raw data already has B without A: a read that returned it would put
    // its follower past A's lower id forever.
    let standby = f.standby().await;
    let raw: i64 = standby
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE type = 'Fast'",
                f.table("events")
            ),
            &[],
        )
        .await
        .expect("raw read")
        .get(0);
    assert_eq!(raw, 1, "B is replayed on the standby");
    // The horizon read holds B back instead (A is in flight below it) and returns at once.
    let started = Instant::now();
    let early = reader
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("standby read");
    assert!(early.is_empty(), "returned {:?}", types(&early));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the standby read waited"
    );

    brake
        .batch_execute("SELECT pg_advisory_unlock(4261)")
        .await
        .expect("release");
    let cursor_a = a.await.expect("join").expect("A commits");
    assert!(
        cursor_a < b,
        "A holds the lower cursor although it committed last"
    );
    reader
        .wait_for_standby(b, Duration::from_secs(5))
        .await
        .expect("both replayed");
    let seen = reader
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("standby read");
    assert_eq!(
        types(&seen),
        ["Slow", "Fast"],
        "cursor order, nothing skipped"
    );
    // A subscription on the standby delivers both, once each, in cursor order.
    let mut subscription = reader.subscribe_with(
        &stream_query(),
        None,
        SubscribeOptions::default().poll_interval(Duration::from_millis(50)),
    );
    let mut delivered = Vec::new();
    while delivered.len() < 2 {
        let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
            .await
            .expect("subscription delivers")
            .expect("open")
            .expect("event");
        delivered.push(next.cursor);
    }
    assert_eq!(delivered, [cursor_a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_decision_on_the_standby_conflicts_and_never_violates() {
    let Some(pair) = pair().await else { return };
    let f = Fixture::new(pair, &pair.standby, ReplicaConfig::new([""])).await;
    let reader = f.store.on_standby();
    let brake = f.install_brake(4262).await;
    f.wait_until_replayed().await;
    // The boundary: at most one `Slow` or `Fast` event on stream s.
    let boundary = stream_query();
    let a = {
        let store = f.store.clone();
        tokio::spawn(async move { store.append(vec![event("Slow", "stream", "s")]).await })
    };
    f.wait_until_stuck(4262).await;
    // A later, unrelated transaction commits and is replayed; the standby's horizon stays
    // below A.
    f.store
        .append(vec![event("Unrelated", "other", "o")])
        .await
        .expect("unrelated");
    f.wait_until_replayed().await;
    let decision = reader
        .project(StateProjector::new(boundary.clone(), 0u32, |n, _| *n += 1))
        .await
        .expect("decision on the standby");
    assert_eq!(
        decision.states, 0,
        "A is in flight: the standby decides on nothing"
    );
    brake
        .batch_execute("SELECT pg_advisory_unlock(4262)")
        .await
        .expect("release");
    a.await.expect("join").expect("A commits");
    // The decision's condition is checked on the primary, which has A: a conflict, not a
    // second event on the boundary.
    let second = f
        .store
        .append_if(
            vec![event("Fast", "stream", "s")],
            decision.condition.clone(),
        )
        .await;
    assert!(
        matches!(second, Err(Error::Conflict(_))),
        "a stale standby decision must conflict: {second:?}"
    );
    let stored = f
        .store
        .on_primary()
        .query(&boundary, ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(types(&stored), ["Slow"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_waits_for_replay_and_times_out_with_a_typed_error() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    let base = ReplicaConfig::new([""]).replay_wait_timeout(Duration::from_millis(300));
    let f = Fixture::new(pair, &standby, base.clone().fallback(StandbyFallback::Fail)).await;
    let cursor = f
        .store
        .append(vec![event("Opened", "stream", "s")])
        .await
        .expect("append");
    let seen = f
        .store
        .on_standby()
        .seeing(cursor)
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("read your write on the standby");
    assert_eq!(seen.last().map(|e| e.cursor), Some(cursor));

    let control = f.standby().await;
    pause_replay(&control).await;
    let unseen = f
        .store
        .append(vec![event("Closed", "stream", "s")])
        .await
        .expect("append");
    let started = Instant::now();
    let err = f
        .store
        .wait_for_standby(unseen, Duration::from_millis(300))
        .await
        .expect_err("replay is paused");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        is_problem(&err, |p| matches!(p, StandbyProblem::NotReplayed { .. })),
        "{err:?}"
    );
    let err = f
        .store
        .on_standby()
        .seeing(unseen)
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect_err("Fail: no fallback");
    assert!(
        is_problem(&err, |p| matches!(p, StandbyProblem::NotReplayed { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("did not become visible"), "{err}");

    // Under FallBackToPrimary the same read is served by the primary, write included.
    let fallback = PostgresEventStore::connect_with_standbys(
        pair.primary.url(),
        StoreConfig::default().schema(f.schema.schema.clone()),
        base.clone()
            .fallback(StandbyFallback::FallBackToPrimary)
            .default_read(ReadFrom::Standby)
            .max_lag(Duration::from_secs(60))
            .tap_urls(standby.url()),
    )
    .await
    .expect("store");
    let seen = fallback
        .seeing(unseen)
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("fell back to the primary");
    assert_eq!(seen.last().map(|e| e.cursor), Some(unseen));
    resume_replay(&control).await;
    f.store
        .wait_for_standby(unseen, Duration::from_secs(5))
        .await
        .expect("replayed after resume");
}

/// `ReplicaConfig` with its URLs replaced, for the tests.
trait TapUrls {
    fn tap_urls(self, url: &str) -> Self;
}

impl TapUrls for ReplicaConfig {
    fn tap_urls(mut self, url: &str) -> Self {
        self.standby_urls = vec![url.to_owned()];
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_standby_makes_reads_fall_back_or_fail_per_setting() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    let replicas = ReplicaConfig::new([""])
        .default_read(ReadFrom::Standby)
        .max_lag(Duration::from_millis(300))
        .lag_check_interval(Duration::from_millis(50));
    let failing = Fixture::new(
        pair,
        &standby,
        replicas.clone().fallback(StandbyFallback::Fail),
    )
    .await;
    let falling_back = PostgresEventStore::connect_with_standbys(
        pair.primary.url(),
        StoreConfig::default().schema(failing.schema.schema.clone()),
        replicas.clone().tap_urls(standby.url()),
    )
    .await
    .expect("store");
    failing
        .store
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("a fresh standby serves");

    let control = failing.standby().await;
    pause_replay(&control).await;
    // Writes keep coming on the primary while replay stands still.
    let mut last;
    let started = Instant::now();
    let lagging = loop {
        last = failing
            .store
            .append(vec![event("Tick", "stream", "s")])
            .await
            .expect("append");
        match failing
            .store
            .query(&stream_query(), ReadOptions::default())
            .await
        {
            Ok(_) => {}
            Err(err) => break err,
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the lag was never detected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let detected_after = started.elapsed();
    assert!(
        is_problem(&lagging, |p| matches!(p, StandbyProblem::Lagging { .. })),
        "{lagging:?}"
    );
    assert!(
        detected_after >= Duration::from_millis(300),
        "{detected_after:?}"
    );
    let events = falling_back
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("fell back to the primary");
    assert_eq!(
        events.last().map(|e| e.cursor),
        Some(last),
        "the primary's view"
    );

    resume_replay(&control).await;
    failing
        .store
        .wait_for_standby(last, Duration::from_secs(5))
        .await
        .expect("caught up");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = failing
        .store
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("a caught-up standby serves again");
    assert_eq!(events.last().map(|e| e.cursor), Some(last));
    eprintln!("lag beyond 300 ms detected after {detected_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_standby_makes_reads_fall_back_or_fail_without_hanging() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    let replicas = ReplicaConfig::new([""])
        .default_read(ReadFrom::Standby)
        .lag_check_interval(Duration::from_millis(50))
        .connect_timeout(Duration::from_millis(500));
    let failing = Fixture::new(
        pair,
        &standby,
        replicas.clone().fallback(StandbyFallback::Fail),
    )
    .await;
    let falling_back = PostgresEventStore::connect_with_standbys(
        pair.primary.url(),
        StoreConfig::default().schema(failing.schema.schema.clone()),
        replicas.clone().tap_urls(standby.url()),
    )
    .await
    .expect("store");
    let cursor = failing
        .store
        .append(vec![event("Opened", "stream", "s")])
        .await
        .expect("append");
    failing
        .store
        .wait_for_standby(cursor, Duration::from_secs(5))
        .await
        .expect("replayed");
    // Both stores have pooled standby connections now.
    failing
        .store
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("read");
    falling_back
        .query(&stream_query(), ReadOptions::default())
        .await
        .expect("read");

    tokio::task::block_in_place(|| standby.kill()).expect("kill the standby");
    for _ in 0..3 {
        let started = Instant::now();
        let err = failing
            .store
            .query(&stream_query(), ReadOptions::default())
            .await
            .expect_err("no standby, no fallback");
        assert!(
            is_problem(&err, |p| matches!(p, StandbyProblem::Unreachable { .. })),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        let events = falling_back
            .query(&stream_query(), ReadOptions::default())
            .await
            .expect("fell back to the primary");
        assert_eq!(types(&events), ["Opened"]);
        let streamed: Vec<Event> = falling_back
            .query_stream(&stream_query(), ReadOptions::default())
            .map(|e| e.expect("event"))
            .collect()
            .await;
        assert_eq!(types(&streamed), ["Opened"]);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    tokio::task::block_in_place(|| standby.restart()).expect("restart");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut served = false;
    for _ in 0..100 {
        if failing
            .store
            .query(&stream_query(), ReadOptions::default())
            .await
            .is_ok()
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the restarted standby serves reads again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_on_a_standby_that_is_killed_and_restarted_neither_skips_nor_repeats() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    // No fallback: the subscription must resume on the same standby once it is back.
    let f = Fixture::new(
        pair,
        &standby,
        ReplicaConfig::new([""])
            .default_read(ReadFrom::Standby)
            .fallback(StandbyFallback::Fail)
            .lag_check_interval(Duration::from_millis(50))
            .connect_timeout(Duration::from_millis(500)),
    )
    .await;
    const TOTAL: usize = 300;
    let writer = {
        let store = f.store.clone();
        tokio::spawn(async move {
            let mut cursors = Vec::with_capacity(TOTAL);
            for i in 0..TOTAL {
                let id = (i % 3).to_string();
                cursors.push(
                    store
                        .append(vec![event("Noise", "n", &id), event("Tick", "stream", "s")])
                        .await
                        .expect("append"),
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            cursors
        })
    };
    let mut subscription = f.store.subscribe_with(
        &Query::types(["Tick"]),
        None,
        SubscribeOptions::default()
            .batch_size(16)
            .poll_interval(Duration::from_millis(50))
            .retry(Duration::from_millis(50), Duration::from_millis(200)),
    );
    let standby = std::sync::Arc::new(standby);
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The fault runs beside the consumer, so the subscription keeps reading while the standby
    // is down.
    let fault = {
        let (standby, progress) = (standby.clone(), progress.clone());
        tokio::spawn(async move {
            while progress.load(std::sync::atomic::Ordering::Relaxed) < TOTAL / 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let s = standby.clone();
            tokio::task::spawn_blocking(move || s.kill())
                .await
                .expect("join")
                .expect("kill");
            // The primary goes on writing while the standby is down.
            tokio::time::sleep(Duration::from_millis(800)).await;
            tokio::task::spawn_blocking(move || standby.restart())
                .await
                .expect("join")
                .expect("restart");
        })
    };
    let mut delivered = Vec::new();
    let mut errors = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.len() < TOTAL {
        assert!(
            Instant::now() < deadline,
            "only {} of {TOTAL} delivered",
            delivered.len()
        );
        let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("the subscription never hangs")
            .expect("open");
        match next {
            Ok(event) => delivered.push(event.cursor),
            Err(err) => {
                assert!(
                    matches!(err, Error::Standby(_)),
                    "a standby failure, reported as such: {err:?}"
                );
                errors += 1
            }
        }
        progress.store(delivered.len(), std::sync::atomic::Ordering::Relaxed);
    }
    fault.await.expect("kill and restart");
    assert!(errors > 0, "the subscription never met the dead standby");
    let appended = writer.await.expect("writer");
    assert_eq!(delivered, appended, "every event once, in cursor order");
    eprintln!("subscription survived a standby kill/restart with {errors} transient errors");
}

/// Decide-then-append loops on disjoint boundaries with the decision read on the primary, on
/// the standby, and on the standby seeing the client's own last write. Prints the conflict
/// counts (docs/scale-out.md); asserts that no boundary ever got two events for one decision
/// (the invariant) and that the primary's decisions never conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_standby_decisions_only_cost_conflicts_measured() {
    let Some(pair) = pair().await else { return };
    let f = Fixture::new(
        pair,
        &pair.standby,
        ReplicaConfig::new([""]).max_lag(Duration::from_secs(60)),
    )
    .await;
    let clients = 8;
    let run_for = Duration::from_millis(1500);
    let mut report = Vec::new();
    for mode in ["primary", "standby", "standby+seeing"] {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let store = f.store.clone();
            let mode = mode.to_string();
            tasks.push(tokio::spawn(async move {
                let boundary = format!("{mode}-{c}");
                let query = Query::from(QueryItem::new().tag("counter", boundary.as_str()));
                let (mut ok, mut conflicts) = (0u64, 0u64);
                let mut last: Option<Cursor> = None;
                let started = Instant::now();
                while started.elapsed() < run_for {
                    let reader = match (mode.as_str(), last) {
                        ("primary", _) => store.on_primary(),
                        ("standby+seeing", Some(cursor)) => store.on_standby().seeing(cursor),
                        _ => store.on_standby(),
                    };
                    let decision = reader
                        .project(StateProjector::new(query.clone(), 0u64, |n, _| *n += 1))
                        .await
                        .expect("decide");
                    // The invariant: the counter's value is the number of events so far.
                    let next = NewEvent::builder("Counted")
                        .tag("counter", boundary.as_str())
                        .data(&(decision.states + 1))
                        .build()
                        .expect("event");
                    match store
                        .append_if(vec![next], decision.condition.clone())
                        .await
                    {
                        Ok(cursor) => {
                            ok += 1;
                            last = Some(cursor);
                        }
                        Err(Error::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("append_if: {e}"),
                    }
                }
                // Every stored value is its position in the boundary: no lost decision.
                let stored = store
                    .on_primary()
                    .query(&query, ReadOptions::default())
                    .await
                    .expect("read");
                for (i, e) in stored.iter().enumerate() {
                    assert_eq!(
                        e.data,
                        serde_json::json!(i as u64 + 1),
                        "a violated decision"
                    );
                }
                assert_eq!(stored.len() as u64, ok);
                (ok, conflicts)
            }));
        }
        let (mut ok, mut conflicts) = (0, 0);
        for t in tasks {
            let (o, c) = t.await.expect("client");
            ok += o;
            conflicts += c;
        }
        let rate = conflicts as f64 / (ok + conflicts).max(1) as f64 * 100.0;
        report.push(format!(
            "{mode}: {ok} appends, {conflicts} conflicts ({rate:.1}%) in {run_for:?} x {clients} clients"
        ));
        if mode == "primary" {
            assert_eq!(conflicts, 0, "decisions on the primary are exact");
        }
    }
    eprintln!("stale decisions:\n  {}", report.join("\n  "));
}

#[test]
fn replica_config_rejects_what_cannot_work() {
    assert!(ReplicaConfig::new(Vec::<String>::new()).validate().is_err());
    assert!(ReplicaConfig::new(["postgres://x@y/z"])
        .max_lag(Duration::ZERO)
        .validate()
        .is_err());
    assert!(ReplicaConfig::new(["postgres://x@y/z"])
        .pool_size(0)
        .validate()
        .is_err());
    assert!(ReplicaConfig::new(["postgres://x@y/z"]).validate().is_ok());
}

#[tokio::test]
async fn a_store_with_an_invalid_standby_url_is_refused() {
    let err = PostgresEventStore::connect_with_standbys(
        "postgres://postgres@127.0.0.1:1/postgres",
        StoreConfig::default(),
        ReplicaConfig::new(["not a url ==="]),
    )
    .await
    .expect_err("invalid");
    assert!(
        matches!(
            err,
            Error::Config {
                field: "standby_urls",
                ..
            }
        ),
        "{err:?}"
    );
}

/// Counts the events it handles in `<schema>.handled`, in the handler's transaction (on the
/// primary).
struct Counter {
    table: String,
}

#[async_trait::async_trait]
impl dcb_postgres::EventHandler for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    fn query(&self) -> Query {
        stream_query()
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), dcb_postgres::HandlerError> {
        for e in events {
            tx.execute(
                &format!("INSERT INTO {} VALUES ($1)", self.table),
                &[&e.cursor.position],
            )
            .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_durable_handler_reads_on_the_standby_and_checkpoints_on_the_primary() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    let f = Fixture::new(
        pair,
        &standby,
        ReplicaConfig::new([""]).max_lag(Duration::from_secs(60)),
    )
    .await;
    let table = f.table("handled");
    f.primary()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (position int8 PRIMARY KEY)"))
        .await
        .expect("table");
    let first = f
        .store
        .append(vec![event("Opened", "stream", "s")])
        .await
        .expect("append");
    let running = f
        .store
        .on_standby()
        .run_handler(
            Counter {
                table: table.clone(),
            },
            dcb_postgres::HandlerOptions::default()
                .retry_initial(Duration::from_millis(20))
                .retry_max(Duration::from_millis(200)),
        )
        .expect("run handler");
    // Across nodes: the handler reads on the standby, its checkpoint is on the primary.
    f.store
        .wait_until_processed("counter", first, Duration::from_secs(10))
        .await
        .expect("processed");
    let control = f.standby().await;
    pause_replay(&control).await;
    let second = f
        .store
        .append(vec![event("Closed", "stream", "s")])
        .await
        .expect("append");
    assert!(
        f.store
            .wait_until_processed("counter", second, Duration::from_millis(500))
            .await
            .is_err(),
        "the handler cannot have read an event its standby has not replayed"
    );
    resume_replay(&control).await;
    f.store
        .wait_until_processed("counter", second, Duration::from_secs(10))
        .await
        .expect("processed after replay resumed");
    let handled: i64 = f
        .primary()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(handled, 2, "each event handled once");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_stream_cancelled_by_recovery_on_the_standby_resumes_from_its_cursor() {
    let Some(pair) = pair().await else { return };
    let standby = pair.new_standby().await;
    // The worst case for a standby reader: no feedback to the primary, and replay cancels
    // conflicting queries at once.
    let control = dcb_testkit::pg::connect(standby.url())
        .await
        .expect("standby");
    for statement in [
        "ALTER SYSTEM SET hot_standby_feedback = off",
        "ALTER SYSTEM SET max_standby_streaming_delay = 0",
        "SELECT pg_reload_conf()",
    ] {
        control.batch_execute(statement).await.expect(statement);
    }
    let schema = TestSchema::create_in(pair.primary.url())
        .await
        .expect("schema");
    let store = PostgresEventStore::connect_with_standbys(
        pair.primary.url(),
        StoreConfig::default()
            .schema(schema.schema.clone())
            .auto_migrate(true)
            .stream_buffer(10),
        ReplicaConfig::new([standby.url()])
            .default_read(ReadFrom::Standby)
            .fallback(StandbyFallback::Fail)
            .max_lag(Duration::from_secs(60)),
    )
    .await
    .expect("store");
    let mut appended = Vec::new();
    for _ in 0..20 {
        let batch: Vec<NewEvent> = (0..10).map(|_| event("Tick", "stream", "s")).collect();
        let last = store.append(batch).await.expect("append");
        appended.push(last);
    }
    let junk = format!("\"{}\".junk", schema.schema);
    let primary = dcb_testkit::pg::connect(pair.primary.url())
        .await
        .expect("primary");
    primary
        .batch_execute(&format!(
            "CREATE TABLE {junk} (x int) WITH (autovacuum_enabled = off); \
             INSERT INTO {junk} SELECT generate_series(1, 1000)"
        ))
        .await
        .expect("junk");
    let last = *appended.last().expect("appended");
    store
        .wait_for_standby(last, Duration::from_secs(5))
        .await
        .expect("replayed");
    let before = conflicts(&control).await;
    let mut stream = store.query_stream(&stream_query(), ReadOptions::default());
    let mut seen = Vec::new();
    while seen.len() < 25 {
        seen.push(stream.next().await.expect("open").expect("event").cursor);
    }
    // Rows the stream's snapshot can still see are removed on the primary and the removal
    // replayed: the standby cancels the stream's transaction.
    primary
        .batch_execute(&format!("DELETE FROM {junk}"))
        .await
        .expect("delete");
    // VACUUM removes them once no snapshot anywhere needs them: the other standbys' feedback
    // (every second) and the other tests' transactions hold the primary's horizon back for a
    // while, so vacuum until replay cancels the stream.
    let mut cancelled = false;
    for _ in 0..200 {
        primary
            .batch_execute(&format!("VACUUM {junk}"))
            .await
            .expect("vacuum");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if conflicts(&control).await > before {
            cancelled = true;
            break;
        }
    }
    while let Some(next) = stream.next().await {
        seen.push(next.expect("the stream resumes instead of failing").cursor);
    }
    assert!(
        cancelled,
        "replay never cancelled the stream: the test proved nothing"
    );
    assert_eq!(seen.len(), 200, "every event once");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in cursor order");
    assert_eq!(seen.last(), Some(&last));
}

/// Queries the standby cancelled for snapshot conflicts with recovery so far.
async fn conflicts(standby: &tokio_postgres::Client) -> i64 {
    standby
        .query_one(
            "SELECT confl_snapshot FROM pg_stat_database_conflicts WHERE datname = 'postgres'",
            &[],
        )
        .await
        .expect("conflicts")
        .get(0)
}

/// Waits until the standby at `url` shows `cursor` to a plain read of the events table.
async fn wait_until_shown(url: &str, table: &str, cursor: Cursor) {
    let client = dcb_testkit::pg::connect(url)
        .await
        .expect("standby connection");
    for _ in 0..500 {
        // The table itself may not be replayed yet.
        let shown = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE position = $1)"),
                &[&cursor.position],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0));
        if shown {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the standby did not show {cursor} within 5 s");
}

/// Which standby served each of `reads` reads: `true` where the read saw an event of type
/// `marker` (only the standby whose replay runs shows it), `false` where it did not (the
/// paused one). Reads that failed are `None`.
async fn served_by_the_replaying_standby(
    store: &PostgresEventStore,
    reads: usize,
    marker: &str,
) -> Vec<Option<bool>> {
    let mut seen = Vec::with_capacity(reads);
    for _ in 0..reads {
        seen.push(
            store
                .query(&stream_query(), ReadOptions::default())
                .await
                .ok()
                .map(|events| types(&events).contains(&marker)),
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_are_spread_over_two_standbys_and_one_going_down_leaves_the_other() {
    let Some(pair) = pair().await else { return };
    let paused = pair.new_standby().await;
    let replaying = pair.new_standby().await;
    let schema = TestSchema::create_in(pair.primary.url())
        .await
        .expect("schema on the primary");
    let table = format!("\"{}\".events", schema.schema);
    // A paused standby is not "lagging" while max_lag is large: both serve reads.
    let replicas = ReplicaConfig::new([paused.url(), replaying.url()])
        .default_read(ReadFrom::Standby)
        .max_lag(Duration::from_secs(600))
        .lag_check_interval(Duration::from_millis(50))
        .connect_timeout(Duration::from_millis(500));
    let connect = |replicas: ReplicaConfig| {
        PostgresEventStore::connect_with_standbys(
            pair.primary.url(),
            StoreConfig::default()
                .schema(schema.schema.clone())
                .auto_migrate(true)
                .query_timeout(Duration::from_secs(5)),
            replicas,
        )
    };
    let failing = connect(replicas.clone().fallback(StandbyFallback::Fail))
        .await
        .expect("store");
    let falling_back = connect(
        replicas
            .clone()
            .fallback(StandbyFallback::FallBackToPrimary),
    )
    .await
    .expect("store");
    // Trusts a health check for a minute: after the kill it still routes reads to the dead
    // standby in turn, so each such read fails there and must run again on the other one.
    let trusting = connect(
        replicas
            .clone()
            .fallback(StandbyFallback::Fail)
            .lag_check_interval(Duration::from_secs(60)),
    )
    .await
    .expect("store");
    let opened = failing
        .append(vec![event("Opened", "stream", "s")])
        .await
        .expect("append");
    failing
        .wait_for_standby(opened, Duration::from_secs(5))
        .await
        .expect("both replayed");
    let control = dcb_testkit::pg::connect(paused.url())
        .await
        .expect("paused standby");
    pause_replay(&control).await;
    let marker = failing
        .append(vec![event("Marker", "stream", "s")])
        .await
        .expect("append");
    wait_until_shown(replaying.url(), &table, marker).await;

    // Round robin: the reads alternate between the two standbys.
    for store in [&failing, &falling_back, &trusting] {
        let seen = served_by_the_replaying_standby(store, 10, "Marker").await;
        assert!(seen.iter().all(Option::is_some), "{seen:?}");
        let on_replaying = seen.iter().filter(|s| **s == Some(true)).count();
        assert_eq!(on_replaying, 5, "half of the reads on each: {seen:?}");
        assert!(
            seen.windows(2).all(|w| w[0] != w[1]),
            "they alternate: {seen:?}"
        );
    }

    // The replaying standby goes down: reads go to the other one, the read that finds it down
    // included (it runs again on the other standby), for either setting.
    tokio::task::block_in_place(|| replaying.kill()).expect("kill a standby");
    for store in [&trusting, &failing, &falling_back] {
        let seen = served_by_the_replaying_standby(store, 12, "Marker").await;
        assert!(
            seen.iter().all(|s| *s == Some(false)),
            "every read on the remaining standby: {seen:?}"
        );
    }
    // A stream too.
    let streamed: Vec<Event> = failing
        .query_stream(&stream_query(), ReadOptions::default())
        .map(|e| e.expect("event"))
        .collect()
        .await;
    assert_eq!(types(&streamed), ["Opened"]);

    // Both down: per setting, every read fails or runs on the primary.
    tokio::task::block_in_place(|| paused.kill()).expect("kill the other standby");
    let seen = served_by_the_replaying_standby(&failing, 4, "Marker").await;
    assert!(seen[1..].iter().all(Option::is_none), "{seen:?}");
    let seen = served_by_the_replaying_standby(&falling_back, 4, "Marker").await;
    assert!(
        seen.iter().all(|s| *s == Some(true)),
        "every read on the primary: {seen:?}"
    );

    // Back up (a restart resumes replay): pause one again, and the reads are spread again.
    tokio::task::block_in_place(|| replaying.restart()).expect("restart");
    tokio::task::block_in_place(|| paused.restart()).expect("restart");
    let control = dcb_testkit::pg::connect(paused.url())
        .await
        .expect("paused standby");
    wait_until_shown(paused.url(), &table, marker).await;
    pause_replay(&control).await;
    let again = failing
        .append(vec![event("MarkerAgain", "stream", "s")])
        .await
        .expect("append");
    wait_until_shown(replaying.url(), &table, again).await;
    let mut spread = Vec::new();
    for _ in 0..100 {
        spread = served_by_the_replaying_standby(&failing, 6, "MarkerAgain").await;
        if spread.contains(&Some(true)) && spread.contains(&Some(false)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        spread.contains(&Some(true)) && spread.contains(&Some(false)),
        "both restarted standbys serve reads again: {spread:?}"
    );
    resume_replay(&control).await;
}
