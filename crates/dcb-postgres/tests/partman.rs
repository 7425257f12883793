//! pg_partman managing the partitions of a crablet-partitioned log: crablet's appends, reads
//! and conditions keep working across partitions pg_partman made, and crablet still creates
//! the partitions pg_partman has not made yet. Runs when the server can install the
//! extension (`postgresql-<major>-partman`), with a notice otherwise.
//!
//! The test gets a database of its own (pg_partman is installed once per database), creates
//! the extension in the store's schema there, and drops the extension and the database at the
//! end.

use dcb_core::{
    AppendCondition, Error, EventReader, EventStore, NewEvent, Query, QueryItem, ReadOptions, Tag,
};
use dcb_postgres::{PartitionConfig, PartitionInfo, PostgresEventStore, StoreConfig};
use dcb_testkit::pg::TestDb;
use serde_json::json;

fn course(id: usize) -> NewEvent {
    NewEvent::new(
        "CourseDefined",
        vec![Tag::new("course", id.to_string())],
        json!({ "course": id }),
    )
}

fn defined(id: usize) -> AppendCondition {
    AppendCondition::new(Query::from(
        QueryItem::new()
            .types(["CourseDefined"])
            .tag("course", id.to_string()),
    ))
}

/// Partitions with no gap between neighbours.
fn check_contiguous(partitions: &[PartitionInfo]) {
    for pair in partitions.windows(2) {
        assert_eq!(
            pair[0].to,
            pair[1].from.expect("only the first is unbounded below"),
            "gap in {partitions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_partman_4_manages_a_crablet_log_and_crablet_fills_what_it_misses() {
    let db = TestDb::new().await;
    let admin = db.connect().await.expect("admin connection");
    let available: Option<String> = admin
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .ok();
    let Some(version) = available else {
        eprintln!(
            "notice: skipping pg_partman_4_manages_a_crablet_log_and_crablet_fills_what_it_misses: \
             pg_partman is not installed on the server (apt-get install postgresql-<major>-partman)"
        );
        drop(admin);
        db.drop_now().await.expect("drop the test database");
        return;
    };
    if !version.starts_with("4.") {
        eprintln!(
            "notice: skipping pg_partman_4_manages_a_crablet_log_and_crablet_fills_what_it_misses: \
             pg_partman {version} is installed, the test drives the 4.x interface"
        );
        drop(admin);
        db.drop_now().await.expect("drop the test database");
        return;
    }
    let schema = "shop";
    let store = PostgresEventStore::connect(
        &db.url,
        StoreConfig::default().schema(schema).auto_migrate(true),
    )
    .await
    .expect("connect");
    // An empty store: events_p0 is [MINVALUE, 200), events_p200 [200, 300) is ahead.
    store
        .partition(PartitionConfig::new(100).ahead(1))
        .await
        .expect("partition");

    // pg_partman starts after crablet's partitions (left alone, it starts at the partition of
    // the newest position, which crablet's first partition [MINVALUE, 200) overlaps). Its
    // naming is crablet's (`events_p<from>`), with the same interval. Its DEFAULT partition is
    // dropped: rows in it would block creating the partition that covers them, and DETACH …
    // CONCURRENTLY refuses a table that has one.
    let start = store
        .partitions()
        .await
        .expect("partitions")
        .last()
        .expect("partitions")
        .to;
    admin
        .batch_execute(&format!(
            "CREATE EXTENSION pg_partman SCHEMA {schema}; \
             SELECT {schema}.create_parent(p_parent_table := '{schema}.events', \
                 p_control := 'position', p_type := 'native', p_interval := '100', \
                 p_premake := 2, p_start_partition := '{start}'); \
             DROP TABLE {schema}.events_default"
        ))
        .await
        .unwrap_or_else(|e| panic!("pg_partman create_parent: {e:?}"));
    let registered = store.partitions().await.expect("partitions");
    eprintln!("after create_parent: {registered:?}");
    check_contiguous(&registered);

    // Appends and conditions across crablet's and pg_partman's partitions, up to position
    // 450 (into pg_partman's events_p400, where crablet, one range ahead, makes nothing yet),
    // then pg_partman's maintenance, which makes events_p600 (two ahead).
    let first = 450;
    for id in 0..first {
        store
            .append_if(vec![course(id)], defined(id))
            .await
            .unwrap_or_else(|e| panic!("define course {id}: {e:?}"));
    }
    admin
        .batch_execute(&format!(
            "SELECT {schema}.run_maintenance('{schema}.events')"
        ))
        .await
        .unwrap_or_else(|e| panic!("run_maintenance: {e:?}"));
    let maintained = store.partitions().await.expect("partitions");
    eprintln!("after run_maintenance: {maintained:?}");
    check_contiguous(&maintained);
    assert!(
        !registered.iter().any(|p| p.name == "events_p600")
            && maintained.iter().any(|p| p.name == "events_p600"),
        "pg_partman's maintenance made events_p600: {maintained:?}"
    );

    // A batch far past what either made ahead: crablet creates the rest and runs it again.
    let horizon = maintained.last().expect("partitions").to;
    let far = usize::try_from(horizon).expect("bound") + 300 - first;
    let batch: Vec<NewEvent> = (first..first + far).map(course).collect();
    let cursor = store
        .append(batch)
        .await
        .expect("a batch past every partition");
    assert!(cursor.position >= horizon, "{cursor:?} past {horizon}");
    let grown = store.partitions().await.expect("partitions");
    check_contiguous(&grown);
    assert!(grown.last().expect("partitions").to > cursor.position);

    // Every event is read, in order; conditions see events in every partition.
    let all = store
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("read all");
    assert_eq!(all.len(), first + far);
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    for id in [0, 250, 449, first + far - 1] {
        match store.append_if(vec![course(id)], defined(id)).await {
            Err(Error::Conflict(_)) => {}
            other => panic!("course {id} is defined already: {other:?}"),
        }
    }
    // pg_partman's maintenance runs again over what crablet created.
    admin
        .batch_execute(&format!(
            "SELECT {schema}.run_maintenance('{schema}.events')"
        ))
        .await
        .unwrap_or_else(|e| panic!("run_maintenance after crablet: {e:?}"));
    check_contiguous(&store.partitions().await.expect("partitions"));

    drop(store);
    admin
        .batch_execute("DROP EXTENSION pg_partman")
        .await
        .expect("drop the extension");
    drop(admin);
    db.drop_now().await.expect("drop the test database");
}
