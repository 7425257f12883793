//! `crablet-bench`: a load generator for crablet's PostgreSQL event store.
//!
//! Every scenario runs against a real PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) in its own schema (`--schema`, default
//! `crablet_bench`), next to a raw tokio-postgres/deadpool baseline measured in the same process,
//! because on a shared machine only ratios taken side by side mean anything.
//!
//! ```text
//! cargo run --release -p crablet-bench -- append --clients 16 --duration 10
//! cargo run --release -p crablet-bench -- compare append-if --clients 16 --rounds 3
//! cargo run --release -p crablet-bench -- stream --preload 1000000 --json
//! ```
//!
//! See docs/performance.md for the scenarios, the method and the results.

mod ctx;
mod stats;
mod workload;

use clap::{Parser, ValueEnum};
use ctx::Ctx;
use stats::RunResult;
use std::sync::Arc;
use std::time::Duration;

/// The default database when `DATABASE_URL` is not set.
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Baseline: one durable INSERT of K equivalent rows per autocommit transaction into a table
    /// with only a primary key, through the same tokio-postgres/deadpool stack.
    RawInsert,
    /// `append` of K events, unconditional.
    Append,
    /// Decide with `project` on the client's own boundary, then `append_if` (no conflicts expected).
    AppendIf,
    /// All clients decide and `append_if` on ONE boundary; conflicts are retried.
    AppendIfHot,
    /// `append_if` of K events to the client's own boundary, with the condition "nothing on my
    /// boundary after the cursor my previous append returned": no read (no conflicts expected).
    AppendIfAfter,
    /// The unprotected decision `append-if` makes safe: one autocommit SELECT of the client's
    /// own boundary, then one autocommit INSERT into the store's `events` table, no locks and
    /// no check (what a store without concurrency control costs; racy by design).
    RawDecision,
    /// `append` of `--batch-size` (1,000) events.
    Batch,
    /// Baseline of `batch`: one multi-row INSERT of the same rows into the raw table.
    RawBatch,
    /// One multi-command append (`append_batch`) of `--batch-size` single-event commands, each
    /// with its own condition on its own fresh boundary. Baseline: `raw-commands`.
    Commands,
    /// Baseline of `commands`: one multi-row INSERT of the same rows (one event per fresh
    /// boundary, so as many new tag index entries as `commands` writes), no locks, no checks.
    RawCommands,
    /// A boundary query returning 10 events.
    Query,
    /// Baseline of `query`: one autocommit SELECT of the same rows.
    RawQuery,
    /// A decision model of 3 projectors over a boundary of 100 events.
    Project,
    /// Baseline of `project`: one autocommit SELECT of the same 100 rows.
    RawProject,
    /// Reads the whole log through `query_stream` (one pass).
    Stream,
    /// Baseline of `stream`: the same rows through tokio-postgres `query_raw` (one pass).
    RawStream,
    /// `compare SCENARIO`: alternates the baseline and SCENARIO for `--rounds` rounds.
    Compare,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::RawInsert => "raw-insert",
            Scenario::Append => "append",
            Scenario::AppendIf => "append-if",
            Scenario::AppendIfHot => "append-if-hot",
            Scenario::AppendIfAfter => "append-if-after",
            Scenario::RawDecision => "raw-decision",
            Scenario::Batch => "batch",
            Scenario::RawBatch => "raw-batch",
            Scenario::Commands => "commands",
            Scenario::RawCommands => "raw-commands",
            Scenario::Query => "query",
            Scenario::RawQuery => "raw-query",
            Scenario::Project => "project",
            Scenario::RawProject => "raw-project",
            Scenario::Stream => "stream",
            Scenario::RawStream => "raw-stream",
            Scenario::Compare => "compare",
        }
    }

    /// The raw baseline a scenario is measured against.
    pub fn baseline(self) -> Option<Scenario> {
        match self {
            Scenario::Append
            | Scenario::AppendIf
            | Scenario::AppendIfHot
            | Scenario::AppendIfAfter => Some(Scenario::RawInsert),
            Scenario::Batch => Some(Scenario::RawBatch),
            Scenario::Commands => Some(Scenario::RawCommands),
            Scenario::Query => Some(Scenario::RawQuery),
            Scenario::Project => Some(Scenario::RawProject),
            Scenario::Stream => Some(Scenario::RawStream),
            _ => None,
        }
    }

    /// One pass over the log instead of a timed loop.
    pub fn is_pass(self) -> bool {
        matches!(self, Scenario::Stream | Scenario::RawStream)
    }
}

/// Command line of the load generator.
#[derive(Debug, Clone, Parser)]
#[command(name = "crablet-bench", version, about, long_about = None)]
pub struct Args {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// With `compare`: the scenario to compare against its baseline.
    #[arg(value_enum)]
    pub target: Option<Scenario>,
    /// PostgreSQL connection string.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_URL)]
    pub database_url: String,
    /// Connection string of the store only (default: `--database-url`); e.g. to pass
    /// `options=-c plan_cache_mode=force_custom_plan` to the store's sessions but not to the
    /// raw baseline's.
    #[arg(long)]
    pub store_url: Option<String>,
    /// Rows per fetch of `query_stream` (the store's `stream_buffer`).
    #[arg(long, default_value_t = 1000)]
    pub stream_buffer: usize,
    /// Concurrent clients (tasks, each with its own pooled connection).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Events per append (and rows per raw INSERT).
    #[arg(long, default_value_t = 1)]
    pub events_per_append: usize,
    /// Measured seconds per timed run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds before each timed run (statement caches, connections).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Make sure the store holds at least this many events before measuring (bulk-loaded, and
    /// kept: nothing is ever truncated).
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// Partition the store's events by position in ranges of this many positions before the
    /// preload (`PostgresEventStore::partition`; the `--baseline-schema` store stays as it
    /// is), partitions created ahead of the preload's chunks.
    #[arg(long)]
    pub partition_range: Option<i64>,
    /// Schema of the store and of the raw baseline table; created with auto_migrate.
    #[arg(long, default_value = "crablet_bench")]
    pub schema: String,
    /// Drop and recreate the schema first.
    #[arg(long)]
    pub fresh: bool,
    /// Print one JSON line per run on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// With `compare`: how many baseline/scenario pairs.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// With `compare`: a different baseline scenario (default: the scenario's raw baseline).
    #[arg(long, value_enum)]
    pub baseline: Option<Scenario>,
    /// With `compare`: clients of the baseline (default: `--clients`).
    #[arg(long)]
    pub baseline_clients: Option<usize>,
    /// With `compare`: run the baseline in this schema instead (e.g. an empty store, to compare
    /// against a preloaded one); it gets no preload.
    #[arg(long)]
    pub baseline_schema: Option<String>,
    /// Skip the `ANALYZE` of the store's tables before each measured run. By default the bench
    /// analyzes, as autovacuum would in a long-running store: without statistics PostgreSQL
    /// plans the store's reads and checks for an empty table.
    #[arg(long)]
    pub no_analyze: bool,
    /// Events per append of `batch`, commands per `commands` and rows per INSERT of
    /// `raw-batch` and `raw-commands`.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// A decision boundary of `append-if`/`append-if-hot` is retired after this many successful
    /// decisions, so decision reads stay the size of a realistic boundary.
    #[arg(long, default_value_t = 100)]
    pub boundary_size: u64,
    /// `append-if-hot`: how a client retries after a conflict. By default with the library's
    /// `dcb_command::RetryPolicy::default()` (up to 10 attempts, jittered backoff from 2 ms
    /// doubling to 64 ms; an operation that still conflicts counts as given up). A value above
    /// 0 waits a random time in `[b/2, b]` with `b = min(32, 2^(n-1)) x this many ms` after
    /// the n-th conflict instead, without an attempt limit.
    #[arg(long, default_value_t = 0.0)]
    pub hot_backoff_ms: f64,
    /// `append-if-hot`: retry at once after a conflict, without an attempt limit (no policy).
    #[arg(long, conflicts_with = "hot_backoff_ms")]
    pub hot_at_once: bool,
    /// Raw inserts (`raw-insert`, `raw-batch`) go to `bench_raw_indexed`, which carries the
    /// store's secondary indexes (GIN on tags with fastupdate off, B-tree on type): the cost
    /// PostgreSQL charges for those indexes, apart from crablet's own.
    #[arg(long)]
    pub raw_indexes: bool,
    /// Raw inserts (`raw-insert`, `raw-batch`) also take the advisory locks an unconditional
    /// append takes (shared keys for the type, each tag and each type/tag pair, plus one for
    /// the whole log; one exclusive key past 48), in the same statement: with `--raw-indexes`,
    /// the floor of a locked, indexed append through this client stack.
    #[arg(long)]
    pub raw_locks: bool,
    /// The store's `group_commit_max`: the most appends one shared transaction carries; 1
    /// turns group commit off (every append its own transaction, as before group commit).
    #[arg(long, default_value_t = 32)]
    pub group_commit_max: usize,
    /// The store's `group_commit_flushers`: groups in flight at once.
    #[arg(long, default_value_t = 4)]
    pub group_commit_flushers: usize,
    /// Install a Prometheus metrics recorder (no HTTP listener) for the run, as an application
    /// exporting crablet's metrics would: what recording them costs. Off, the `metrics` calls
    /// go to the facade's no-op recorder.
    #[arg(long)]
    pub metrics: bool,
}

impl Args {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.1))
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.max(0.0))
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(message) = run(args).await {
        eprintln!("crablet-bench: {message}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.clients == 0 || args.events_per_append == 0 || args.batch_size == 0 {
        return Err("--clients, --events-per-append and --batch-size must be at least 1".into());
    }
    let target = match (args.scenario, args.target) {
        (Scenario::Compare, Some(Scenario::Compare)) | (Scenario::Compare, None) => {
            return Err("usage: compare SCENARIO (e.g. `compare append`)".into())
        }
        (Scenario::Compare, Some(t)) => t,
        (s, None) => s,
        (_, Some(_)) => return Err("a second scenario is only accepted after `compare`".into()),
    };
    // Kept alive for the run: the recorder's handle.
    let _recorder = if args.metrics {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| format!("installing the metrics recorder failed: {e}"))?;
        dcb_core::store_metrics::describe_metrics();
        Some(handle)
    } else {
        None
    };
    let max_clients = args.clients.max(args.baseline_clients.unwrap_or(1));
    let ctx = Arc::new(
        Ctx::open(
            &args,
            &args.schema,
            args.fresh,
            args.preload,
            max_clients,
            args.partition_range,
        )
        .await?,
    );
    ctx.print_environment(args.json).await?;

    if args.scenario == Scenario::Compare {
        let baseline = args
            .baseline
            .or(target.baseline())
            .ok_or_else(|| format!("{} has no baseline; pass --baseline", target.name()))?;
        let baseline_ctx = match &args.baseline_schema {
            Some(schema) if schema != &args.schema => {
                Arc::new(Ctx::open(&args, schema, args.fresh, 0, max_clients, None).await?)
            }
            _ => ctx.clone(),
        };
        return compare(&args, &ctx, &baseline_ctx, target, baseline).await;
    }

    let result = measure(&args, &ctx, target, args.clients).await?;
    report(&args, &result);
    // batch and stream are always reported next to their raw baseline.
    if matches!(
        target,
        Scenario::Batch | Scenario::Commands | Scenario::Stream
    ) {
        if let Some(baseline) = target.baseline() {
            let base = measure(&args, &ctx, baseline, args.clients).await?;
            report(&args, &base);
            report_ratio(&args, &result, &base);
        }
    }
    Ok(())
}

/// One warmed-up, measured run of `scenario` (or one pass, for the streams).
async fn measure(
    args: &Args,
    ctx: &Arc<Ctx>,
    scenario: Scenario,
    clients: usize,
) -> Result<RunResult, String> {
    ctx.prepare_fixtures(scenario).await?;
    if !args.no_analyze {
        ctx.analyze().await?;
    }
    if scenario.is_pass() {
        return workload::stream_pass(ctx, scenario).await;
    }
    if !args.warmup().is_zero() {
        workload::run_timed(ctx, scenario, clients, args.warmup(), false).await;
    }
    Ok(workload::run_timed(ctx, scenario, clients, args.duration(), true).await)
}

async fn compare(
    args: &Args,
    ctx: &Arc<Ctx>,
    baseline_ctx: &Arc<Ctx>,
    target: Scenario,
    baseline: Scenario,
) -> Result<(), String> {
    let baseline_clients = args.baseline_clients.unwrap_or(args.clients);
    let mut ratios = Vec::new();
    let mut pairs = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let base = measure(args, baseline_ctx, baseline, baseline_clients).await?;
        report(args, &base);
        let result = measure(args, ctx, target, args.clients).await?;
        report(args, &result);
        let ratio = stats::ratio(&result, &base);
        if !args.json {
            println!(
                "round {round}: {} {:.1} ev/s vs {} {:.1} ev/s -> ratio {:.3}",
                result.label(),
                result.events_per_s,
                base.label(),
                base.events_per_s,
                ratio
            );
        }
        ratios.push(ratio);
        pairs.push((result, base));
    }
    let median = stats::median(&ratios);
    let conflicts: u64 = pairs.iter().map(|(r, _)| r.conflicts).sum();
    let errors: u64 = pairs.iter().map(|(r, b)| r.errors + b.errors).sum();
    if args.json {
        let line = serde_json::json!({
            "scenario": "compare",
            "target": target.name(),
            "baseline": baseline.name(),
            "clients": args.clients,
            "baseline_clients": baseline_clients,
            "events_per_append": args.events_per_append,
            "schema": ctx.schema,
            "baseline_schema": baseline_ctx.schema,
            "ratios": ratios,
            "median_ratio": median,
            "target_events_per_s": pairs.iter().map(|(r, _)| r.events_per_s).collect::<Vec<_>>(),
            "baseline_events_per_s": pairs.iter().map(|(_, b)| b.events_per_s).collect::<Vec<_>>(),
            "conflicts": conflicts,
            "errors": errors,
        });
        println!("{line}");
    } else {
        let list: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "compare {} (clients={}) / {} (clients={}{}): ratios [{}], median {:.3}; conflicts {}, errors {}",
            target.name(),
            args.clients,
            baseline.name(),
            baseline_clients,
            if baseline_ctx.schema == ctx.schema {
                String::new()
            } else {
                format!(", schema {}", baseline_ctx.schema)
            },
            list.join(", "),
            median,
            conflicts,
            errors
        );
    }
    Ok(())
}

fn report(args: &Args, result: &RunResult) {
    if args.json {
        println!("{}", result.to_json());
    } else {
        println!("{}", result.human());
    }
}

fn report_ratio(args: &Args, result: &RunResult, base: &RunResult) {
    let ratio = stats::ratio(result, base);
    if args.json {
        let line = serde_json::json!({
            "scenario": "ratio",
            "target": result.scenario,
            "baseline": base.scenario,
            "ratio": ratio,
        });
        println!("{line}");
    } else {
        println!(
            "ratio {} / {} = {:.3} (events/s)",
            result.scenario, base.scenario, ratio
        );
    }
}
