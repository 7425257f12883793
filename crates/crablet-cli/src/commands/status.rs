//! `crablet status`.
use crate::commands::handlers::{handler_json, handlers_table};
use crate::connect::Target;
use crate::error::CliResult;
use crate::format::{bytes, rfc3339, table, Align};
use dcb_postgres::{HandlerOverview, StoreStats};
use serde_json::{json, Value};
use std::io::Write;

/// Prints the store's statistics and its handlers, as text or one JSON object.
pub async fn run(target: &Target, as_json: bool) -> CliResult {
    let store = target.connect().await?;
    let stats = store.stats().await?;
    let handlers = store.handlers().await?;
    let mut out = std::io::stdout().lock();
    if as_json {
        let value = status_json(&stats, &handlers);
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).map_err(std::io::Error::other)?
        )?;
    } else {
        writeln!(out, "{}", status_text(&stats, &handlers))?;
    }
    out.flush()?;
    Ok(())
}

fn status_json(stats: &StoreStats, handlers: &[HandlerOverview]) -> Value {
    json!({
        "schema": stats.schema,
        "schema_version": stats.schema_version,
        "events": stats.events,
        "head": stats.head.map(|c| c.to_string()),
        "head_occurred_at": stats.head_occurred_at.map(rfc3339),
        "commands": stats.commands,
        "total_bytes": stats.total_bytes,
        "tables": stats.tables.iter().map(|t| json!({
            "name": t.name,
            "table_bytes": t.table_bytes,
            "index_bytes": t.index_bytes,
            "total_bytes": t.total_bytes,
            "estimated_rows": t.estimated_rows,
        })).collect::<Vec<_>>(),
        "indexes": stats.indexes.iter().map(|i| json!({
            "name": i.name,
            "table": i.table,
            "bytes": i.bytes,
        })).collect::<Vec<_>>(),
        "handlers": handlers.iter().map(handler_json).collect::<Vec<_>>(),
    })
}

fn status_text(stats: &StoreStats, handlers: &[HandlerOverview]) -> String {
    let mut lines = Vec::new();
    let compatible = if stats.schema_version == dcb_postgres::SCHEMA_VERSION {
        String::new()
    } else {
        format!(
            " (this crablet needs version {}: run `crablet migrate`)",
            dcb_postgres::SCHEMA_VERSION
        )
    };
    lines.push(format!(
        "schema     {} (version {}){compatible}",
        stats.schema, stats.schema_version
    ));
    lines.push(format!("events     {}", stats.events));
    lines.push(match (stats.head, stats.head_occurred_at) {
        (Some(head), Some(at)) => format!("head       {head} (appended {})", rfc3339(at)),
        (Some(head), None) => format!("head       {head}"),
        _ => "head       - (no events)".to_string(),
    });
    lines.push(format!("commands   {}", stats.commands));
    lines.push(format!(
        "size       {} in {} tables and {} indexes",
        bytes(stats.total_bytes),
        stats.tables.len(),
        stats.indexes.len()
    ));
    lines.push(String::new());
    let rows: Vec<Vec<String>> = stats
        .tables
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                bytes(t.total_bytes),
                bytes(t.table_bytes),
                bytes(t.index_bytes),
                t.estimated_rows
                    .map_or_else(|| "-".to_string(), |r| r.to_string()),
            ]
        })
        .collect();
    lines.push(table(
        "",
        &[
            ("TABLE", Align::Left),
            ("TOTAL", Align::Right),
            ("TABLE_SIZE", Align::Right),
            ("INDEXES", Align::Right),
            ("ROWS(EST)", Align::Right),
        ],
        &rows,
    ));
    lines.push(String::new());
    let rows: Vec<Vec<String>> = stats
        .indexes
        .iter()
        .map(|i| vec![i.name.clone(), i.table.clone(), bytes(i.bytes)])
        .collect();
    lines.push(table(
        "",
        &[
            ("INDEX", Align::Left),
            ("ON", Align::Left),
            ("SIZE", Align::Right),
        ],
        &rows,
    ));
    lines.push(String::new());
    if handlers.is_empty() {
        lines.push("handlers   none".to_string());
    } else {
        lines.push(format!("handlers   {}", handlers.len()));
        lines.push(handlers_table(handlers));
    }
    lines.join("\n")
}
