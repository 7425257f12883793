//! Criterion benchmarks of the PostgreSQL store: append of 1, 3, 8 and 12 events (go-crablet's
//! realistic sizes), append_if, a decide-then-append_if cycle, a boundary query and a
//! 3-projector decision over 100 events; plus the bytes allocated (client side) per append,
//! measured by a counting global allocator.
//!
//! Uses `DATABASE_URL` or `postgres://postgres@127.0.0.1:5432/postgres`, in the schema
//! `crablet_criterion` (dropped and recreated at start). Without a reachable database the group
//! is skipped with a notice, so `cargo bench` always runs.
//!
//! `cargo bench --bench postgres`
use crablet::postgres::{PostgresEventStore, StoreConfig};
use crablet::{
    AppendCondition, EventReader, EventReaderExt, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, Tag,
};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::runtime::Runtime;

mod common;
use common::{course_item, course_model};

/// Counts bytes and allocations requested from the system allocator, by every thread.
struct Counting;

static BYTES: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(
            new_size.saturating_sub(layout.size()) as u64,
            Ordering::Relaxed,
        );
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const SCHEMA: &str = "crablet_criterion";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// go-crablet's realistic append sizes.
const SIZES: [usize; 4] = [1, 3, 8, 12];

static NEXT: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `k` enrolments in one fresh course.
fn enrolments(k: usize) -> (String, Vec<NewEvent>) {
    let course = format!("crit-c{}", unique());
    let events = (0..k)
        .map(|n| {
            NewEvent::new(
                "StudentEnrolled",
                vec![
                    Tag::new("course_id", course.clone()),
                    Tag::new("student_id", format!("s{n}")),
                ],
                serde_json::json!({ "course_id": course, "student_id": format!("s{n}"), "seq": n }),
            )
        })
        .collect();
    (course, events)
}

/// Connects within a few seconds and recreates the bench schema, or explains why not.
async fn connect(url: &str) -> Result<PostgresEventStore, String> {
    let config = StoreConfig::default()
        .schema(SCHEMA)
        .auto_migrate(true)
        .pool_size(4);
    let store = tokio::time::timeout(CONNECT_TIMEOUT, PostgresEventStore::connect(url, config))
        .await
        .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let conn = store.pool().get().await.map_err(|e| e.to_string())?;
    conn.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{SCHEMA}\" CASCADE"))
        .await
        .map_err(|e| e.to_string())?;
    drop(conn);
    store.migrate().await.map_err(|e| e.to_string())?;
    Ok(store)
}

/// The fixtures of the read benchmarks: a course of 10 enrolments, a course of 100 events.
async fn fixtures(store: &PostgresEventStore) -> (Query, String) {
    let (query_course, events) = enrolments(10);
    store.append(events).await.expect("write the query fixture");
    let project_course = "crit-project".to_string();
    let events: Vec<NewEvent> = (0..100)
        .map(|n| {
            let t = match n {
                0 => "CourseDefined",
                n if n % 10 == 9 => "StudentLeft",
                _ => "StudentEnrolled",
            };
            NewEvent::new(
                t,
                vec![
                    Tag::new("course_id", project_course.clone()),
                    Tag::new("student_id", format!("s{n}")),
                ],
                serde_json::json!({ "seq": n }),
            )
        })
        .collect();
    store
        .append(events)
        .await
        .expect("write the project fixture");
    (
        course_item("StudentEnrolled", &query_course),
        project_course,
    )
}

/// Refreshes the planner statistics, as autovacuum would in a long-running store (servers
/// with autovacuum off would otherwise plan every read for an empty table).
async fn analyze(store: &PostgresEventStore) {
    let conn = store.pool().get().await.expect("a pooled connection");
    conn.batch_execute(&format!("ANALYZE \"{SCHEMA}\".events"))
        .await
        .expect("analyze the events table");
}

fn bench_store(c: &mut Criterion, rt: &Runtime, store: &PostgresEventStore) {
    let (query, project_course) = rt.block_on(fixtures(store));
    rt.block_on(analyze(store));

    let mut group = c.benchmark_group("postgres/append");
    for k in SIZES {
        group.throughput(Throughput::Elements(k as u64));
        group.bench_with_input(BenchmarkId::from_parameter(k), &k, |b, &k| {
            b.to_async(rt).iter_batched(
                || enrolments(k).1,
                |events| async move { store.append(events).await.expect("append") },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    rt.block_on(analyze(store));
    let mut group = c.benchmark_group("postgres/append_if");
    group.bench_function("fresh_boundary_1_event", |b| {
        b.to_async(rt).iter_batched(
            || {
                let (course, events) = enrolments(1);
                let condition = AppendCondition::new(Query::from_items([
                    QueryItem::new()
                        .types(["CourseDefined"])
                        .tag("course_id", course.clone()),
                    QueryItem::new()
                        .types(["StudentEnrolled"])
                        .tag("course_id", course),
                ]));
                (events, condition)
            },
            |(events, condition)| async move {
                store.append_if(events, condition).await.expect("append_if")
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decide_then_append_if_1_event", |b| {
        b.to_async(rt).iter_batched(
            || enrolments(1),
            |(course, events)| async move {
                let decision = store.project(course_model(&course)).await.expect("project");
                store
                    .append_if(events, decision.condition)
                    .await
                    .expect("append_if")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    rt.block_on(analyze(store));
    let mut group = c.benchmark_group("postgres/read");
    group.bench_function("query_10_events", |b| {
        b.to_async(rt).iter(|| async {
            let events = store
                .query(&query, ReadOptions::default())
                .await
                .expect("query");
            assert_eq!(events.len(), 10);
        })
    });
    group.bench_function("project_3_projectors_100_events", |b| {
        b.to_async(rt).iter(|| async {
            let projection = store
                .project(course_model(&project_course))
                .await
                .expect("project");
            assert_eq!(projection.events_read, 100);
        })
    });
    group.finish();
}

/// Client-side bytes and allocations per append, averaged over many appends.
fn report_allocations(rt: &Runtime, store: &PostgresEventStore) {
    const N: u64 = 200;
    println!("\nclient-side allocation per append (counting global allocator, all threads, mean of {N}):");
    for k in SIZES {
        let (bytes, allocations) = rt.block_on(async {
            // One untimed append first, so statement caches are warm.
            store.append(enrolments(k).1).await.expect("append");
            let batches: Vec<Vec<NewEvent>> = (0..N).map(|_| enrolments(k).1).collect();
            let (b0, a0) = (
                BYTES.load(Ordering::SeqCst),
                ALLOCATIONS.load(Ordering::SeqCst),
            );
            for events in batches {
                store.append(events).await.expect("append");
            }
            (
                BYTES.load(Ordering::SeqCst) - b0,
                ALLOCATIONS.load(Ordering::SeqCst) - a0,
            )
        });
        println!(
            "  append of {k:>2} events: {:>7} bytes, {:>5} allocations per append",
            bytes / N,
            allocations / N
        );
    }
    let events = N * COALESCED_CLIENTS;
    // What the loop itself allocates (building the events and conditions, spawning the tasks),
    // so the store's share can be told apart.
    let (harness_bytes, harness_allocations) = rt.block_on(coalesced(store, Coalesced::Harness, N));
    println!(
        "  harness only (events built, tasks spawned, nothing appended): {:>7} bytes, {:>5} \
         allocations per event",
        harness_bytes / events,
        harness_allocations / events
    );
    for (mode, name) in [
        (Coalesced::Append, "append   "),
        (Coalesced::AppendIf, "append_if"),
    ] {
        let (bytes, allocations) = rt.block_on(coalesced(store, mode, N));
        println!(
            "  coalesced {name}, {COALESCED_CLIENTS} clients x 1 event: {:>7} bytes, {:>5} \
             allocations per appended event; the store's share {:>7} bytes, {:>5} allocations",
            bytes / events,
            allocations / events,
            bytes.saturating_sub(harness_bytes) / events,
            allocations.saturating_sub(harness_allocations) / events
        );
    }
}

/// What each task of [`coalesced`] does with the event it builds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Coalesced {
    /// Builds the event and its condition, appends nothing.
    Harness,
    Append,
    AppendIf,
}

/// Concurrent single-event appends (of their own boundaries, so group commit coalesces them).
const COALESCED_CLIENTS: u64 = 16;

/// Bytes and allocations of `rounds` rounds of [`COALESCED_CLIENTS`] concurrent single-event
/// appends (each `append_if` guarded by its own boundary), everything the process allocated
/// meanwhile included: the events' construction, the tasks, group commit and the driver.
async fn coalesced(store: &PostgresEventStore, mode: Coalesced, rounds: u64) -> (u64, u64) {
    let append = |store: PostgresEventStore| async move {
        let (course, events) = enrolments(1);
        let boundary = Query::from(QueryItem::new().tag("course_id", course.as_str()));
        let condition = AppendCondition::new(boundary);
        match mode {
            Coalesced::Harness => drop((events, condition)),
            Coalesced::Append => {
                store.append(events).await.expect("append");
            }
            Coalesced::AppendIf => {
                store.append_if(events, condition).await.expect("append_if");
            }
        }
    };
    append(store.clone()).await;
    let (b0, a0) = (
        BYTES.load(Ordering::SeqCst),
        ALLOCATIONS.load(Ordering::SeqCst),
    );
    for _ in 0..rounds {
        let tasks: Vec<_> = (0..COALESCED_CLIENTS)
            .map(|_| tokio::spawn(append(store.clone())))
            .collect();
        for task in tasks {
            task.await.expect("append task");
        }
    }
    (
        BYTES.load(Ordering::SeqCst) - b0,
        ALLOCATIONS.load(Ordering::SeqCst) - a0,
    )
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    match rt.block_on(connect(&url)) {
        Ok(store) => {
            bench_store(&mut criterion, &rt, &store);
            report_allocations(&rt, &store);
        }
        Err(reason) => {
            // Never print credentials: only what follows the `@`.
            let shown = url.rsplit('@').next().unwrap_or_default();
            println!(
                "notice: skipping the PostgreSQL benchmarks: no database at {shown} ({reason}); \
                 set DATABASE_URL to run them"
            );
        }
    }
    criterion.final_summary();
}
