//! The store's metrics, recorded through the [`metrics`] facade: every backend records the same
//! names with the same labels, so dashboards do not depend on the backend. Nothing is recorded
//! unless the application installs a recorder (an exporter such as
//! `metrics-exporter-prometheus`); then [`describe_metrics`] gives each metric its unit and help
//! text. `docs/operations.md` lists them with the alerts to set.
use crate::Error;
use std::time::Instant;

/// Seconds per append call (`append`, `append_if`, `append_batch`), by backend, operation and
/// outcome (`ok`, `conflict`, `invalid`, `timeout`, `error`).
pub const APPEND_DURATION: &str = "crablet_append_duration_seconds";
/// Events appended, by backend and operation.
pub const APPENDED_EVENTS: &str = "crablet_appended_events_total";
/// Append conditions that failed, by backend and operation.
pub const CONFLICTS: &str = "crablet_conflicts_total";
/// Seconds per `query` call, by backend and outcome.
pub const READ_DURATION: &str = "crablet_read_duration_seconds";
/// Events returned by reads (`query`, `query_stream`), by backend and operation.
pub const READ_EVENTS: &str = "crablet_read_events_total";
/// Calls per group commit (PostgreSQL), one observation per committed group.
pub const GROUP_COMMIT_CALLS: &str = "crablet_group_commit_calls";
/// Connections of the PostgreSQL pool, by state (`in_use`, `idle`, `max`), sampled whenever
/// one is taken.
pub const POOL_CONNECTIONS: &str = "crablet_pool_connections";
/// Events a durable handler processed, by handler.
pub const HANDLER_EVENTS: &str = "crablet_handler_events_total";
/// Failed handler batches, by handler.
pub const HANDLER_ERRORS: &str = "crablet_handler_errors_total";
/// Events after a durable handler's checkpoint, by handler, as of its last batch.
pub const HANDLER_LAG_EVENTS: &str = "crablet_handler_lag_events";
/// Age in seconds of the oldest event after a durable handler's checkpoint (0 when caught up),
/// by handler: the definition `crablet status` and `health()` use too.
pub const HANDLER_LAG_SECONDS: &str = "crablet_handler_lag_seconds";
/// The transaction id (the first part of the cursor) of a durable handler's checkpoint, by
/// handler, set at every committed batch. It keeps growing while the handler keeps up, also
/// over events it does not select: a flat line while events arrive means a stalled handler.
pub const HANDLER_POSITION: &str = "crablet_handler_checkpoint_transaction_id";
/// Commands executed, by command type and outcome (`committed`, `replayed`, `rejected`,
/// `conflict`, `invalid`, `decode_error`, `store_error`).
pub const COMMANDS: &str = "crablet_commands_total";
/// Seconds per command execution, including retries, by command type and outcome.
pub const COMMAND_DURATION: &str = "crablet_command_duration_seconds";
/// Conflicted command attempts that were retried, by command type.
pub const COMMAND_RETRIES: &str = "crablet_command_retries_total";
/// Counter: reads routed to a hot standby that fell back to the primary (label `operation`).
pub const STANDBY_FALLBACKS: &str = "crablet_standby_fallbacks_total";

/// Registers the unit and help text of every crablet metric with the installed recorder.
/// Call it once after installing an exporter; recording works without it.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(APPEND_DURATION, Unit::Seconds, "Duration of append calls");
    describe_counter!(APPENDED_EVENTS, Unit::Count, "Events appended");
    describe_counter!(CONFLICTS, Unit::Count, "Append conditions that failed");
    describe_histogram!(READ_DURATION, Unit::Seconds, "Duration of query calls");
    describe_counter!(READ_EVENTS, Unit::Count, "Events returned by reads");
    describe_histogram!(
        GROUP_COMMIT_CALLS,
        Unit::Count,
        "Append calls per group commit"
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        Unit::Count,
        "Connections of the pool by state"
    );
    describe_counter!(
        HANDLER_EVENTS,
        Unit::Count,
        "Events processed by durable handlers"
    );
    describe_counter!(
        HANDLER_ERRORS,
        Unit::Count,
        "Failed durable handler batches"
    );
    describe_gauge!(
        HANDLER_LAG_EVENTS,
        Unit::Count,
        "Events after a handler's checkpoint"
    );
    describe_gauge!(
        HANDLER_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest event after a handler's checkpoint"
    );
    describe_gauge!(
        HANDLER_POSITION,
        Unit::Count,
        "Transaction id of a handler's checkpoint cursor"
    );
    describe_counter!(COMMANDS, Unit::Count, "Commands executed by outcome");
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Duration of command executions"
    );
    describe_counter!(
        COMMAND_RETRIES,
        Unit::Count,
        "Command attempts retried after a conflict"
    );
    describe_counter!(
        STANDBY_FALLBACKS,
        Unit::Count,
        "Standby reads that fell back to the primary"
    );
}

/// The outcome label of a store result.
pub fn outcome<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::Conflict(_)) => "conflict",
        Err(Error::Validation(_)) => "invalid",
        Err(Error::Timeout { .. }) => "timeout",
        Err(_) => "error",
    }
}

/// `$make!(backend, operation)` with both as literals, for the backends and operations of this
/// workspace; `None` for any other pair. Literal labels make static metric keys: the per-call
/// label vector (about 250 bytes per append) is never built.
macro_rules! with_static_labels {
    ($backend:expr, $operation:expr, $make:ident!($($rest:tt)*)) => {
        match ($backend, $operation) {
            ("postgres", "append") => Some($make!("postgres", "append" $($rest)*)),
            ("postgres", "append_if") => Some($make!("postgres", "append_if" $($rest)*)),
            ("postgres", "append_batch") => Some($make!("postgres", "append_batch" $($rest)*)),
            ("memory", "append") => Some($make!("memory", "append" $($rest)*)),
            ("memory", "append_if") => Some($make!("memory", "append_if" $($rest)*)),
            ("memory", "append_batch") => Some($make!("memory", "append_batch" $($rest)*)),
            _ => None,
        }
    };
}

/// The [`APPEND_DURATION`] histogram of literal `backend` and `operation` and the runtime
/// `outcome` (one of [`outcome`]'s five).
macro_rules! append_duration {
    ($backend:literal, $operation:literal, $outcome:expr) => {
        match $outcome {
            "ok" => metrics::histogram!(APPEND_DURATION, "backend" => $backend, "operation" => $operation, "outcome" => "ok"),
            "conflict" => metrics::histogram!(APPEND_DURATION, "backend" => $backend, "operation" => $operation, "outcome" => "conflict"),
            "invalid" => metrics::histogram!(APPEND_DURATION, "backend" => $backend, "operation" => $operation, "outcome" => "invalid"),
            "timeout" => metrics::histogram!(APPEND_DURATION, "backend" => $backend, "operation" => $operation, "outcome" => "timeout"),
            _ => metrics::histogram!(APPEND_DURATION, "backend" => $backend, "operation" => $operation, "outcome" => "error"),
        }
    };
}

/// The counter `$name` of literal `backend` and `operation`.
macro_rules! call_counter {
    ($backend:literal, $operation:literal, $name:expr) => {
        metrics::counter!($name, "backend" => $backend, "operation" => $operation)
    };
}

/// Records one append call of `events` events that started at `started`.
pub fn record_append<T>(
    backend: &'static str,
    operation: &'static str,
    events: usize,
    started: Instant,
    result: &Result<T, Error>,
) {
    let outcome = outcome(result);
    with_static_labels!(backend, operation, append_duration!(, outcome))
        .unwrap_or_else(|| {
            metrics::histogram!(APPEND_DURATION, "backend" => backend, "operation" => operation, "outcome" => outcome)
        })
        .record(started.elapsed().as_secs_f64());
    let counter = |name: &'static str| {
        with_static_labels!(backend, operation, call_counter!(, name)).unwrap_or_else(
            || metrics::counter!(name, "backend" => backend, "operation" => operation),
        )
    };
    match outcome {
        "ok" => counter(APPENDED_EVENTS).increment(events as u64),
        "conflict" => counter(CONFLICTS).increment(1),
        _ => {}
    }
}

/// Records one `query` call that started at `started`.
pub fn record_query(
    backend: &'static str,
    started: Instant,
    result: &Result<Vec<crate::Event>, Error>,
) {
    metrics::histogram!(READ_DURATION, "backend" => backend, "outcome" => outcome(result))
        .record(started.elapsed().as_secs_f64());
    if let Ok(events) = result {
        record_read_events(backend, "query", events.len());
    }
}

/// Records `events` events returned by a read.
pub fn record_read_events(backend: &'static str, operation: &'static str, events: usize) {
    metrics::counter!(READ_EVENTS, "backend" => backend, "operation" => operation)
        .increment(events as u64);
}

/// Counts the events of a stream as they pass.
pub fn counted_stream(backend: &'static str, stream: crate::EventStream) -> crate::EventStream {
    use futures_util::StreamExt;
    stream
        .inspect(move |item| {
            if item.is_ok() {
                record_read_events(backend, "query_stream", 1);
            }
        })
        .boxed()
}
