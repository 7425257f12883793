//! Store sessions: the application's statements and the store's appends in one transaction,
//! with every guarantee of plain appends (docs/transactions.md).
mod support;

use dcb_core::{
    AppendCondition, Error, Event, EventReader, EventStore, NewEvent, Query, QueryItem, ReadOptions,
};
use dcb_postgres::StoreConfig;
use std::sync::Arc;
use std::time::Duration;
use support::{test_store, TestStore};
use tokio::sync::Barrier;

fn event(t: &str, key: &str, id: &str) -> NewEvent {
    NewEvent::builder(t).tag(key, id).build().expect("event")
}

fn of(key: &str, id: &str) -> Query {
    Query::from(QueryItem::new().tag(key, id))
}

fn types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

/// The application's own table in the test's schema.
async fn outbox(ts: &TestStore) -> String {
    let table = ts.table("outbox");
    ts.admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (id serial PRIMARY KEY, message text NOT NULL)"
        ))
        .await
        .expect("outbox table");
    table
}

async fn count(ts: &TestStore, table: &str) -> i64 {
    ts.admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_and_the_applications_rows_commit_together() {
    let ts = test_store(StoreConfig::default()).await;
    let outbox = outbox(&ts).await;
    let mut session = ts.begin_session().await.expect("session");
    // The second append writes another type: its keys are taken up front, before the
    // session's transaction gets an id with its first insert.
    session
        .reserve_events(&[event("ShipmentRequested", "order", "o1")])
        .await
        .expect("reserve");
    let first = session
        .append_if(
            vec![event("OrderPaid", "order", "o1")],
            AppendCondition::new(of("order", "o1")),
        )
        .await
        .expect("append_if");
    let second = session
        .append(vec![event("ShipmentRequested", "order", "o1")])
        .await
        .expect("append");
    assert!(first < second);
    session
        .client()
        .execute(
            &format!("INSERT INTO {outbox} (message) VALUES ($1)"),
            &[&format!("paid at {first}")],
        )
        .await
        .expect("own row");
    // The session reads its own appends; nobody else sees them yet.
    let inside = session
        .query(&of("order", "o1"), ReadOptions::default())
        .await
        .expect("read inside");
    assert_eq!(types(&inside), ["OrderPaid", "ShipmentRequested"]);
    let outside = ts.store.clone();
    let read_outside = tokio::spawn(async move {
        outside
            .query(&Query::types(["Unrelated"]), ReadOptions::default())
            .await
    });
    assert!(read_outside.await.expect("join").expect("read").is_empty());
    assert_eq!(count(&ts, &outbox).await, 0);

    session.commit().await.expect("commit");
    let all = ts
        .query(&of("order", "o1"), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(
        all.iter().map(|e| e.cursor).collect::<Vec<_>>(),
        [first, second]
    );
    assert_eq!(count(&ts, &outbox).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_or_dropped_session_leaves_nothing_and_releases_its_locks() {
    let ts = test_store(StoreConfig::default()).await;
    let outbox = outbox(&ts).await;
    for drop_it in [false, true] {
        let mut session = ts.begin_session().await.expect("session");
        session
            .append_if(
                vec![event("Reserved", "seat", "s1")],
                AppendCondition::new(of("seat", "s1")),
            )
            .await
            .expect("append_if");
        session
            .client()
            .execute(&format!("INSERT INTO {outbox} (message) VALUES ('x')"), &[])
            .await
            .expect("own row");
        if drop_it {
            drop(session);
        } else {
            session.rollback().await.expect("rollback");
        }
        // The boundary is free at once: a decision on it neither waits nor conflicts.
        let decided = tokio::time::timeout(
            Duration::from_secs(5),
            ts.append_if(
                vec![event("Probe", "seat", format!("probe-{drop_it}").as_str())],
                AppendCondition::new(of("seat", "s1")),
            ),
        )
        .await
        .expect("the session's locks were released");
        decided.expect("nothing of the session stayed");
    }
    let left = ts
        .query(&Query::types(["Reserved"]), ReadOptions::default())
        .await
        .expect("read");
    assert!(left.is_empty());
    assert_eq!(count(&ts, &outbox).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_after_the_applications_own_write_is_refused_unless_reserved() {
    let ts = test_store(StoreConfig::default()).await;
    let outbox = outbox(&ts).await;
    let insert = format!("INSERT INTO {outbox} (message) VALUES ('first')");

    let mut session = ts.begin_session().await.expect("session");
    session
        .client()
        .execute(&insert, &[])
        .await
        .expect("own row");
    let refused = session
        .append(vec![event("Late", "k", "v")])
        .await
        .expect_err("the transaction already has an id");
    match &refused {
        Error::Session { operation, reason } => {
            assert_eq!(*operation, "append");
            assert!(reason.contains("reserve"), "{reason}");
        }
        other => panic!("expected Error::Session, got {other:?}"),
    }
    // Nothing of the append, and the session goes on: its own row commits.
    session.commit().await.expect("commit");
    assert_eq!(count(&ts, &outbox).await, 1);
    assert!(ts
        .query(&Query::types(["Late"]), ReadOptions::default())
        .await
        .expect("read")
        .is_empty());

    // Reserved first, the same order works.
    let planned = vec![event("Late", "k", "v")];
    let mut session = ts.begin_session().await.expect("session");
    session
        .reserve_events(&planned)
        .await
        .expect("reserve events");
    session
        .reserve_query(&of("k", "v"))
        .await
        .expect("reserve query");
    session
        .client()
        .execute(&insert, &[])
        .await
        .expect("own row");
    session
        .append_if(planned, AppendCondition::new(of("k", "v")))
        .await
        .expect("reserved append_if");
    // Keys it did not reserve are still refused.
    assert!(matches!(
        session.append(vec![event("Other", "k", "w")]).await,
        Err(Error::Session { .. })
    ));
    session.commit().await.expect("commit");
    assert_eq!(count(&ts, &outbox).await, 2);
    let late = ts
        .query(&Query::types(["Late"]), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(late.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_sessions_on_one_boundary_have_one_winner() {
    let ts = test_store(StoreConfig::default()).await;
    let outbox = outbox(&ts).await;
    const RACERS: usize = 8;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = ts.store.clone();
        let barrier = Arc::clone(&barrier);
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut session = store.begin_session().await.expect("session");
            // The decision: the username is free.
            let seen = session
                .query(&of("username", "ada"), ReadOptions::default())
                .await
                .expect("decision read");
            assert!(seen.is_empty());
            barrier.wait().await;
            let claimed = session
                .append_if(
                    vec![event("UsernameClaimed", "username", "ada")],
                    AppendCondition::new(of("username", "ada")),
                )
                .await;
            match claimed {
                Ok(_) => {
                    session
                        .client()
                        .execute(
                            &format!("INSERT INTO {outbox} (message) VALUES ($1)"),
                            &[&format!("welcome {i}")],
                        )
                        .await
                        .expect("own row");
                    session.commit().await.expect("commit");
                    true
                }
                Err(err) => {
                    assert!(err.is_conflict(), "{err:?}");
                    session.rollback().await.expect("rollback");
                    false
                }
            }
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.expect("join"));
    }
    assert_eq!(winners, 1);
    let claims = ts
        .query(&Query::types(["UsernameClaimed"]), ReadOptions::default())
        .await
        .expect("read");
    assert_eq!(claims.len(), 1);
    assert_eq!(count(&ts, &outbox).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_committing_last_with_the_lower_id_is_never_skipped() {
    let ts = test_store(StoreConfig::default()).await;
    // The session appends first: its transaction gets the LOWER id, and stays open.
    let mut session = ts.begin_session().await.expect("session");
    let early = session
        .append(vec![event("Slow", "stream", "s")])
        .await
        .expect("session append");
    // A plain append of the same boundary commits first, with a higher id.
    let late = ts
        .append(vec![event("Fast", "stream", "s")])
        .await
        .expect("plain append");
    assert!(early < late);
    // A follower of the boundary must not return the plain append alone: it waits.
    let follower = {
        let store = ts.store.clone();
        tokio::spawn(async move {
            store
                .query(&of("stream", "s"), ReadOptions::default())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !follower.is_finished(),
        "the read returned while the session's append was in flight"
    );
    session.commit().await.expect("commit");
    let seen = follower.await.expect("join").expect("read");
    assert_eq!(
        types(&seen),
        ["Slow", "Fast"],
        "cursor order, nothing skipped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_session_does_not_block_disjoint_boundaries() {
    let ts = test_store(StoreConfig::default()).await;
    let mut session = ts.begin_session().await.expect("session");
    session
        .append_if(
            vec![event("CourseDefined", "course", "c1")],
            AppendCondition::new(of("course", "c1")),
        )
        .await
        .expect("session append_if");
    // While it stays open: decisions and reads of another course go through.
    let other = async {
        let seen = ts
            .query(&of("course", "c2"), ReadOptions::default())
            .await?;
        assert!(seen.is_empty());
        ts.append_if(
            vec![event("CourseDefined", "course", "c2")],
            AppendCondition::new(of("course", "c2")),
        )
        .await?;
        ts.append(vec![event("StudentRegistered", "student", "s1")])
            .await
    };
    tokio::time::timeout(Duration::from_secs(5), other)
        .await
        .expect("disjoint boundaries are not blocked by the session")
        .expect("appends");
    session.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_append_fails_the_session_instead_of_committing_later() {
    let ts = test_store(StoreConfig::default()).await;
    // Another session holds the boundary, so this session's append waits on its lock.
    let mut holder = ts.begin_session().await.expect("holder");
    holder
        .append_if(
            vec![event("Held", "room", "r1")],
            AppendCondition::new(of("room", "r1")),
        )
        .await
        .expect("holder append");
    let mut session = ts.begin_session().await.expect("session");
    let attempt = tokio::time::timeout(
        Duration::from_millis(200),
        session.append_if(
            vec![event("Abandoned", "room", "r1")],
            AppendCondition::new(of("room", "r1")),
        ),
    )
    .await;
    assert!(attempt.is_err(), "the append waited for the holder");
    // The abandoned statement may still run: the session refuses to commit.
    let refused = session.commit().await.expect_err("a failed session");
    assert!(refused.to_string().contains("aborted"), "{refused}");
    holder.rollback().await.expect("rollback");
    // Nothing of the abandoned append ever appears, and the boundary is free.
    tokio::time::timeout(
        Duration::from_secs(5),
        ts.append_if(
            vec![event("Free", "room", "r1")],
            AppendCondition::new(of("room", "r1")),
        ),
    )
    .await
    .expect("no lock left behind")
    .expect("no event left behind");
}
