//! The benchmark context: the store, the raw baseline pool, the schema, preloading and fixtures.
use crate::{Args, Scenario};
use dcb_core::{EventReader, EventStore, NewEvent, Query, QueryItem, ReadOptions, Tag};
use dcb_postgres::{PartitionConfig, PostgresEventStore, StoreConfig};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::json;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

/// Boundaries of the `query` scenario, each with [`QUERY_EVENTS`] events.
pub const QUERY_BOUNDARIES: usize = 50;
pub const QUERY_EVENTS: usize = 10;
/// Boundaries of the `project` scenario, each with [`PROJECT_EVENTS`] events.
pub const PROJECT_BOUNDARIES: usize = 20;
pub const PROJECT_EVENTS: usize = 100;

/// Rows per transaction of the bulk preload.
const PRELOAD_CHUNK: u64 = 100_000;
/// Courses and students the preloaded events are spread over.
const PRELOAD_COURSES: u64 = 10_000;
const PRELOAD_STUDENTS: u64 = 200_000;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Ctx {
    pub url: String,
    pub schema: String,
    /// The schema as a quoted identifier.
    pub quoted: String,
    pub store: PostgresEventStore,
    /// The raw baseline's pool: same tokio-postgres/deadpool stack, same recycling method.
    pub raw: Pool,
    /// Unique per process, so new decision boundaries never collide with earlier runs.
    pub run_id: String,
    pub events_per_append: usize,
    pub batch_size: usize,
    /// `bench_raw`, or `bench_raw_indexed` with `--raw-indexes` (quoted, schema-qualified).
    pub raw_table: String,
    pub boundary_size: u64,
    /// Raw inserts take the store's kind of advisory locks (`--raw-locks`).
    pub raw_locks: bool,
    /// How `append-if-hot` retries its conflicts.
    pub hot_retry: HotRetry,
    /// Successful decisions on the hot boundary, shared by all its clients.
    pub hot_successes: AtomicU64,
    /// Timed runs started so far (see `Client::run`).
    pub runs: AtomicU64,
    fixtures: Mutex<Vec<Scenario>>,
}

/// A plain connection for administration (DDL, preload, settings).
pub async fn admin_connect(url: &str) -> Result<Client, String> {
    let connect = tokio_postgres::connect(url, NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| format!("no answer from {url} within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("admin connection closed: {e}");
        }
    });
    Ok(client)
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Ctx {
    pub async fn open(
        args: &Args,
        schema: &str,
        fresh: bool,
        preload: u64,
        max_clients: usize,
        partition_range: Option<i64>,
    ) -> Result<Self, String> {
        let url = args.database_url.clone();
        let quoted = quote_ident(schema);
        let admin = admin_connect(&url).await?;
        if fresh {
            eprintln!("dropping schema {quoted}");
            admin
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {quoted} CASCADE"))
                .await
                .map_err(|e| format!("drop schema {quoted}: {e}"))?;
        }
        let config = StoreConfig::default()
            .schema(schema)
            .auto_migrate(true)
            .pool_size(max_clients + 2)
            .stream_buffer(args.stream_buffer)
            .group_commit_max(args.group_commit_max)
            .group_commit_flushers(args.group_commit_flushers);
        let store_url = args.store_url.as_deref().unwrap_or(&url);
        let store = PostgresEventStore::connect(store_url, config)
            .await
            .map_err(|e| format!("connect the store: {e}"))?;
        if let Some(range) = partition_range {
            let partitions = store
                .partition(PartitionConfig::new(range))
                .await
                .map_err(|e| format!("partition the store: {e}"))?;
            eprintln!(
                "partitioned: {} partitions of {range} positions",
                partitions.len()
            );
        }
        let pg_config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("bad DATABASE_URL {url}: {e}"))?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let raw = Pool::builder(manager)
            .max_size(max_clients + 1)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("raw pool: {e}"))?;
        admin
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {quoted}.bench_raw (\
                    id bigserial PRIMARY KEY, type text, tags text[], data jsonb); \
                 CREATE TABLE IF NOT EXISTS {quoted}.bench_raw_indexed (\
                    id bigserial PRIMARY KEY, type text, tags text[], data jsonb); \
                 CREATE INDEX IF NOT EXISTS bench_raw_indexed_tags \
                    ON {quoted}.bench_raw_indexed USING gin (tags) WITH (fastupdate = off); \
                 CREATE INDEX IF NOT EXISTS bench_raw_indexed_type \
                    ON {quoted}.bench_raw_indexed (type, id)"
            ))
            .await
            .map_err(|e| format!("create {quoted}.bench_raw: {e}"))?;
        let run_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| format!("r{}", d.as_millis()))
            .unwrap_or_else(|_| "r0".into());
        let raw_table = if args.raw_indexes {
            format!("{quoted}.bench_raw_indexed")
        } else {
            format!("{quoted}.bench_raw")
        };
        let ctx = Self {
            url,
            schema: schema.to_string(),
            quoted,
            store,
            raw,
            run_id,
            events_per_append: args.events_per_append,
            batch_size: args.batch_size,
            raw_table,
            boundary_size: args.boundary_size.max(1),
            raw_locks: args.raw_locks,
            hot_retry: HotRetry::from_args(args.hot_backoff_ms, args.hot_at_once),
            hot_successes: AtomicU64::new(0),
            runs: AtomicU64::new(0),
            fixtures: Mutex::new(Vec::new()),
        };
        ctx.preload(&admin, preload).await?;
        Ok(ctx)
    }

    /// Prints the server, its durability settings and the store's size on stderr.
    pub async fn print_environment(&self, json_mode: bool) -> Result<(), String> {
        let admin = admin_connect(&self.url).await?;
        let mut settings = serde_json::Map::new();
        for name in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "commit_delay",
            "full_page_writes",
            "shared_buffers",
            "max_connections",
        ] {
            let row = admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .map_err(|e| format!("SHOW {name}: {e}"))?;
            let value: String = row.get(0);
            settings.insert(name.into(), value.into());
        }
        let events = self.count_events(&admin).await?;
        settings.insert("schema".into(), self.schema.clone().into());
        settings.insert("store_events".into(), events.into());
        if json_mode {
            eprintln!("{}", json!({ "environment": settings }));
        } else {
            let text: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            eprintln!("environment: {}", text.join(" "));
        }
        Ok(())
    }

    async fn count_events(&self, admin: &Client) -> Result<i64, String> {
        let row = admin
            .query_one(&format!("SELECT count(*) FROM {}.events", self.quoted), &[])
            .await
            .map_err(|e| format!("count events: {e}"))?;
        Ok(row.get(0))
    }

    /// Bulk-loads events until the store holds at least `target`, with one INSERT ... SELECT
    /// generate_series per chunk of rows (one transaction each), matching the schema exactly:
    /// `key:value` tags over 10,000 courses and 200,000 students, JSON payloads, the default
    /// transaction id and identity position. Never deletes anything. Takes none of the
    /// advisory locks a writer takes: run it on an idle store only. On a partitioned store the
    /// partitions a chunk needs are created before it.
    async fn preload(&self, admin: &Client, target: u64) -> Result<(), String> {
        if target == 0 {
            return Ok(());
        }
        let have = self.count_events(admin).await? as u64;
        if have >= target {
            eprintln!("preload: {have} events already in {}", self.quoted);
            return Ok(());
        }
        let q = &self.quoted;
        let sql = format!(
            "INSERT INTO {q}.events (type, tags, data) \
             SELECT CASE WHEN g % 50 = 0 THEN 'CourseDefined' \
                         WHEN g % 50 = 1 THEN 'StudentRegistered' \
                         WHEN g % 10 = 2 THEN 'StudentLeft' \
                         ELSE 'StudentEnrolled' END, \
                    CASE WHEN g % 50 = 0 THEN ARRAY['course_id:c' || (g % {PRELOAD_COURSES})] \
                         WHEN g % 50 = 1 THEN ARRAY['student_id:s' || ((g * 7919) % {PRELOAD_STUDENTS})] \
                         ELSE ARRAY['course_id:c' || (g % {PRELOAD_COURSES}), \
                                    'student_id:s' || ((g * 7919) % {PRELOAD_STUDENTS})] END, \
                    jsonb_build_object('course_id', 'c' || (g % {PRELOAD_COURSES}), \
                                       'student_id', 's' || ((g * 7919) % {PRELOAD_STUDENTS}), \
                                       'seq', g, 'source', 'preload') \
             FROM generate_series($1::int8, $2::int8) AS g"
        );
        let started = Instant::now();
        let mut next = have;
        while next < target {
            let end = (next + PRELOAD_CHUNK).min(target);
            let (from, to) = (next as i64, end as i64 - 1);
            if self.store.partitions().await.is_ok_and(|p| !p.is_empty()) {
                self.store
                    .create_partitions_ahead(to - from + 1)
                    .await
                    .map_err(|e| format!("partitions for the preload: {e}"))?;
            }
            admin
                .execute(&sql, &[&from, &to])
                .await
                .map_err(|e| format!("preload rows {from}..{to}: {e}"))?;
            next = end;
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "preload: {next}/{target} events ({:.0} rows/s)",
                (next - have) as f64 / secs.max(1e-9)
            );
        }
        let inserted = started.elapsed();
        admin
            .batch_execute(&format!("VACUUM (ANALYZE) {q}.events"))
            .await
            .map_err(|e| format!("vacuum after preload: {e}"))?;
        eprintln!(
            "preload: {} rows in {:.1}s, then VACUUM ANALYZE in {:.1}s",
            target - have,
            inserted.as_secs_f64(),
            (started.elapsed() - inserted).as_secs_f64()
        );
        Ok(())
    }

    /// Refreshes the planner statistics of the store's and the baseline's tables.
    pub async fn analyze(&self) -> Result<(), String> {
        let admin = admin_connect(&self.url).await?;
        let q = &self.quoted;
        admin
            .batch_execute(&format!(
                "ANALYZE {q}.events, {q}.bench_raw, {q}.bench_raw_indexed"
            ))
            .await
            .map_err(|e| format!("analyze: {e}"))
    }

    /// Creates the boundaries the read scenarios query, once per schema.
    pub async fn prepare_fixtures(&self, scenario: Scenario) -> Result<(), String> {
        let (kind, boundaries, per) = match scenario {
            Scenario::Query | Scenario::RawQuery => ("query", QUERY_BOUNDARIES, QUERY_EVENTS),
            Scenario::Project | Scenario::RawProject => {
                ("project", PROJECT_BOUNDARIES, PROJECT_EVENTS)
            }
            _ => return Ok(()),
        };
        let mut done = self.fixtures.lock().await;
        let family = if kind == "query" {
            Scenario::Query
        } else {
            Scenario::Project
        };
        if done.contains(&family) {
            return Ok(());
        }
        for i in 0..boundaries {
            let course = fixture_course(kind, i);
            let query = Query::tags([Tag::new("course_id", course.clone())]);
            let existing = self
                .store
                .query(&query, ReadOptions::default())
                .await
                .map_err(|e| format!("read fixture {course}: {e}"))?;
            if existing.len() >= per {
                continue;
            }
            let events: Vec<NewEvent> = (existing.len()..per)
                .map(|n| fixture_event(kind, &course, n))
                .collect();
            self.store
                .append(events)
                .await
                .map_err(|e| format!("write fixture {course}: {e}"))?;
        }
        done.push(family);
        Ok(())
    }
}

/// The course id of fixture boundary `i` of the `query` or `project` scenario.
pub fn fixture_course(kind: &str, i: usize) -> String {
    format!("bench-{kind}-{i}")
}

/// Event `n` of a fixture boundary: `project` boundaries hold one CourseDefined, then
/// enrolments, with every tenth event a StudentLeft; `query` boundaries hold enrolments.
fn fixture_event(kind: &str, course: &str, n: usize) -> NewEvent {
    let event_type = match (kind, n) {
        ("project", 0) => "CourseDefined",
        ("project", n) if n % 10 == 9 => "StudentLeft",
        _ => "StudentEnrolled",
    };
    let mut tags = vec![Tag::new("course_id", course)];
    if n > 0 || kind == "query" {
        tags.push(Tag::new("student_id", format!("s{n}")));
    }
    NewEvent::new(
        event_type,
        tags,
        json!({ "course_id": course, "student_id": format!("s{n}"), "seq": n, "source": "fixture" }),
    )
}

/// The query of the `query` scenario on fixture boundary `i`: 10 events.
pub fn query_of(i: usize) -> Query {
    Query::from(
        QueryItem::new()
            .types(["StudentEnrolled"])
            .tag("course_id", fixture_course("query", i)),
    )
}

/// How `append-if-hot` clients retry a conflicting decision.
#[derive(Debug, Clone, Copy)]
pub enum HotRetry {
    /// The library's default policy (`dcb_command::RetryPolicy::default()`), attempts limited.
    Library(dcb_command::RetryPolicy),
    /// Unlimited, with the bench's own doubling backoff from this base.
    Backoff(Duration),
    /// Unlimited, at once.
    AtOnce,
}

impl HotRetry {
    fn from_args(backoff_ms: f64, at_once: bool) -> Self {
        if at_once {
            HotRetry::AtOnce
        } else if backoff_ms > 0.0 {
            HotRetry::Backoff(Duration::from_secs_f64(backoff_ms / 1000.0))
        } else {
            HotRetry::Library(dcb_command::RetryPolicy::default())
        }
    }

    /// The wait after the `conflicts`-th conflict of one operation, or `None` to give up.
    pub fn wait(&self, conflicts: u32, rng: &mut impl rand::Rng) -> Option<Duration> {
        match *self {
            HotRetry::Library(policy) => {
                (conflicts < policy.max_attempts()).then(|| policy.jittered_backoff(conflicts))
            }
            HotRetry::Backoff(base) => {
                let bound = base * (1_u32 << (conflicts - 1).min(5));
                Some(rng.gen_range(bound / 2..=bound))
            }
            HotRetry::AtOnce => Some(Duration::ZERO),
        }
    }
}
