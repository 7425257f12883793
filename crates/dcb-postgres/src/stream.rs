//! `query_stream`: a fenced read through a server-side portal, fetched `stream_buffer` rows at a
//! time by a task that owns its connection and hands batches over a bounded channel.
use crate::config::IsolationLevel;
use crate::conn::{db_error_with_timeout, Conn};
use crate::sql;
use crate::store::{event_from_row, prepare, PostgresEventStore, SET_FENCE};
use dcb_core::{validate_query, Error, Event, EventStream, Query, ReadOptions};
use std::task::Poll;
use tokio::sync::mpsc;
use tracing::Instrument;

pub(crate) fn query_stream(
    store: PostgresEventStore,
    query: Query,
    options: ReadOptions,
) -> EventStream {
    // Events travel in fetched batches: one hand-off per batch instead of per event, and the
    // producer fetches the next batch while the consumer drains this one. At most three batches
    // of `stream_buffer` events exist at once (being fetched, queued, being consumed).
    let (tx, mut rx) = mpsc::channel::<Result<Vec<Event>, Error>>(1);
    let span = tracing::debug_span!("pg.query_stream", items = query.items.len());
    tokio::spawn(
        async move {
            if let Err(err) = produce(&store, &query, options, &tx).await {
                let _ = tx.send(Err(err)).await;
            }
        }
        .instrument(span),
    );
    let mut current = Vec::new().into_iter();
    Box::pin(futures_util::stream::poll_fn(move |cx| loop {
        if let Some(event) = current.next() {
            return Poll::Ready(Some(Ok(event)));
        }
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(batch))) => current = batch.into_iter(),
            Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
    }))
}

/// Sends every event of the read; returns early (without error) when the consumer is gone.
async fn produce(
    store: &PostgresEventStore,
    query: &Query,
    options: ReadOptions,
    tx: &mpsc::Sender<Result<Vec<Event>, Error>>,
) -> Result<(), Error> {
    validate_query(query)?;
    dcb_core::validate_read_options(&options)?;
    let query = &query.simplified();
    let inner = &store.inner;
    let timeout = Some(inner.config.query_timeout);
    let map = |e| db_error_with_timeout("query_stream", e, false, timeout);
    let mut conn = Conn::get(&inner.pool, "query_stream").await?;
    // Under READ COMMITTED the fence runs inside the read's transaction, just before the portal
    // opens; a transaction-wide snapshot must be taken after the fence, so there it runs first.
    let taken = if inner.config.read_isolation == IsolationLevel::ReadCommitted {
        None
    } else {
        Some(store.fence_alone(&conn, query, "query_stream").await?)
    };
    let stmt = sql::read(&inner.schema, query, &options);
    let prepared = prepare(conn.object(), &stmt.sql, "query_stream").await?;
    let fence = match taken {
        None => prepare(conn.object(), &inner.fence_sql, "query_stream").await?,
        Some(_) => prepare(conn.object(), SET_FENCE, "query_stream").await?,
    };
    // Dropped mid-stream (consumer gone, runtime shutting down): the connection is inside a
    // transaction with an open portal, so it must not go back to the pool as is.
    conn.begin_exchange();
    {
        let client: &mut tokio_postgres::Client = conn.object_mut();
        let transaction = client.transaction().await.map_err(map)?;
        transaction
            .batch_execute(&store.begin_read(query, &options).replacen(
                "BEGIN",
                "SET TRANSACTION",
                1,
            ))
            .await
            .map_err(map)?;
        match &taken {
            None => {
                // Under READ COMMITTED only: `fence_alone` derived its own.
                let (keys, exclusive) = store.fence_params(query);
                transaction
                    .execute(&fence, &[&keys, &exclusive])
                    .await
                    .map_err(map)?
            }
            Some(snapshot) => transaction
                .execute(&fence, &[snapshot])
                .await
                .map_err(map)?,
        };
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
            let mut events = Vec::with_capacity(rows.len());
            let mut undecodable = None;
            for row in &rows {
                match event_from_row(row) {
                    Ok(event) => events.push(event),
                    Err(err) => {
                        undecodable = Some(err);
                        break;
                    }
                }
            }
            // The events before an undecodable row are delivered, then its error ends the
            // stream.
            if !events.is_empty() && tx.send(Ok(events)).await.is_err() {
                // The consumer is gone: the transaction rolls back when dropped.
                return Ok(());
            }
            if let Some(err) = undecodable {
                return Err(err);
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
