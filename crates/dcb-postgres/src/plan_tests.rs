//! Plan guards: the statements crablet prepares must stay index-driven under the plans
//! PostgreSQL actually caches for them, on a store large enough for a bad plan to matter.
//!
//! A generic plan is planned without parameter values; three of them went wrong before these
//! tests existed (a `LIMIT 1` probe as a sequential scan, a tag probe ANDed with a third of the
//! primary key, a decision read on parallel workers). Each check prepares the statement exactly
//! as generated, under the settings of the transaction that runs it, and inspects its plan.
//! (The primary-key AND only appears at millions of rows; `sql`'s unit tests pin the statement
//! shape that avoids it.)
use crate::sql::{self, AppendParts, GroupPart};
use dcb_core::{AppendCondition, Cursor, NewEvent, Query, QueryItem, ReadOptions, Tag};
use dcb_testkit::pg::TestSchema;
use tokio_postgres::Client;

/// Rows in the store: enough that a scan of it would cost far more than an index probe.
const ROWS: i64 = 200_000;

async fn store_with_rows() -> (TestSchema, Client, String) {
    store_with_rows_in(None).await
}

/// [`store_with_rows`], with the log partitioned in ranges of `partition` positions first, so
/// that the rows spread over several partitions (and one empty one is ahead).
async fn store_with_rows_in(partition: Option<i64>) -> (TestSchema, Client, String) {
    let schema = TestSchema::new().await;
    let mut client = schema.connect().await.expect("connect");
    let quoted = format!("\"{}\"", schema.schema);
    crate::migrate::migrate(&mut client, &schema.schema, &quoted)
        .await
        .expect("migrate");
    if let Some(range) = partition {
        let store = crate::PostgresEventStore::connect(
            &schema.url,
            crate::StoreConfig::default().schema(schema.schema.clone()),
        )
        .await
        .expect("store");
        store
            .partition(crate::PartitionConfig::new(range).ahead(1))
            .await
            .expect("partition");
        store
            .create_partitions_ahead(ROWS)
            .await
            .expect("partitions ahead");
    }
    client
        .batch_execute(&format!(
            "INSERT INTO {quoted}.events (type, tags, data) \
             SELECT CASE WHEN g % 50 = 0 THEN 'CourseDefined' ELSE 'StudentEnrolled' END, \
                    ARRAY['course_id:c' || (g % 5000), 'student_id:s' || g], '{{}}'::jsonb \
             FROM generate_series(1, {ROWS}) AS g; \
             ANALYZE {quoted}.events"
        ))
        .await
        .expect("load rows");
    (schema, client, quoted)
}

/// The plan of `statement` with `args` (SQL literals), under `settings`.
async fn plan(client: &Client, settings: &str, statement: &str, args: &[&str]) -> String {
    client
        .batch_execute(&format!(
            "DEALLOCATE ALL; SET jit = off; SET max_parallel_workers_per_gather = 0; {settings}; \
             PREPARE probe AS {statement}"
        ))
        .await
        .expect("prepare");
    // Six executions: the plan cache decides between custom and generic plans after five.
    let mut text = String::new();
    for _ in 0..6 {
        let rows = client
            .query(
                &if args.is_empty() {
                    "EXPLAIN (COSTS OFF) EXECUTE probe".to_string()
                } else {
                    format!("EXPLAIN (COSTS OFF) EXECUTE probe({})", args.join(", "))
                },
                &[],
            )
            .await
            .expect("explain");
        text = rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n");
    }
    text
}

/// The statement of a conditional append of `event` under `condition`.
fn conditional_append(schema: &str, condition: &AppendCondition, event: NewEvent) -> String {
    let parts = AppendParts {
        condition: Some(condition),
        command: None,
        lock: None,
    };
    sql::append(schema, vec![event], parts).sql
}

fn course_model() -> Query {
    Query::from_items([
        QueryItem::new()
            .types(["CourseDefined"])
            .tag("course_id", "c7"),
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tag("course_id", "c7"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_keep_index_driven_plans_at_scale() {
    let (_schema, client, quoted) = store_with_rows().await;
    assert_index_driven(&client, &quoted, &["events".to_string()]).await;
}

/// The same statements on a partitioned log: every partition holding rows is probed through
/// its own index (no pruning by position: cursor order is by transaction id first), none is
/// scanned. A partition that was (nearly) empty when the plan was made may be scanned: cheap
/// while it is small, and autovacuum's ANALYZE of a growing partition invalidates the plans
/// that use it (docs/scale-out.md, "A partitioned log").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_keep_index_driven_plans_on_partitions() {
    let (_schema, client, quoted) = store_with_rows_in(Some(ROWS / 4)).await;
    let populated: Vec<String> = client
        .query(
            &format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = '{quoted}.events'::regclass AND c.reltuples > 1000 \
                 ORDER BY 1"
            ),
            &[],
        )
        .await
        .expect("partitions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(populated.len() >= 3, "{populated:?}");
    assert_index_driven(&client, &quoted, &populated).await;
}

/// Whether the plan `p` reads table `name` sequentially.
fn seq_scans(p: &str, name: &str) -> bool {
    let tokens: Vec<&str> = p.split_whitespace().collect();
    tokens
        .windows(4)
        .any(|w| w[0] == "Seq" && w[1] == "Scan" && w[2] == "on" && w[3] == name)
}

/// A conditional append's tagged probes after a cursor: the events after the cursor read in
/// primary-key order up to the window's limit (one index range per table holding rows, no
/// sort, no scan), and each of the `items` tag probes gated behind it, on the tag index,
/// never ANDed with a primary-key range.
fn assert_windowed_tag_probes(p: &str, populated: &[String], items: usize) {
    let n = populated.len();
    assert!(!populated.iter().any(|name| seq_scans(p, name)), "{p}");
    assert!(
        !p.contains("BitmapAnd"),
        "a tagged probe must not AND indexes:\n{p}"
    );
    assert!(
        p.matches("Index Scan using").count() >= n && p.contains("_pkey"),
        "the window must read the primary key from the cursor on:\n{p}"
    );
    let window = p
        .split("  CTE ")
        .find(|cte| cte.starts_with("probe_recent"))
        .unwrap_or_else(|| panic!("no window:\n{p}"));
    let sorts = window
        .lines()
        .any(|l| l.trim_start().trim_start_matches("->  ") == "Sort");
    assert!(!sorts, "the window must not sort:\n{p}");
    // Gated: one one-time filter per item and table holding rows.
    assert!(p.matches(" >= 64)").count() >= items, "{p}");
    assert!(p.matches("_tags_idx").count() >= items * n, "{p}");
}

/// Every assertion of the plan guards, on a log whose tables holding rows are `populated`
/// (`["events"]`: unpartitioned).
async fn assert_index_driven(client: &Client, quoted: &str, populated: &[String]) {
    let scanned = |p: &str| populated.iter().any(|name| seq_scans(p, name));
    let n = populated.len();
    let generic = "SET plan_cache_mode = force_generic_plan";

    // A conditional append: two tagged probes after a cursor, then the insert.
    let condition = AppendCondition::new(course_model()).with_after(Some(Cursor::new(1, 1)));
    let event = NewEvent::new(
        "StudentEnrolled",
        vec![Tag::new("course_id", "c7")],
        serde_json::json!({}),
    );
    let statement = conditional_append(quoted, &condition, event);
    let args = [
        "'1'",
        "1",
        "'{CourseDefined}'",
        "'{course_id:c7}'",
        "'{StudentEnrolled}'",
        "'{course_id:c7}'",
        "'StudentEnrolled'",
        "'{\"course_id:c7\"}'",
        "'{}'",
        "NULL",
    ];
    let p = plan(client, generic, &statement, &args).await;
    assert_windowed_tag_probes(&p, populated, 2);

    // The same model as the store checks it, simplified into one item with both types.
    let simplified =
        AppendCondition::new(course_model().simplified()).with_after(Some(Cursor::new(1, 1)));
    let event = NewEvent::new(
        "StudentEnrolled",
        vec![Tag::new("course_id", "c7")],
        serde_json::json!({}),
    );
    let statement = conditional_append(quoted, &simplified, event);
    let args = [
        "'1'",
        "1",
        "'{CourseDefined,StudentEnrolled}'",
        "'{course_id:c7}'",
        "'StudentEnrolled'",
        "'{\"course_id:c7\"}'",
        "'{}'",
        "NULL",
    ];
    let p = plan(client, generic, &statement, &args).await;
    assert_windowed_tag_probes(&p, populated, 1);

    // A type-only condition is planned with its values (see `begin_append`) and then uses the
    // type index, cursor bound included.
    let types_only =
        AppendCondition::new(Query::types(["CourseDefined"])).with_after(Some(Cursor::new(1, 1)));
    let event = NewEvent::new("CourseDefined", vec![], serde_json::json!({}));
    let statement = conditional_append(quoted, &types_only, event);
    let args = [
        "'{CourseDefined}'",
        "'1'",
        "1",
        "'CourseDefined'",
        "'{}'",
        "'{}'",
        "NULL",
    ];
    let custom = "SET plan_cache_mode = force_custom_plan";
    let p = plan(client, custom, &statement, &args).await;
    assert!(!scanned(&p), "{p}");
    assert!(
        p.contains("_type_idx") || p.contains("type_transaction_id_position_idx"),
        "{p}"
    );

    // A decision read (tagged items, no bounds) runs on generic plans too.
    let stmt = sql::read(quoted, &course_model(), &ReadOptions::default());
    let args = [
        "'{CourseDefined}'",
        "'{course_id:c7}'",
        "'{StudentEnrolled}'",
        "'{course_id:c7}'",
    ];
    let p = plan(client, generic, &stmt.sql, &args).await;
    assert!(!scanned(&p), "{p}");
    assert!(!p.contains("_pkey"), "{p}");
    assert!(p.matches("_tags_idx").count() >= n, "{p}");

    // Match-all reads follow the primary key instead of sorting the log.
    let stmt = sql::read(quoted, &Query::all(), &ReadOptions::default());
    let p = plan(
        client,
        "SET plan_cache_mode = force_custom_plan; SET enable_sort = off",
        &stmt.sql,
        &[],
    )
    .await;
    assert!(p.matches("Index Scan using").count() >= n, "{p}");
    let sorts = p
        .lines()
        .any(|l| l.trim_start().trim_start_matches("->  ") == "Sort");
    assert!(!sorts, "{p}");
}

/// A group's tagged condition items are probed by one join, each through the tag index (no
/// sequential scan, no index AND), at scale and on a generic plan, without relying on the
/// append transaction's `enable_seqscan = off`; the shared window reads the primary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_probes_stay_index_driven_at_scale() {
    let (_schema, client, quoted) = store_with_rows().await;
    let tagged = |course: &str| {
        Query::from(
            QueryItem::new()
                .types(["StudentEnrolled"])
                .tag("course_id", course),
        )
    };
    let after = Some(Cursor::new(1, 1));
    let with_cursor = AppendCondition::new(tagged("c7")).with_after(after);
    let without_cursor = AppendCondition::new(tagged("c8"));
    let mixed = AppendCondition::new(Query::from_items([
        QueryItem::new().types(["CourseDefined"]),
        QueryItem::new().tag("course_id", "c9"),
    ]))
    .with_after(after);
    let events = |course: &str| {
        vec![NewEvent::new(
            "StudentEnrolled",
            vec![Tag::new("course_id", course)],
            serde_json::json!({}),
        )]
    };
    let parts = vec![
        GroupPart {
            events: events("c7"),
            condition: Some(&with_cursor),
        },
        GroupPart {
            events: events("c8"),
            condition: Some(&without_cursor),
        },
        GroupPart {
            events: events("c9"),
            condition: Some(&mixed),
        },
    ];
    let stmt = sql::append_group(&quoted, parts, false, None);
    client
        .batch_execute(
            "SET plan_cache_mode = force_generic_plan; SET jit = off; \
             SET max_parallel_workers_per_gather = 0",
        )
        .await
        .expect("settings");
    let p = client
        .query(
            &format!("EXPLAIN (COSTS OFF) {}", stmt.sql),
            &stmt.param_refs(),
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!seq_scans(&p, "events"), "{p}");
    assert!(!p.contains("BitmapAnd"), "{p}");
    assert!(p.contains("_tags_idx"), "{p}");
    assert!(
        p.contains("_pkey"),
        "the shared window reads the primary key:\n{p}"
    );
    // The type-only item keeps its own probe on the type index.
    assert!(
        p.contains("_type_idx") || p.contains("type_transaction_id_position_idx"),
        "{p}"
    );
}
