//! `crablet handlers list | reset | parked | replay | drop-parked`.
use crate::connect::Target;
use crate::error::{CliError, CliResult};
use crate::format::{fit, output_width, rfc3339, table, Align};
use dcb_core::Cursor;
use dcb_postgres::{HandlerOverview, ParkedError, PostgresEventStore};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

/// A handler as JSON (for `status --json` and `handlers list --json`).
pub fn handler_json(handler: &HandlerOverview) -> Value {
    json!({
        "name": handler.name,
        "checkpoint": handler.checkpoint.map(|c| c.to_string()),
        "updated_at": rfc3339(handler.updated_at),
        "lag_events": handler.lag.events,
        "lag_seconds": handler.lag.seconds,
        "lease_held": handler.lease_held,
        "attempts": handler.attempts,
        "failing_at": handler.failing_at.map(|c| c.to_string()),
        "last_error": handler.last_error,
        "last_error_at": handler.last_error_at.map(rfc3339),
        "parked": handler.parked,
    })
}

/// Seconds, with milliseconds while they are few.
fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}")
    } else {
        format!("{s:.1}")
    }
}

/// The handlers as a table, one row each: `LAG_EVENTS` counts the events after the checkpoint,
/// `LAG_S` is the age of the oldest of them (the handler metrics' definition).
pub fn handlers_table(handlers: &[HandlerOverview]) -> String {
    let rows: Vec<Vec<String>> = handlers
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.checkpoint
                    .map_or_else(|| "(start)".to_string(), |c| c.to_string()),
                h.lag.events.to_string(),
                seconds(h.lag.seconds),
                if h.lease_held { "held" } else { "free" }.to_string(),
                h.attempts.to_string(),
                h.parked.to_string(),
                match (&h.last_error, h.failing_at) {
                    (Some(error), Some(at)) => fit(&format!("at {at}: {error}"), Some(60)),
                    (Some(error), None) => fit(error, Some(60)),
                    _ => "-".to_string(),
                },
            ]
        })
        .collect();
    table(
        "  ",
        &[
            ("NAME", Align::Left),
            ("CHECKPOINT", Align::Left),
            ("LAG_EVENTS", Align::Right),
            ("LAG_S", Align::Right),
            ("LEASE", Align::Left),
            ("ATTEMPTS", Align::Right),
            ("PARKED", Align::Right),
            ("LAST_ERROR", Align::Left),
        ],
        &rows,
    )
}

/// `handlers list`.
pub async fn list(target: &Target, as_json: bool) -> CliResult {
    let store = target.connect().await?;
    let handlers = store.handlers().await?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let values: Vec<Value> = handlers.iter().map(handler_json).collect();
        let text = serde_json::to_string_pretty(&values).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else if handlers.is_empty() {
        writeln!(out, "no durable handlers in schema {:?}", target.schema)?;
    } else {
        writeln!(out, "{}", handlers_table(&handlers))?;
    }
    out.flush()?;
    Ok(())
}

/// The handler named `name`, or an error listing the known ones.
async fn existing(
    store: &PostgresEventStore,
    target: &Target,
    name: &str,
) -> CliResult<HandlerOverview> {
    if let Some(handler) = store.handler_overview(name).await? {
        return Ok(handler);
    }
    Err(unknown_handler(store, target, name).await)
}

async fn unknown_handler(store: &PostgresEventStore, target: &Target, name: &str) -> CliError {
    let known = match store.handlers().await {
        Ok(handlers) if handlers.is_empty() => "there are none".to_string(),
        Ok(handlers) => format!(
            "known: {}",
            handlers
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(err) => return err.into(),
    };
    CliError::Other(format!(
        "no handler named {name:?} in schema {:?} ({known})",
        target.schema
    ))
}

fn describe(cursor: Option<Cursor>) -> String {
    cursor.map_or_else(|| "the beginning".to_string(), |c| c.to_string())
}

/// `handlers reset NAME [--to CURSOR] [--create]`.
pub async fn reset(target: &Target, name: &str, to: Option<Cursor>, create: bool) -> CliResult {
    let store = target.connect().await?;
    let before = match store.handler_overview(name).await? {
        Some(handler) => Some(handler),
        None if create => None,
        None => {
            let err = unknown_handler(&store, target, name).await;
            return Err(CliError::Other(format!(
                "{}; pass --create to set the checkpoint of a handler that has not run yet",
                err.one_line()
            )));
        }
    };
    store.reset_handler(name, to).await?;
    let after = store.handler_overview(name).await?;
    let dropped = match (&before, &after) {
        (Some(b), Some(a)) => b.parked.saturating_sub(a.parked),
        _ => 0,
    };
    let from = before
        .as_ref()
        .map_or_else(|| "(never ran)".to_string(), |b| describe(b.checkpoint));
    let mut out = std::io::stdout().lock();
    write!(
        out,
        "handler {name:?}: checkpoint moved from {from} to {}",
        describe(to)
    )?;
    if dropped > 0 {
        write!(out, "; {dropped} parked event(s) after it dropped")?;
    }
    if let Some(after) = after {
        write!(out, "; {} event(s) to process", after.lag.events)?;
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// `handlers parked NAME`.
pub async fn parked(target: &Target, name: &str, as_json: bool) -> CliResult {
    let store = target.connect().await?;
    existing(&store, target, name).await?;
    let parked = store.parked_events(name).await?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let values: Vec<Value> = parked
            .iter()
            .map(|p| {
                json!({
                    "handler": p.handler,
                    "cursor": p.cursor.to_string(),
                    "type": p.event_type,
                    "error": p.error,
                    "attempts": p.attempts,
                    "parked_at": rfc3339(p.parked_at),
                    "last_attempt_at": rfc3339(p.last_attempt_at),
                    "replay_requested_at": p.replay_requested_at.map(rfc3339),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&values).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")?;
    } else if parked.is_empty() {
        writeln!(out, "handler {name:?} has no parked events")?;
    } else {
        let error_width = output_width().saturating_sub(100).max(30);
        let rows: Vec<Vec<String>> = parked
            .iter()
            .map(|p| {
                vec![
                    p.cursor.to_string(),
                    p.event_type.clone(),
                    p.attempts.to_string(),
                    rfc3339(p.parked_at),
                    rfc3339(p.last_attempt_at),
                    if p.replay_requested_at.is_some() {
                        "requested"
                    } else {
                        "-"
                    }
                    .to_string(),
                    fit(&p.error, Some(error_width)),
                ]
            })
            .collect();
        let text = table(
            "",
            &[
                ("CURSOR", Align::Left),
                ("TYPE", Align::Left),
                ("ATTEMPTS", Align::Right),
                ("PARKED_AT", Align::Left),
                ("LAST_ATTEMPT_AT", Align::Left),
                ("REPLAY", Align::Left),
                ("ERROR", Align::Left),
            ],
            &rows,
        );
        writeln!(out, "{text}")?;
    }
    out.flush()?;
    Ok(())
}

/// `handlers replay NAME CURSOR [--no-wait | --timeout SECONDS]`: marks the parked event for the
/// running instance (which has the handler's code) and, when `wait` is given, polls the row until
/// it is gone (replayed) or its attempt count moved (failed again).
pub async fn replay(
    target: &Target,
    name: &str,
    cursor: Cursor,
    wait: Option<Duration>,
) -> CliResult {
    let store = target.connect().await?;
    let handler = existing(&store, target, name).await?;
    let requested = match store.request_replay(name, cursor).await {
        Ok(parked) => parked,
        Err(ParkedError::NotFound { .. }) => {
            return Err(CliError::Other(format!(
                "handler {name:?} has no parked event at {cursor} (see `crablet handlers parked {name}`)"
            )))
        }
        Err(err) => return Err(err.into()),
    };
    let mut out = std::io::stdout().lock();
    let Some(wait) = wait.filter(|_| handler.lease_held) else {
        let when = if handler.lease_held {
            "the running instance will retry it within its poll interval"
        } else {
            "no instance of it is running: the first one to start will retry it"
        };
        writeln!(
            out,
            "replay of parked event {cursor} (type {}) of handler {name:?} requested; {when}",
            requested.event_type
        )?;
        out.flush()?;
        return Ok(());
    };
    let deadline = Instant::now() + wait;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = store.parked_events(name).await?;
        match now.iter().find(|p| p.cursor == cursor) {
            None => {
                writeln!(
                    out,
                    "replayed parked event {cursor} (type {}) of handler {name:?}: processed, no longer parked",
                    requested.event_type
                )?;
                out.flush()?;
                return Ok(());
            }
            Some(p) if p.attempts > requested.attempts => {
                return Err(CliError::Other(format!(
                    "replaying parked event {cursor} of handler {name:?} failed again (attempt {}): {}; it stays parked",
                    p.attempts, p.error
                )))
            }
            Some(_) if Instant::now() >= deadline => {
                return Err(CliError::Other(format!(
                    "parked event {cursor} of handler {name:?} was not replayed within {}s; the request stands (is the handler's instance stuck on a batch? see `crablet handlers list`)",
                    wait.as_secs()
                )))
            }
            Some(_) => {}
        }
    }
}

/// `handlers drop-parked NAME CURSOR`.
pub async fn drop_parked(target: &Target, name: &str, cursor: Cursor) -> CliResult {
    let store = target.connect().await?;
    existing(&store, target, name).await?;
    match store.drop_parked(name, cursor).await {
        Ok(event) => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "dropped parked event {} (type {}, {} failed attempt(s)) of handler {name:?}; it will not be processed",
                event.cursor, event.event_type, event.attempts
            )?;
            out.flush()?;
            Ok(())
        }
        Err(ParkedError::NotFound { .. }) => Err(CliError::Other(format!(
            "handler {name:?} has no parked event at {cursor} (see `crablet handlers parked {name}`)"
        ))),
        Err(err) => Err(err.into()),
    }
}
