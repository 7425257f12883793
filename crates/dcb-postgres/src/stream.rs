//! `query_stream`: a fenced read through a server-side portal, fetched `stream_buffer` rows at a
//! time by a task that owns its connection and hands batches over a bounded channel.
use crate::config::IsolationLevel;
use crate::conn::{db_error_with_timeout, Conn};
use crate::sql;
use crate::standby::HORIZON_SQL;
use crate::store::{event_from_row, prepare, within, PostgresEventStore, SET_FENCE};
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
///
/// The connection stays inside its exchange until the read committed: dropped earlier (the
/// consumer is gone, a step timed out, the runtime shuts down), it is inside a transaction with
/// an open portal and is closed instead of going back to the pool.
async fn produce(
    store: &PostgresEventStore,
    query: &Query,
    options: ReadOptions,
    tx: &mpsc::Sender<Result<Vec<Event>, Error>>,
) -> Result<(), Error> {
    validate_query(query)?;
    dcb_core::validate_read_options(&options)?;
    let query = &query.simplified();
    let mut standby = store.standby_for_read("query_stream").await?;
    let mut failovers = 0;
    while let Some(node) = standby {
        let mut sent = Sent::default();
        let mut attempt = 0;
        loop {
            let Some(resumed) = sent.resumed(&options) else {
                return Ok(());
            };
            let read = async {
                let conn = store.standby_conn(node, "query_stream").await?;
                produce_on(store, conn, true, query, &resumed, tx, &mut sent).await
            };
            match read.await {
                Ok(()) => return Ok(()),
                // Cancelled by a conflict with recovery (replay removed rows the stream's
                // snapshot could still see: an ERROR while a fetch runs, a FATAL that ends the
                // session while it waits for the consumer): the stream goes on after the last
                // event it delivered, with a new snapshot. Every event it has not delivered
                // is still after that cursor, so nothing is skipped or repeated.
                Err(
                    Error::Conflict(dcb_core::ConflictInfo {
                        conflicting: None, ..
                    })
                    | Error::Storage { .. },
                ) if attempt < RECOVERY_RESUMES => {
                    attempt += 1;
                    tracing::debug!(attempt, "standby stream cancelled by recovery; resuming");
                }
                // Once events were delivered the stream ends with the error (a subscription
                // goes on from its last cursor); before, the read may still run on the primary.
                Err(e) if sent.events > 0 => return Err(e),
                Err(e) => {
                    standby = store
                        .failover(node, "query_stream", e, &mut failovers)
                        .await?;
                    break;
                }
            }
        }
    }
    let conn = Conn::get(&store.inner.pool, "query_stream").await?;
    produce_on(
        store,
        conn,
        false,
        query,
        &options,
        tx,
        &mut Sent::default(),
    )
    .await
}

/// How many times a standby stream cancelled by conflicts with recovery is resumed.
const RECOVERY_RESUMES: usize = 8;

/// What a stream has handed to its consumer so far.
#[derive(Default)]
struct Sent {
    events: usize,
    last: Option<dcb_core::Cursor>,
}

impl Sent {
    /// The options that read the rest of `original` after what was sent; `None` when its
    /// limit is reached.
    fn resumed(&self, original: &ReadOptions) -> Option<ReadOptions> {
        let mut options = *original;
        if let Some(limit) = original.limit {
            let left = limit.checked_sub(self.events).filter(|&n| n > 0)?;
            options.limit = Some(left);
        }
        if let Some(last) = self.last {
            match original.direction {
                dcb_core::Direction::Forwards => options.after = Some(last),
                dcb_core::Direction::Backwards => options.before = Some(last),
            }
        }
        Some(options)
    }
}

/// [`produce`] on `conn` (a standby's when `on_standby`); `sent` counts what was handed to
/// the consumer.
async fn produce_on(
    store: &PostgresEventStore,
    mut conn: Conn,
    on_standby: bool,
    query: &Query,
    options: &ReadOptions,
    tx: &mpsc::Sender<Result<Vec<Event>, Error>>,
    sent: &mut Sent,
) -> Result<(), Error> {
    let inner = &store.inner;
    let timeout = inner.config.query_timeout;
    let map = |e| db_error_with_timeout("query_stream", e, false, Some(timeout));
    conn.begin_exchange("query_stream")?;
    let stmt = sql::read(&inner.schema, query, options);
    let begin_read = store
        .begin_read(query, options)
        .replacen("BEGIN", "SET TRANSACTION", 1);
    let begin_read = if on_standby {
        crate::store::standby_begin(&begin_read, inner.config.read_isolation).into_owned()
    } else {
        begin_read
    };
    let object = conn.object_mut();
    // Up to the first fetch: one step of at most `query_timeout`.
    let opening = async {
        // Under READ COMMITTED the fence runs inside the read's transaction, just before the
        // portal opens; a transaction-wide snapshot must be taken after the fence, so there it
        // runs first, in a transaction of its own. A standby's horizon needs no locks: it
        // runs inside the read's transaction at any level.
        let taken = if on_standby || inner.config.read_isolation == IsolationLevel::ReadCommitted {
            None
        } else {
            Some(store.fence_alone(object, query, "query_stream").await?)
        };
        let prepared = prepare(object, &stmt.sql, "query_stream").await?;
        let fence = match taken {
            None if on_standby => prepare(object, HORIZON_SQL, "query_stream").await?,
            None => prepare(object, &inner.fence_sql, "query_stream").await?,
            Some(_) => prepare(object, SET_FENCE, "query_stream").await?,
        };
        let client: &mut tokio_postgres::Client = object;
        let transaction = client.transaction().await.map_err(map)?;
        transaction.batch_execute(&begin_read).await.map_err(map)?;
        match &taken {
            None if on_standby => transaction.execute(&fence, &[]).await.map_err(map)?,
            None => {
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
        Ok::<_, Error>((transaction, portal))
    };
    let (transaction, portal) = within(timeout, "query_stream", opening).await?;
    let batch = i32::try_from(inner.config.stream_buffer).unwrap_or(i32::MAX);
    loop {
        let rows = within(timeout, "query_stream", async {
            transaction.query_portal(&portal, batch).await.map_err(map)
        })
        .await?;
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
        // The events before an undecodable row are delivered, then its error ends the stream.
        if !events.is_empty() {
            let (count, last) = (events.len(), events.last().map(|e| e.cursor));
            if tx.send(Ok(events)).await.is_err() {
                // The consumer is gone: the connection is closed with its transaction.
                return Ok(());
            }
            sent.events += count;
            sent.last = last;
        }
        if let Some(err) = undecodable {
            return Err(err);
        }
        if done {
            break;
        }
    }
    within(timeout, "query_stream", async {
        transaction.commit().await.map_err(map)
    })
    .await?;
    conn.end_exchange();
    Ok(())
}
