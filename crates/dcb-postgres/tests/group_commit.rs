//! Group commit: concurrent appends share transactions, each keeps its own outcome, and a
//! group is all or nothing in the face of failures.
mod support;

use dcb_core::{
    AppendCommand, AppendCondition, Error, EventReader, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, Tag,
};
use dcb_postgres::StoreConfig;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{install_brake, test_store, TestStore};
use tokio::sync::Barrier;

fn booked(slot: &str, op: &str) -> NewEvent {
    NewEvent::new("Booked", vec![Tag::new("slot", slot)], json!({ "op": op }))
}

fn slot(s: &str) -> Query {
    Query::from(QueryItem::new().types(["Booked"]).tag("slot", s))
}

fn ops(events: &[dcb_core::Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data["op"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn all(ts: &TestStore) -> Vec<dcb_core::Event> {
    ts.query(&Query::all(), ReadOptions::default())
        .await
        .expect("log")
}

/// An event the brake holds up (see `support::install_brake`).
fn slow(op: &str) -> NewEvent {
    NewEvent::new("Slow", vec![], json!({ "op": op }))
}

/// Spawns an append of one braked event.
fn spawn_slow(
    ts: &TestStore,
    op: &'static str,
) -> tokio::task::JoinHandle<Result<dcb_core::Cursor, Error>> {
    let store = ts.store.clone();
    tokio::spawn(async move { store.append(vec![slow(op)]).await })
}

/// Waits until a backend of the test database waits on the brake's advisory lock; returns its pid.
async fn stuck_on_brake(ts: &TestStore, brake: i64) -> i32 {
    let admin = ts.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND classid = 0 AND objid = $1::int8::oid",
                &[&brake],
            )
            .await
            .expect("locks");
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(Instant::now() < deadline, "nothing got stuck on the brake");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Gives spawned calls time to reach the queue behind the one flusher, in order.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Under concurrency appends share transactions (fewer transaction ids than appends); with
/// group commit off, every append is its own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_transactions_unless_turned_off() {
    for (max, shared) in [(32, true), (1, false)] {
        let ts = test_store(StoreConfig::default().group_commit_max(max)).await;
        let barrier = Arc::new(Barrier::new(16));
        let mut handles = Vec::new();
        for client in 0..16 {
            let store = ts.store.clone();
            let barrier = barrier.clone();
            handles.push(tokio::spawn(async move {
                barrier.wait().await;
                for n in 0..20 {
                    store
                        .append(vec![booked(
                            &format!("s{client}"),
                            &format!("{client}-{n}"),
                        )])
                        .await
                        .expect("append");
                }
            }));
        }
        for h in handles {
            h.await.expect("client");
        }
        let log = all(&ts).await;
        assert_eq!(log.len(), 320);
        let transactions: BTreeSet<u64> = log.iter().map(|e| e.cursor.transaction_id).collect();
        if shared {
            assert!(
                transactions.len() < log.len(),
                "16 concurrent clients never shared a transaction"
            );
        } else {
            assert_eq!(transactions.len(), log.len(), "group commit off");
        }
    }
}

/// One flusher, stuck on a first append; the calls queued behind it form one group: the clean
/// ones commit together (one transaction id, in queue order), the one whose condition fails
/// gets its own conflict, and the one depending on an earlier call of the group is deferred and
/// conflicts as if they had run one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_keeps_each_calls_outcome() {
    let ts = test_store(
        StoreConfig::default()
            .group_commit_flushers(1)
            // One connection: while the first group is stuck no other flusher can start, so the
            // calls queued behind it form one group.
            .pool_size(1)
            .append_timeout(Duration::from_secs(20)),
    )
    .await;
    let taken = ts
        .append(vec![booked("taken", "before")])
        .await
        .expect("seed");
    let brake = install_brake(&ts, 0x6c00_0001).await;
    let first = spawn_slow(&ts, "first");
    stuck_on_brake(&ts, 0x6c00_0001).await;
    let call = |op: &'static str, s: &'static str, condition: Option<AppendCondition>| {
        let store = ts.store.clone();
        tokio::spawn(async move {
            match condition {
                Some(c) => store.append_if(vec![booked(s, op)], c).await,
                None => store.append(vec![booked(s, op)]).await,
            }
        })
    };
    let fresh = |s: &str| Some(AppendCondition::new(slot(s)));
    let a = call("a", "a", fresh("a"));
    settle().await;
    let b = call("b", "b", None);
    settle().await;
    let stale = call("stale", "taken", fresh("taken"));
    settle().await;
    let c = call("c", "c", fresh("c"));
    settle().await;
    // Depends on `a`, queued earlier: deferred to the next group, where it conflicts.
    let after_a = call("after-a", "a2", fresh("a"));
    settle().await;
    drop(brake);
    first
        .await
        .expect("first")
        .expect("the stuck append commits");
    let a = a.await.expect("a").expect("a commits");
    let b = b.await.expect("b").expect("b commits");
    let c = c.await.expect("c").expect("c commits");
    match stale.await.expect("stale") {
        Err(Error::Conflict(info)) => assert_eq!(info.conflicting, Some(taken)),
        other => panic!("a stale condition in a group: {other:?}"),
    }
    match after_a.await.expect("after-a") {
        Err(Error::Conflict(info)) => assert_eq!(info.conflicting, Some(a)),
        other => panic!("a call depending on an earlier one of its group: {other:?}"),
    }
    assert_eq!(
        (a.transaction_id, b.transaction_id),
        (c.transaction_id, c.transaction_id),
        "a, b and c were one group"
    );
    assert!(a < b && b < c, "queue order: {a} {b} {c}");
    assert_eq!(ops(&all(&ts).await), ["before", "first", "a", "b", "c"]);
}

/// A group whose backend is killed mid-statement: no call is acknowledged, none is stored,
/// none claims a certain outcome it does not have, and the store carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_group_acknowledges_nothing_and_stores_nothing() {
    let ts = test_store(
        StoreConfig::default()
            .group_commit_flushers(1)
            // One connection: while the first group is stuck no other flusher can start, so the
            // calls queued behind it form one group.
            .pool_size(1)
            .append_timeout(Duration::from_secs(20)),
    )
    .await;
    let brake = install_brake(&ts, 0x6c00_0002).await;
    let first = spawn_slow(&ts, "first");
    let pid = stuck_on_brake(&ts, 0x6c00_0002).await;
    let group: Vec<_> = ["g1", "g2", "g3"]
        .into_iter()
        .map(|op| {
            let store = ts.store.clone();
            tokio::spawn(async move {
                if op == "g1" {
                    store.append(vec![slow(op)]).await
                } else {
                    store.append(vec![booked(op, op)]).await
                }
            })
        })
        .collect();
    settle().await;
    let admin = ts.admin().await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("kill the first");
    assert!(first.await.expect("first").is_err());
    let pid = stuck_on_brake(&ts, 0x6c00_0002).await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("kill the group");
    for call in group {
        match call.await.expect("call") {
            Ok(cursor) => panic!("acknowledged {cursor} although its group was killed"),
            Err(Error::Storage { .. }) => {}
            Err(other) => panic!("a killed group must not claim a certain outcome: {other:?}"),
        }
    }
    drop(brake);
    assert!(
        ops(&all(&ts).await).is_empty(),
        "nothing of the killed groups"
    );
    ts.append(vec![booked("z", "after")])
        .await
        .expect("the store carries on");
    assert_eq!(ops(&all(&ts).await), ["after"]);
}

/// A call still queued when its deadline passes is taken out: a certain timeout, nothing
/// written, although the flush it waited for commits later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_timing_out_in_the_queue_certainly_wrote_nothing() {
    let ts = test_store(
        StoreConfig::default()
            .group_commit_flushers(1)
            // One connection: while the first group is stuck no other flusher can start, so the
            // calls queued behind it form one group.
            .pool_size(1)
            .append_timeout(Duration::from_millis(100)),
    )
    .await;
    // The store's only flusher is busy for 0.8 s with a slow (not waiting) statement.
    ts.admin()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.type = 'Sleepy' THEN PERFORM pg_sleep(0.8); END IF; RETURN NEW; END $$; \
             CREATE TRIGGER sleepy AFTER INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {f}();",
            f = ts.table("sleepy"),
            t = ts.table("events"),
        ))
        .await
        .expect("sleepy trigger");
    let sleepy = |op: &'static str| {
        let store = ts.store.clone();
        tokio::spawn(async move {
            store
                .append(vec![NewEvent::new(
                    "Sleepy",
                    vec![Tag::new("slot", "q")],
                    json!({ "op": op }),
                )])
                .await
        })
    };
    // The flusher is busy with the first; the second waits; the queued call depends on the
    // second (its condition matches it), so it waits for a group after the second's.
    let first = sleepy("s1");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = sleepy("s2");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let depends = AppendCondition::new(Query::from(
        QueryItem::new().types(["Sleepy"]).tag("slot", "q"),
    ));
    let queued = ts.append_if(vec![booked("q", "queued")], depends).await;
    assert!(
        matches!(queued, Err(Error::Timeout { .. })),
        "a call that never left the queue: {queued:?}"
    );
    for call in [first, second] {
        match call.await.expect("sleepy") {
            Err(Error::Storage {
                outcome_unknown: true,
                ..
            }) => {}
            other => panic!("a flush past the client deadline has an unknown outcome: {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !ops(&all(&ts).await).contains(&"queued".to_string()),
        "the timed-out call wrote nothing"
    );
}

/// A group stuck on a lock (here a brake; in production another transaction's locks) does not
/// hold up the store: barrier-synchronized appends and conditional appends on other boundaries
/// all commit while it waits, through flushers started because the queue stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_group_does_not_hold_up_other_boundaries() {
    let ts = test_store(StoreConfig::default().append_timeout(Duration::from_secs(20))).await;
    let brake = install_brake(&ts, 0x6c00_0004).await;
    let stuck = spawn_slow(&ts, "stuck");
    stuck_on_brake(&ts, 0x6c00_0004).await;
    let barrier = Arc::new(Barrier::new(8));
    let others: Vec<_> = (0..8)
        .map(|n| {
            let store = ts.store.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let s = format!("free-{n}");
                let event = booked(&s, &s);
                if n % 2 == 0 {
                    store.append(vec![event]).await
                } else {
                    store
                        .append_if(vec![event], AppendCondition::new(slot(&s)))
                        .await
                }
            })
        })
        .collect();
    for other in others {
        tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .expect("an append on another boundary waited for the stuck group")
            .expect("join")
            .expect("append");
    }
    assert!(!stuck.is_finished(), "the stuck append is still waiting");
    drop(brake);
    stuck
        .await
        .expect("join")
        .expect("the stuck append commits");
    assert_eq!(all(&ts).await.len(), 9);
}

/// A multi-command append whose backend is killed mid-statement acknowledges nothing and
/// stores none of its commands (the last one is braked, so the earlier ones were already
/// inserted when it died).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_multi_command_append_stores_nothing() {
    let ts = test_store(StoreConfig::default().append_timeout(Duration::from_secs(20))).await;
    let brake = install_brake(&ts, 0x6c00_0005).await;
    let store = ts.store.clone();
    let batch = tokio::spawn(async move {
        let mut commands: Vec<AppendCommand> = (0..5)
            .map(|n| {
                let s = format!("k{n}");
                AppendCommand::new(vec![booked(&s, &s)]).only_if(AppendCondition::new(slot(&s)))
            })
            .collect();
        commands.push(AppendCommand::new(vec![slow("last")]));
        store.append_batch(commands).await
    });
    let pid = stuck_on_brake(&ts, 0x6c00_0005).await;
    ts.admin()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("kill the batch");
    match batch.await.expect("join") {
        Ok(cursors) => panic!("acknowledged {cursors:?} although the batch was killed"),
        Err(Error::Storage { .. }) => {}
        Err(other) => panic!("a killed batch must not claim a certain outcome: {other:?}"),
    }
    drop(brake);
    assert!(all(&ts).await.is_empty(), "no command of the batch stored");
    ts.append_batch(vec![AppendCommand::new(vec![booked("after", "after")])])
        .await
        .expect("the store carries on");
}

/// A batch past the key bound (300 conditional commands, about 1,500 keys) escalates to the two
/// coarse keys and keeps its semantics: it commits when every condition holds, and one stale
/// command stops all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_past_the_key_bound_escalates_and_keeps_its_semantics() {
    let ts = test_store(StoreConfig::default()).await;
    let commands = |prefix: &str| -> Vec<AppendCommand> {
        (0..300)
            .map(|n| {
                let s = format!("{prefix}{n}");
                AppendCommand::new(vec![booked(&s, &s)]).only_if(AppendCondition::new(slot(&s)))
            })
            .collect()
    };
    let cursors = ts.append_batch(commands("a")).await.expect("300 commands");
    assert_eq!(cursors.len(), 300);
    let mut stale = commands("b");
    stale[299] =
        AppendCommand::new(vec![booked("b299", "b299")]).only_if(AppendCondition::new(slot("a7")));
    match ts.append_batch(stale).await {
        Err(Error::Conflict(info)) => assert_eq!(info.command, Some(299), "{info}"),
        other => panic!("a stale command must stop the batch: {other:?}"),
    }
    assert_eq!(all(&ts).await.len(), 300, "the stale batch wrote nothing");
}

/// A group without conditions is one statement that takes its locks first: while it waits for
/// a lock, it has no transaction id yet (so a conditional append that holds the lock and commits
/// first lands before it in cursor order, docs/design.md "Why it is exact", point 2). Racers
/// released by a barrier pile up behind a session holding their boundary's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_waiting_for_its_locks_has_no_transaction_id() {
    let ts = test_store(StoreConfig::default()).await;
    let mut session = ts.store.begin_session().await.expect("session");
    session.reserve_query(&slot("held")).await.expect("reserve");
    let racers = 8;
    let barrier = Arc::new(Barrier::new(racers));
    let mut handles = Vec::new();
    for n in 0..racers {
        let store = ts.store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store.append(vec![booked("held", &format!("r{n}"))]).await
        }));
    }
    let admin = ts.admin().await;
    // This test's appends (other tests of the database wait on advisory locks too).
    let events = ts.table("events");
    let waiting_sql = "SELECT a.pid, a.backend_xid IS NULL FROM pg_stat_activity a \
                       WHERE a.datname = current_database() AND position($1 in a.query) > 0 \
                       AND a.pid IN \
                       (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)";
    // The racers' groups get stuck (one group of all of them, or a first one and, after the
    // stall interval, a second flusher's group of the rest).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = admin
            .query(waiting_sql, &[&events])
            .await
            .expect("activity");
        if !rows.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no racer waits for the session's keys"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the stall interval, so that a second flusher had its chance to get stuck too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiting = admin
        .query(waiting_sql, &[&events])
        .await
        .expect("activity");
    assert!(!waiting.is_empty(), "the racers stopped waiting");
    for row in &waiting {
        let (pid, no_xid): (i32, bool) = (row.get(0), row.get(1));
        assert!(
            no_xid,
            "backend {pid} waits for a lock with a transaction id"
        );
    }
    session.rollback().await.expect("rollback");
    for h in handles {
        h.await.expect("racer").expect("append");
    }
    let log = all(&ts).await;
    assert_eq!(log.len(), racers);
    let transactions: BTreeSet<u64> = log.iter().map(|e| e.cursor.transaction_id).collect();
    assert!(
        transactions.len() < racers,
        "the racers never shared a transaction: {transactions:?}"
    );
}
