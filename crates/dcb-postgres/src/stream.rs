//! `query_stream`: a fenced read through a server-side portal, fetched `stream_buffer` rows at a
//! time by a task that owns its connection and hands events over a bounded channel.
use crate::conn::{db_error_with_timeout, Conn};
use crate::sql;
use crate::store::{event_from_row, prepare, PostgresEventStore};
use dcb_core::{validate_query, Error, Event, EventStream, Query, ReadOptions};
use tokio::sync::mpsc;

pub(crate) fn query_stream(
    store: PostgresEventStore,
    query: Query,
    options: ReadOptions,
) -> EventStream {
    let buffer = store.inner.config.stream_buffer;
    let (tx, mut rx) = mpsc::channel::<Result<Event, Error>>(buffer);
    tokio::spawn(async move {
        let span = tracing::debug_span!("pg.query_stream", items = query.items.len());
        let _enter = span.enter();
        if let Err(err) = produce(&store, &query, options, &tx).await {
            let _ = tx.send(Err(err)).await;
        }
    });
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// Sends every event of the read; returns early (without error) when the consumer is gone.
async fn produce(
    store: &PostgresEventStore,
    query: &Query,
    options: ReadOptions,
    tx: &mpsc::Sender<Result<Event, Error>>,
) -> Result<(), Error> {
    validate_query(query)?;
    dcb_core::validate_read_options(&options)?;
    let inner = &store.inner;
    let timeout = Some(inner.config.query_timeout);
    let map = |e| db_error_with_timeout("query_stream", e, false, timeout);
    let mut conn = Conn::get(&inner.pool, "query_stream").await?;
    let (xmax, xip) = store.fence(&conn, query).await?;
    let stmt = sql::read(&inner.schema, query, &options, xmax, xip);
    let prepared = prepare(conn.object(), &stmt.sql, "query_stream").await?;
    // Dropped mid-stream (consumer gone, runtime shutting down): the connection is inside a
    // transaction with an open portal, so it must not go back to the pool as is.
    conn.begin_exchange();
    {
        let client: &mut tokio_postgres::Client = conn.object_mut();
        let transaction = client.transaction().await.map_err(map)?;
        transaction
            .batch_execute(&inner.begin_read.replacen("BEGIN", "SET TRANSACTION", 1))
            .await
            .map_err(map)?;
        let portal = transaction
            .bind(&prepared, &stmt.param_refs())
            .await
            .map_err(map)?;
        let batch = i32::try_from(inner.config.stream_buffer).unwrap_or(i32::MAX);
        loop {
            let rows = transaction
                .query_portal(&portal, batch)
                .await
                .map_err(map)?;
            let done = rows.len() < batch as usize;
            for row in &rows {
                if tx.send(event_from_row(row)).await.is_err() {
                    return Ok(());
                }
            }
            if done {
                break;
            }
        }
        transaction.commit().await.map_err(map)?;
    }
    conn.end_exchange();
    Ok(())
}
