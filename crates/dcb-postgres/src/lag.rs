//! How far a durable handler is behind: one definition for `crablet status`, health checks
//! and the handler metrics, so they agree.
use crate::xid8::Xid8;
use dcb_core::Cursor;

/// The lag of a handler at `checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HandlerLag {
    /// Events after the checkpoint (of any type: the checkpoint moves past events the handler
    /// does not select, so a caught-up handler has 0).
    pub events: u64,
    /// Seconds since the oldest event after the checkpoint was appended (by the database's
    /// clock); 0 when there is none.
    pub seconds: f64,
}

/// The statement computing [`HandlerLag`]; parameters: the checkpoint's transaction id and
/// position (both NULL for a handler that processed nothing).
pub(crate) fn lag_sql(schema: &str) -> String {
    format!(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(occurred_at)), 0)::float8 \
         FROM {schema}.events \
         WHERE $1::xid8 IS NULL OR (transaction_id, position) > ($1::xid8, $2::int8)"
    )
}

/// The statement's parameters for `checkpoint`.
pub(crate) fn lag_params(checkpoint: Option<Cursor>) -> (Option<Xid8>, Option<i64>) {
    (
        checkpoint.map(|c| Xid8(c.transaction_id)),
        checkpoint.map(|c| c.position),
    )
}

/// Reads a [`HandlerLag`] from the statement's row.
pub(crate) fn lag_from(row: &tokio_postgres::Row) -> Result<HandlerLag, tokio_postgres::Error> {
    let events: i64 = row.try_get(0)?;
    Ok(HandlerLag {
        events: u64::try_from(events).unwrap_or(0),
        seconds: row.try_get::<_, f64>(1)?.max(0.0),
    })
}
