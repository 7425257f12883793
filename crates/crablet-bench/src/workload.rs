//! The operations of each scenario, the timed client loop and the one-pass streams.
use crate::ctx::{fixture_course, query_of, Ctx, PROJECT_BOUNDARIES, QUERY_BOUNDARIES};
use crate::stats::{proc_status_mb, reset_peak_rss, RunResult};
use crate::Scenario;
use dcb_core::{
    AppendCommand, AppendCondition, Cursor, EventReader, EventReaderExt, EventStore, NewEvent,
    Query, QueryItem, ReadOptions, StateProjector, Tag,
};
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::types::{FromSql, ToSql, Type};

/// What one successful operation did.
struct Outcome {
    /// Events written or read.
    events: u64,
    /// Conflicts met (and retried) on the way, for `append-if-hot`.
    conflicts: u64,
}

enum OpError {
    /// The operation ended in a conflict (after this many conflicting attempts).
    Conflict(u64),
    Other(String),
}

fn other(e: impl std::fmt::Display) -> OpError {
    OpError::Other(e.to_string())
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    events: AtomicU64,
    conflicts: AtomicU64,
    errors: AtomicU64,
}

/// Per-client state: identity, a private random generator, cached raw SQL.
struct Client {
    id: usize,
    /// Which timed run of this process (warm-ups included): part of every boundary name, so a
    /// run never continues the boundaries of an earlier one (they would grow run after run).
    run: u64,
    rng: StdRng,
    /// Successful decisions on this client's own boundaries (`append-if`).
    decisions: u64,
    /// Appends so far (unique boundaries of `batch`).
    appends: u64,
    /// The cursor of this client's previous append (`append-if-after`).
    last: Option<Cursor>,
    /// Raw INSERT statements by (into the store's `events`?, rows); the raw table and whether
    /// it locks are fixed per process.
    raw_sql: HashMap<(bool, usize), String>,
}

/// Runs `clients` concurrent clients of `scenario` for `duration`; with `measured`, prints a
/// progress line every second and returns the result (a warm-up's result is discarded).
pub async fn run_timed(
    ctx: &Arc<Ctx>,
    scenario: Scenario,
    clients: usize,
    duration: Duration,
    measured: bool,
) -> RunResult {
    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicBool::new(false));
    let label = format!("{} c={clients}", scenario.name());
    let reporter = measured.then(|| {
        tokio::spawn(progress(
            label.clone(),
            counters.clone(),
            done.clone(),
            Instant::now(),
        ))
    });
    if !measured {
        eprintln!("[{label}] warm-up {:.1}s", duration.as_secs_f64());
    }
    let start = Instant::now();
    let deadline = start + duration;
    let run = ctx.runs.fetch_add(1, Ordering::AcqRel);
    let tasks: Vec<_> = (0..clients)
        .map(|id| {
            let ctx = ctx.clone();
            let counters = counters.clone();
            tokio::spawn(client_loop(ctx, scenario, (run, id), deadline, counters))
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("a client task panicked"));
    }
    let elapsed = start.elapsed();
    done.store(true, Ordering::Release);
    if let Some(reporter) = reporter {
        let _ = reporter.await;
    }
    let events_per_append = match scenario {
        Scenario::Batch | Scenario::RawBatch | Scenario::Commands | Scenario::RawCommands => {
            ctx.batch_size
        }
        Scenario::Query | Scenario::RawQuery | Scenario::Project | Scenario::RawProject => 0,
        _ => ctx.events_per_append,
    };
    let mut result = RunResult::new(
        scenario.name(),
        &ctx.schema,
        clients,
        events_per_append,
        elapsed,
        counters.ops.load(Ordering::Acquire),
        counters.events.load(Ordering::Acquire),
        counters.conflicts.load(Ordering::Acquire),
        counters.errors.load(Ordering::Acquire),
        latencies,
    );
    if scenario == Scenario::AppendIfHot {
        result
            .extra
            .insert("successes_per_s".into(), json!(result.ops_per_s.round()));
    }
    result
}

async fn progress(label: String, counters: Arc<Counters>, done: Arc<AtomicBool>, start: Instant) {
    let tty = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut last_ops = 0;
    loop {
        ticker.tick().await;
        if done.load(Ordering::Acquire) {
            break;
        }
        let ops = counters.ops.load(Ordering::Relaxed);
        let line = format!(
            "[{label}] {:>4.0}s ops={ops} last-second ops/s={} events={} conflicts={} errors={}",
            start.elapsed().as_secs_f64(),
            ops - last_ops,
            counters.events.load(Ordering::Relaxed),
            counters.conflicts.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
        );
        last_ops = ops;
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
    if tty {
        eprintln!();
    }
}

async fn client_loop(
    ctx: Arc<Ctx>,
    scenario: Scenario,
    (run, id): (u64, usize),
    deadline: Instant,
    counters: Arc<Counters>,
) -> Vec<u64> {
    let mut client = Client {
        id,
        run,
        rng: StdRng::seed_from_u64(0x5eed_0000 + id as u64),
        decisions: 0,
        appends: 0,
        last: None,
        raw_sql: HashMap::new(),
    };
    let mut latencies = Vec::with_capacity(4096);
    let mut reported = 0;
    while Instant::now() < deadline {
        let started = Instant::now();
        match op(&ctx, scenario, &mut client, deadline).await {
            Ok(outcome) => {
                latencies.push(started.elapsed().as_micros() as u64);
                counters.ops.fetch_add(1, Ordering::Relaxed);
                counters.events.fetch_add(outcome.events, Ordering::Relaxed);
                counters
                    .conflicts
                    .fetch_add(outcome.conflicts, Ordering::Relaxed);
            }
            Err(OpError::Conflict(n)) => {
                counters.conflicts.fetch_add(n, Ordering::Relaxed);
            }
            Err(OpError::Other(message)) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                if reported < 3 {
                    reported += 1;
                    eprintln!("\n[{} client {id}] error: {message}", scenario.name());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    latencies
}

/// `StudentEnrolled` events on `course`, for students `first..first + k`.
fn enrolments(course: &str, first: u64, k: usize) -> Vec<NewEvent> {
    (0..k as u64)
        .map(|n| {
            let student = format!("s{}", first + n);
            NewEvent::new(
                "StudentEnrolled",
                vec![
                    Tag::new("course_id", course),
                    Tag::new("student_id", student.clone()),
                ],
                json!({ "course_id": course, "student_id": student, "seq": first + n, "source": "bench" }),
            )
        })
        .collect()
}

/// The `--batch-size` fresh boundaries of one `commands` (or `raw-commands`) operation, each
/// with its course and its one enrolment: the target and its baseline write the same rows.
fn fresh_boundaries<'a>(
    ctx: &'a Ctx,
    client: &mut Client,
    label: &'a str,
) -> impl Iterator<Item = (String, Vec<NewEvent>)> + 'a {
    client.appends += 1;
    let (run, id, appends) = (client.run, client.id, client.appends);
    let firsts: Vec<u64> = (0..ctx.batch_size)
        .map(|_| client.rng.gen_range(0..1_000_000))
        .collect();
    firsts.into_iter().enumerate().map(move |(n, first)| {
        let course = format!("{}-{run}-{label}{id}-{appends}-{n}", ctx.run_id);
        let events = enrolments(&course, first, 1);
        (course, events)
    })
}

/// The decision model of the conditional scenarios: does the course exist, how many are enrolled.
fn enrolment_model(course: &str) -> (StateProjector<bool>, StateProjector<u64>) {
    (
        StateProjector::exists(Query::from(
            QueryItem::new()
                .types(["CourseDefined"])
                .tag("course_id", course),
        )),
        StateProjector::counter(Query::from(
            QueryItem::new()
                .types(["StudentEnrolled"])
                .tag("course_id", course),
        )),
    )
}

/// The 3-projector decision model of the `project` scenario.
#[allow(clippy::type_complexity)]
fn course_model(
    course: &str,
) -> (
    StateProjector<bool>,
    StateProjector<u64>,
    StateProjector<u64>,
) {
    let item = |t: &str| Query::from(QueryItem::new().types([t]).tag("course_id", course));
    (
        StateProjector::exists(item("CourseDefined")),
        StateProjector::counter(item("StudentEnrolled")),
        StateProjector::counter(item("StudentLeft")),
    )
}

async fn op(
    ctx: &Ctx,
    scenario: Scenario,
    client: &mut Client,
    deadline: Instant,
) -> Result<Outcome, OpError> {
    let k = ctx.events_per_append;
    let written = |events: usize| {
        Ok(Outcome {
            events: events as u64,
            conflicts: 0,
        })
    };
    match scenario {
        Scenario::RawInsert | Scenario::RawBatch => {
            let rows = if scenario == Scenario::RawBatch {
                ctx.batch_size
            } else {
                k
            };
            let course = format!("{}-c{}", ctx.run_id, client.rng.gen_range(0..10_000));
            let first = client.rng.gen_range(0..1_000_000);
            raw_insert(ctx, client, enrolments(&course, first, rows)).await?;
            written(rows)
        }
        Scenario::Append => {
            let course = format!("{}-c{}", ctx.run_id, client.rng.gen_range(0..10_000));
            let first = client.rng.gen_range(0..1_000_000);
            ctx.store
                .append(enrolments(&course, first, k))
                .await
                .map_err(other)?;
            written(k)
        }
        Scenario::Batch => {
            client.appends += 1;
            let course = format!(
                "{}-{}-b{}-{}",
                ctx.run_id, client.run, client.id, client.appends
            );
            // Students drawn like `raw-batch`'s: a batch of the same student keys every time
            // would grow their tag index entries without end, a cost the baseline never pays.
            let first = client.rng.gen_range(0..1_000_000);
            ctx.store
                .append(enrolments(&course, first, ctx.batch_size))
                .await
                .map_err(other)?;
            written(ctx.batch_size)
        }
        Scenario::AppendIfAfter => {
            let course = format!("{}-{}-after{}", ctx.run_id, client.run, client.id);
            let mine = Query::from(
                QueryItem::new()
                    .types(["CourseDefined", "StudentEnrolled"])
                    .tag("course_id", course.as_str()),
            );
            let condition = AppendCondition::new(mine).with_after(client.last);
            let events = enrolments(&course, client.appends * k as u64, k);
            match ctx.store.append_if(events, condition).await {
                Ok(cursor) => {
                    client.appends += 1;
                    client.last = Some(cursor);
                    written(k)
                }
                Err(e) if e.is_conflict() => Err(OpError::Conflict(1)),
                Err(e) => Err(other(e)),
            }
        }
        Scenario::Commands => {
            let commands = fresh_boundaries(ctx, client, "cmd")
                .map(|(course, events)| {
                    let fresh = Query::from(
                        QueryItem::new()
                            .types(["StudentEnrolled"])
                            .tag("course_id", course.as_str()),
                    );
                    AppendCommand::new(events).only_if(AppendCondition::new(fresh))
                })
                .collect();
            match ctx.store.append_batch(commands).await {
                Ok(_) => written(ctx.batch_size),
                Err(e) if e.is_conflict() => Err(OpError::Conflict(1)),
                Err(e) => Err(other(e)),
            }
        }
        Scenario::RawCommands => {
            let rows: Vec<NewEvent> = fresh_boundaries(ctx, client, "rawcmd")
                .flat_map(|(_, events)| events)
                .collect();
            raw_insert(ctx, client, rows).await?;
            written(ctx.batch_size)
        }
        Scenario::AppendIf => {
            let generation = client.decisions / ctx.boundary_size;
            let course = format!(
                "{}-{}-own{}-{generation}",
                ctx.run_id, client.run, client.id
            );
            let decision = ctx
                .store
                .project(enrolment_model(&course))
                .await
                .map_err(other)?;
            let enrolled = decision.states.1;
            let events = enrolments(&course, enrolled, k);
            match ctx.store.append_if(events, decision.condition).await {
                Ok(_) => {
                    client.decisions += 1;
                    written(k)
                }
                Err(e) if e.is_conflict() => Err(OpError::Conflict(1)),
                Err(e) => Err(other(e)),
            }
        }
        Scenario::RawDecision => {
            let generation = client.decisions / ctx.boundary_size;
            let course = format!(
                "{}-{}-raw{}-{generation}",
                ctx.run_id, client.run, client.id
            );
            let types = ["CourseDefined", "StudentEnrolled"];
            let seen = raw_select(ctx, &course, &types).await?;
            raw_insert_into(ctx, client, "events", enrolments(&course, seen as u64, k)).await?;
            client.decisions += 1;
            written(k)
        }
        Scenario::AppendIfHot => {
            let mut conflicts = 0;
            loop {
                let generation = ctx.hot_successes.load(Ordering::Acquire) / ctx.boundary_size;
                let course = format!("{}-hot-{generation}", ctx.run_id);
                let decision = ctx
                    .store
                    .project(enrolment_model(&course))
                    .await
                    .map_err(other)?;
                let events = enrolments(&course, decision.states.1, k);
                match ctx.store.append_if(events, decision.condition).await {
                    Ok(_) => {
                        ctx.hot_successes.fetch_add(1, Ordering::AcqRel);
                        return Ok(Outcome {
                            events: k as u64,
                            conflicts,
                        });
                    }
                    Err(e) if e.is_conflict() => {
                        conflicts += 1;
                        if Instant::now() >= deadline {
                            return Err(OpError::Conflict(conflicts));
                        }
                        let tries = u32::try_from(conflicts).unwrap_or(u32::MAX);
                        match ctx.hot_retry.wait(tries, &mut client.rng) {
                            None => return Err(OpError::Conflict(conflicts)),
                            Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                            Some(_) => {}
                        }
                    }
                    Err(e) => return Err(other(e)),
                }
            }
        }
        Scenario::Query => {
            let i = client.rng.gen_range(0..QUERY_BOUNDARIES);
            let events = ctx
                .store
                .query(&query_of(i), ReadOptions::default())
                .await
                .map_err(other)?;
            written(events.len())
        }
        Scenario::RawQuery => {
            let i = client.rng.gen_range(0..QUERY_BOUNDARIES);
            let n = raw_select(ctx, &fixture_course("query", i), &["StudentEnrolled"]).await?;
            written(n)
        }
        Scenario::Project => {
            let i = client.rng.gen_range(0..PROJECT_BOUNDARIES);
            let projection = ctx
                .store
                .project(course_model(&fixture_course("project", i)))
                .await
                .map_err(other)?;
            std::hint::black_box(&projection.states);
            written(projection.events_read as usize)
        }
        Scenario::RawProject => {
            let i = client.rng.gen_range(0..PROJECT_BOUNDARIES);
            let types = ["CourseDefined", "StudentEnrolled", "StudentLeft"];
            let n = raw_select(ctx, &fixture_course("project", i), &types).await?;
            written(n)
        }
        Scenario::Stream | Scenario::RawStream | Scenario::Compare => Err(OpError::Other(format!(
            "{} is not a timed scenario",
            scenario.name()
        ))),
    }
}

/// The raw baseline's write: one autocommit INSERT of all `events` as rows of `ctx.raw_table`
/// (type, `key:value` tags, data), the same values the store writes.
async fn raw_insert(ctx: &Ctx, client: &mut Client, events: Vec<NewEvent>) -> Result<(), OpError> {
    raw_insert_into(ctx, client, &ctx.raw_table, events).await
}

/// One autocommit multi-row INSERT of `events` into `table` (schema-qualified, or `events` for
/// the store's own table).
async fn raw_insert_into(
    ctx: &Ctx,
    client: &mut Client,
    table: &str,
    events: Vec<NewEvent>,
) -> Result<(), OpError> {
    let rows = events.len();
    let store_table = table == "events";
    // The unprotected decision (`events`) never locks.
    let locked = ctx.raw_locks && !store_table;
    let lock_params = locked.then(|| raw_lock_keys(&events, ctx.store.config().max_lock_keys));
    let sql = client
        .raw_sql
        .entry((store_table, rows))
        .or_insert_with(|| {
            let table = if store_table {
                format!("{}.events", ctx.quoted)
            } else {
                table.to_string()
            };
            // Parameters $1/$2 are the locks when locking, so the rows' start after them.
            let first = if locked { 3 } else { 1 };
            let values: Vec<String> = (0..rows)
                .map(|r| {
                    let p = first + 3 * r;
                    format!("(${p}::text, ${}::text[], ${}::jsonb)", p + 1, p + 2)
                })
                .collect();
            if locked {
                format!(
                    "WITH locked AS MATERIALIZED (SELECT CASE WHEN u.x THEN pg_advisory_xact_lock(u.k) \
                     ELSE pg_advisory_xact_lock_shared(u.k) END FROM unnest($1::int8[], $2::bool[]) AS u(k, x)) \
                     INSERT INTO {} (type, tags, data) SELECT * FROM (VALUES {}) AS v(type, tags, data) \
                     WHERE (SELECT count(*) FROM locked) >= 0",
                    table,
                    values.join(", ")
                )
            } else {
                format!(
                    "INSERT INTO {} (type, tags, data) VALUES {}",
                    table,
                    values.join(", ")
                )
            }
        });
    let columns: Vec<(String, Vec<String>, Value)> = events
        .into_iter()
        .map(|e| {
            let tags = e
                .tags
                .iter()
                .map(|t| format!("{}:{}", t.key, t.value))
                .collect();
            (e.event_type, tags, e.data)
        })
        .collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows * 3 + 2);
    if let Some((keys, exclusive)) = &lock_params {
        params.push(keys);
        params.push(exclusive);
    }
    for (event_type, tags, data) in &columns {
        params.push(event_type);
        params.push(tags);
        params.push(data);
    }
    let conn = ctx.raw.get().await.map_err(other)?;
    let stmt = conn.prepare_cached(sql).await.map_err(other)?;
    conn.execute(&stmt, &params).await.map_err(other)?;
    Ok(())
}

/// The locks of `--raw-locks`, derived as an unconditional append derives its own (the same
/// number of keys), hashed in a namespace of their own: sorted distinct shared keys, or one
/// exclusive key past `max_keys` (as soon as it is passed, like the store).
fn raw_lock_keys(events: &[NewEvent], max_keys: usize) -> (Vec<i64>, Vec<bool>) {
    use std::hash::{Hash, Hasher};
    let key = |parts: &[&str]| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        "crablet-bench/raw".hash(&mut h);
        parts.hash(&mut h);
        h.finish() as i64
    };
    let mut keys = std::collections::HashSet::new();
    keys.insert(key(&[]));
    for e in events {
        keys.insert(key(&[&e.event_type]));
        for t in &e.tags {
            let tag = format!("{}:{}", t.key, t.value);
            keys.insert(key(&["tag", &tag]));
            keys.insert(key(&[&e.event_type, &tag]));
        }
        if keys.len() > max_keys {
            return (vec![key(&["escalation"])], vec![true]);
        }
    }
    let mut keys: Vec<i64> = keys.into_iter().collect();
    keys.sort_unstable();
    let shared = vec![false; keys.len()];
    (keys, shared)
}

/// The raw baseline's read: the events of `course` with one of `types`, in cursor order, in one
/// autocommit SELECT, decoded like the store decodes them.
async fn raw_select(ctx: &Ctx, course: &str, types: &[&str]) -> Result<usize, OpError> {
    let sql = format!(
        "SELECT {RAW_COLUMNS} FROM {}.events WHERE type = ANY($1::text[]) AND tags @> $2::text[] \
         ORDER BY transaction_id, position",
        ctx.quoted
    );
    let types: Vec<&str> = types.to_vec();
    let tags = vec![format!("course_id:{course}")];
    let conn = ctx.raw.get().await.map_err(other)?;
    let stmt = conn.prepare_cached(&sql).await.map_err(other)?;
    let rows = conn.query(&stmt, &[&types, &tags]).await.map_err(other)?;
    for row in &rows {
        std::hint::black_box(RawEvent::decode(row).map_err(other)?);
    }
    Ok(rows.len())
}

const RAW_COLUMNS: &str = "transaction_id, position, type, tags, data, metadata, occurred_at";

/// A row of `events` decoded into owned values, as the store's reads decode it.
#[allow(dead_code)]
struct RawEvent {
    transaction_id: Xid8,
    position: i64,
    event_type: String,
    tags: Vec<String>,
    data: Value,
    metadata: Option<Value>,
    occurred_at: SystemTime,
}

impl RawEvent {
    fn decode(row: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            transaction_id: row.try_get(0)?,
            position: row.try_get(1)?,
            event_type: row.try_get(2)?,
            tags: row.try_get(3)?,
            data: row.try_get(4)?,
            metadata: row.try_get(5)?,
            occurred_at: row.try_get(6)?,
        })
    }
}

/// PostgreSQL `xid8` (OID 5069), which tokio-postgres does not know.
struct Xid8(#[allow(dead_code)] u64);

impl<'a> FromSql<'a> for Xid8 {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("xid8 with {} bytes", raw.len()))?;
        Ok(Xid8(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        ty.oid() == 5069
    }
}

/// One pass over the whole log: `stream` through `query_stream(Query::all())`, `raw-stream`
/// through tokio-postgres `query_raw` of the same rows in the same order. Reports events/s and
/// the peak RSS of the pass (VmHWM, reset before the pass where the kernel allows).
pub async fn stream_pass(ctx: &Arc<Ctx>, scenario: Scenario) -> Result<RunResult, String> {
    let hwm_reset = reset_peak_rss();
    let rss_before = proc_status_mb("VmRSS:").unwrap_or(0.0);
    let mut rss_max = rss_before;
    let label = scenario.name();
    let start = Instant::now();
    let mut next_report = Duration::from_secs(1);
    let mut count: u64 = 0;
    let mut next_sample: u64 = 10_000;
    let mut tick = |count: u64, rss_max: &mut f64| {
        if count >= next_sample {
            next_sample += 10_000;
            if let Some(rss) = proc_status_mb("VmRSS:") {
                *rss_max = rss_max.max(rss);
            }
            if start.elapsed() >= next_report {
                next_report += Duration::from_secs(1);
                eprintln!(
                    "[{label}] {:>4.0}s events={count} rss={:.1}MiB",
                    start.elapsed().as_secs_f64(),
                    *rss_max
                );
            }
        }
    };
    if scenario == Scenario::Stream {
        let mut events = ctx
            .store
            .query_stream(&Query::all(), ReadOptions::default());
        while let Some(event) = events.next().await {
            std::hint::black_box(event.map_err(|e| format!("stream: {e}"))?);
            count += 1;
            tick(count, &mut rss_max);
        }
    } else {
        let sql = format!(
            "SELECT {RAW_COLUMNS} FROM {}.events ORDER BY transaction_id, position",
            ctx.quoted
        );
        let conn = ctx.raw.get().await.map_err(|e| format!("raw pool: {e}"))?;
        let stmt = conn
            .prepare_cached(&sql)
            .await
            .map_err(|e| format!("prepare raw stream: {e}"))?;
        let no_params: [&(dyn ToSql + Sync); 0] = [];
        let rows = conn
            .query_raw(&stmt, no_params.iter().map(|p| *p as &dyn ToSql))
            .await
            .map_err(|e| format!("raw stream: {e}"))?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(|e| format!("raw stream: {e}"))?;
            std::hint::black_box(RawEvent::decode(&row).map_err(|e| format!("decode: {e}"))?);
            count += 1;
            tick(count, &mut rss_max);
        }
    }
    let elapsed = start.elapsed();
    let micros = elapsed.as_micros() as u64;
    let mut result = RunResult::new(
        scenario.name(),
        &ctx.schema,
        1,
        0,
        elapsed,
        1,
        count,
        0,
        0,
        vec![micros],
    );
    let rss_after = proc_status_mb("VmRSS:").unwrap_or(0.0);
    let hwm = proc_status_mb("VmHWM:").unwrap_or(0.0);
    result
        .extra
        .insert("rss_before_mb".into(), json!(round1(rss_before)));
    result.extra.insert(
        "rss_max_sampled_mb".into(),
        json!(round1(rss_max.max(rss_after))),
    );
    result.extra.insert("vm_hwm_mb".into(), json!(round1(hwm)));
    result.extra.insert("vm_hwm_reset".into(), json!(hwm_reset));
    Ok(result)
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}
