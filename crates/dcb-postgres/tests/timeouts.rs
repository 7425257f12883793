//! Tight timeouts tell the truth: a timed-out append says "nothing was written" only when that
//! is certain, no connection goes back to the pool inside a transaction or out of step with its
//! client, and no lock outlives its operation. Checked against the events table itself.
mod support;

use dcb_core::{
    AppendCondition, Error, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, StateProjector, Tag,
};
use dcb_postgres::{IsolationLevel, PostgresEventStore, StoreConfig};
use dcb_testkit::conformance::{check_log, classify, AppendCall, Reported};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{test_store, TestStore};
use tokio::sync::Barrier;

const WRITERS: usize = 8;
/// How long the writers hammer the store.
const STORM: Duration = Duration::from_secs(4);

fn slot(n: u64) -> Query {
    Query::from(
        QueryItem::new()
            .types(["Booked"])
            .tag("slot", n.to_string()),
    )
}

fn booked(id: &str, n: u64) -> NewEvent {
    NewEvent::new(
        "Booked",
        vec![Tag::new("slot", n.to_string())],
        json!({ "op": id }),
    )
}

/// `url` with an `application_name`, so the test can find its store's sessions.
fn named(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

async fn store_named(config: StoreConfig, name: &str) -> TestStore {
    let ts = test_store(StoreConfig::default()).await;
    let store = PostgresEventStore::connect(
        &named(&ts.schema.url, name),
        config.schema(ts.schema.schema.clone()),
    )
    .await
    .expect("store with tight timeouts connects");
    TestStore {
        store,
        schema: ts.schema,
    }
}

/// Writers: half append, half decide and `append_if` on three boundaries; some calls are
/// dropped at a random point. Returns every call and the longest decision read.
async fn storm(store: &PostgresEventStore, seed: u64) -> (Vec<AppendCall>, Duration) {
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut handles = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed + writer as u64);
            let mut calls = Vec::new();
            let mut slowest_read = Duration::ZERO;
            barrier.wait().await;
            let end = Instant::now() + STORM;
            let mut op = 0;
            while Instant::now() < end {
                op += 1;
                let id = format!("{writer}-{op}");
                let n = rng.gen_range(0..3u64);
                let condition = if writer % 2 == 1 {
                    let started = Instant::now();
                    let decision = store.project(StateProjector::counter(slot(n))).await;
                    slowest_read = slowest_read.max(started.elapsed());
                    match decision {
                        Ok(d) => Some(d.condition),
                        Err(err) => panic!("call {id}: decision read failed: {err}"),
                    }
                } else {
                    None
                };
                let call = {
                    let store = store.clone();
                    let condition = condition.clone();
                    let event = booked(&id, n);
                    async move {
                        match condition {
                            Some(c) => store.append_if(vec![event], c).await,
                            None => store.append(vec![event]).await,
                        }
                    }
                };
                let reported = if rng.gen_bool(0.25) {
                    let patience = Duration::from_micros(rng.gen_range(0..3000));
                    tokio::select! {
                        result = call => classify(&result),
                        _ = tokio::time::sleep(patience) => Ok(Reported::Unknown("dropped".into())),
                    }
                } else {
                    classify(&call.await)
                };
                let reported =
                    reported.unwrap_or_else(|err| panic!("call {id}: untruthful result: {err}"));
                calls.push(AppendCall {
                    id,
                    size: 1,
                    condition,
                    reported,
                });
            }
            (calls, slowest_read)
        }));
    }
    let mut calls = Vec::new();
    let mut slowest = Duration::ZERO;
    for handle in handles {
        let (mine, read) = handle.await.expect("writer");
        calls.extend(mine);
        slowest = slowest.max(read);
    }
    (calls, slowest)
}

/// The log as the table holds it, read with a store of ordinary timeouts, cross-checked with
/// a raw count.
async fn the_log(ts: &TestStore) -> Vec<dcb_core::Event> {
    let reader = PostgresEventStore::connect(
        &ts.schema.url,
        StoreConfig::default().schema(ts.schema.schema.clone()),
    )
    .await
    .expect("reader");
    let log = reader
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("whole log");
    let raw: i64 = ts
        .admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {}", ts.table("events")), &[])
        .await
        .expect("raw count")
        .get(0);
    assert_eq!(
        log.len() as i64,
        raw,
        "the store reads every row of the table"
    );
    log
}

/// No session of the store is left inside a transaction or holding an advisory lock while idle.
async fn assert_nothing_left_behind(ts: &TestStore, name: &str) {
    let admin = ts.admin().await;
    // Abandoned connections close asynchronously; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = admin
            .query_one(
                "SELECT count(*) FILTER (WHERE a.state LIKE 'idle in transaction%'), \
                        (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity b ON b.pid = l.pid \
                          WHERE l.locktype = 'advisory' AND b.application_name = $1 \
                            AND b.state <> 'active') \
                 FROM pg_stat_activity a WHERE a.application_name = $1",
                &[&name],
            )
            .await
            .expect("sessions");
        let (in_tx, locks): (i64, i64) = (row.get(0), row.get(1));
        if in_tx == 0 && locks == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{in_tx} sessions idle in a transaction, {locks} advisory locks held by idle sessions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As many later decisions as the pool has connections, at once, so every pooled connection
/// is used: none may wait on a lock left behind or meet a transaction or a reply of the storm.
async fn a_later_call_works(store: &PostgresEventStore, connections: usize) {
    let barrier = Arc::new(Barrier::new(connections));
    let mut handles = Vec::new();
    for task in 0..connections {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let n = (task % 3) as u64;
            barrier.wait().await;
            let mut tries = 0;
            loop {
                tries += 1;
                let started = Instant::now();
                let d = store
                    .project(StateProjector::counter(slot(n)))
                    .await
                    .expect("a later decision read");
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "a later read waited {:?}: a lock outlived its operation",
                    started.elapsed()
                );
                match store
                    .append_if(
                        vec![booked(&format!("later-{task}-{tries}"), n)],
                        d.condition,
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(Error::Timeout { .. } | Error::Conflict(_)) if tries < 100 => continue,
                    Err(err) => panic!("a later append on slot {n}: {err}"),
                }
            }
        }));
    }
    for handle in handles {
        handle.await.expect("later call");
    }
}

async fn appends_with_a_1ms_timeout(isolation: IsolationLevel, name: &str, seed: u64) {
    let config = StoreConfig::default()
        .append_timeout(Duration::from_millis(1))
        .append_isolation(isolation)
        .pool_size(6);
    let ts = store_named(config, name).await;
    let (calls, slowest_read) = storm(&ts, seed).await;
    assert!(
        slowest_read < Duration::from_secs(10),
        "a decision read took {slowest_read:?}: it waited on a lock left behind"
    );
    let log = the_log(&ts).await;
    check_log(&calls, &log);
    let count = |f: fn(&Reported) -> bool| calls.iter().filter(|c| f(&c.reported)).count();
    let written = count(|r| matches!(r, Reported::Written(_)));
    let nothing = count(|r| matches!(r, Reported::NothingWritten(_)));
    let unknown = count(|r| matches!(r, Reported::Unknown(_)));
    eprintln!("{name}: {written} written, {nothing} certainly not, {unknown} unknown or dropped");
    assert!(written > 0, "some appends must succeed");
    assert_nothing_left_behind(&ts, name).await;
    a_later_call_works(&ts, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_with_a_1ms_timeout_tell_the_truth() {
    appends_with_a_1ms_timeout(IsolationLevel::ReadCommitted, "crablet_t_1ms_rc", 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_with_a_1ms_timeout_tell_the_truth_under_serializable() {
    appends_with_a_1ms_timeout(IsolationLevel::Serializable, "crablet_t_1ms_ser", 23).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_with_a_1ms_timeout_tell_the_truth_under_repeatable_read() {
    appends_with_a_1ms_timeout(IsolationLevel::RepeatableRead, "crablet_t_1ms_rr", 37).await;
}

/// Reads with a 20 ms `query_timeout` beside writers (about half of them time out here): a read returns its events or
/// `Error::Timeout`, never anything else; the writers never meet what a read left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_with_a_tiny_timeout_leave_nothing_behind() {
    let name = "crablet_t_1ms_reads";
    let ts = store_named(
        StoreConfig::default()
            .query_timeout(Duration::from_millis(20))
            .pool_size(6),
        name,
    )
    .await;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut handles = Vec::new();
    for task in 0..WRITERS {
        let store = ts.store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(31 + task as u64);
            let (mut reads, mut timeouts, mut appends) = (0, 0, 0);
            barrier.wait().await;
            let end = Instant::now() + STORM;
            let mut op = 0;
            while Instant::now() < end {
                op += 1;
                let n = rng.gen_range(0..3u64);
                if task % 2 == 0 {
                    store
                        .append(vec![booked(&format!("{task}-{op}"), n)])
                        .await
                        .unwrap_or_else(|err| panic!("append beside tiny reads: {err}"));
                    appends += 1;
                    continue;
                }
                let read = async {
                    if rng.gen_bool(0.5) {
                        store
                            .query(&slot(n), ReadOptions::default())
                            .await
                            .map(|_| ())
                    } else {
                        use futures_util::TryStreamExt;
                        store
                            .query_stream(&slot(n), ReadOptions::default())
                            .try_collect::<Vec<_>>()
                            .await
                            .map(|_| ())
                    }
                };
                match read.await {
                    Ok(()) => reads += 1,
                    Err(Error::Timeout { .. }) => timeouts += 1,
                    Err(err) => panic!("a read with a tiny timeout failed otherwise: {err}"),
                }
            }
            (reads, timeouts, appends)
        }));
    }
    let (mut reads, mut timeouts, mut appends) = (0, 0, 0);
    for handle in handles {
        let (r, t, a) = handle.await.expect("task");
        reads += r;
        timeouts += t;
        appends += a;
    }
    eprintln!("{reads} reads, {timeouts} timed out, {appends} appends");
    assert!(appends > 0);
    assert_nothing_left_behind(&ts, name).await;
}

/// `connect` runs its checks without the append timeout: a 1 ms `append_timeout` connects.
#[tokio::test]
async fn a_1ms_append_timeout_does_not_break_connect() {
    let ts = test_store(StoreConfig::default()).await;
    for _ in 0..10 {
        let store = PostgresEventStore::connect(
            &ts.schema.url,
            StoreConfig::default()
                .schema(ts.schema.schema.clone())
                .append_timeout(Duration::from_millis(1)),
        )
        .await
        .expect("connect with a 1 ms append timeout");
        store
            .query(&Query::all(), ReadOptions::default())
            .await
            .expect("read");
    }
}

/// A lock wait past `append_timeout` is a certain timeout, on both append paths: nothing was
/// written, the error says so, and the store carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_wait_past_the_timeout_is_a_certain_timeout() {
    let ts = test_store(StoreConfig::default().append_timeout(Duration::from_millis(200))).await;
    // A conditional append on slot 0, stuck after taking its keys (exclusive on the slot).
    // Its own store: it waits on the brake longer than the tested store's timeout.
    let brake = support::install_brake(&ts, 0x7100_0001).await;
    let store = PostgresEventStore::connect(
        &ts.schema.url,
        StoreConfig::default().schema(ts.schema.schema.clone()),
    )
    .await
    .expect("holder's store");
    let holder = tokio::spawn(async move {
        store
            .append_if(
                vec![NewEvent::new(
                    "Slow",
                    vec![Tag::new("slot", "0")],
                    json!({ "op": "holder" }),
                )],
                AppendCondition::new(slot(0)),
            )
            .await
    });
    let admin = ts.admin().await;
    while admin
        .query_one(
            // The holder waits on the brake: past its own locks, inside its insert.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND classid = 0 AND objid = 1895825409",
            &[],
        )
        .await
        .expect("locks")
        .get::<_, i64>(0)
        < 1
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let plain = ts.append(vec![booked("plain", 0)]).await;
    assert!(
        matches!(plain, Err(Error::Timeout { .. })),
        "an unconditional append past its lock timeout: {plain:?}"
    );
    let conditional = ts
        .append_if(
            vec![booked("conditional", 0)],
            AppendCondition::new(slot(1)),
        )
        .await;
    assert!(
        matches!(conditional, Err(Error::Timeout { .. })),
        "a conditional append past its lock timeout: {conditional:?}"
    );
    drop(brake);
    holder
        .await
        .expect("holder")
        .expect("the held append commits");
    ts.append(vec![booked("next", 0)])
        .await
        .expect("next append");
    let ops: Vec<String> = the_log(&ts)
        .await
        .iter()
        .map(|e| e.data["op"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ops,
        ["holder", "next"],
        "the timed-out appends wrote nothing"
    );
}
