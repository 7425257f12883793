//! The core traits ([`EventReader`], [`EventStore`]) for [`PostgresEventStore`]: the entry
//! points, each a thin call into the module that does the work (reads in `store.rs`, streams in
//! `stream.rs`, appends in `append.rs`, `group.rs` and `batch.rs`, sessions in `session.rs`).
//! Kept apart from `store.rs` so that those modules depend on the store and not the other way
//! round.
use crate::conn::Conn;
use crate::session::PgCommandSession;
use crate::store::PostgresEventStore;
use std::time::Instant;

const BACKEND: &str = "postgres";
use async_trait::async_trait;
use dcb_core::store_metrics::{counted_stream, record_append, record_query};
use dcb_core::{
    validate_query, AppendCommand, AppendCondition, CommandFilter, CommandRecord, CommandSession,
    Cursor, Error, Event, EventReader, EventStore, EventStream, NewEvent, ProjectionPermit, Query,
    ReadOptions,
};

#[async_trait]
impl EventReader for PostgresEventStore {
    #[tracing::instrument(name = "pg.query", skip_all, fields(items = query.items.len()))]
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        let started = Instant::now();
        let result = async {
            validate_query(query)?;
            dcb_core::validate_read_options(&options)?;
            let mut standby = self.standby_for_read("query").await?;
            let mut failovers = 0;
            while let Some(node) = standby {
                let read = self
                    .on_standby_retrying(node, "query", |conn| async move {
                        self.read_on(&conn, query, options, true).await
                    })
                    .await;
                match read {
                    Ok(events) => return Ok(events),
                    Err(e) => standby = self.failover(node, "query", e, &mut failovers).await?,
                }
            }
            let conn = Conn::get(&self.inner.pool, "query").await?;
            self.read_on(&conn, query, options, false).await
        }
        .await;
        record_query(BACKEND, started, &result);
        result
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        counted_stream(
            BACKEND,
            crate::stream::query_stream(self.clone(), query.clone(), options),
        )
    }

    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        self.inner
            .projections
            .clone()
            .try_acquire_owned()
            .map(ProjectionPermit::new)
            .map_err(|_| Error::TooManyProjections {
                limit: self.inner.config.max_concurrent_projections,
            })
    }

    /// Woken by this store's appends and, through LISTEN, by other processes' (see
    /// [`StoreConfig::notify_on_append`](crate::StoreConfig::notify_on_append)). A store built with `from_pool` has no URL for the
    /// listener's own connection: its subscribers are woken by its own appends and poll.
    fn change_feed(&self) -> Option<dcb_core::ChangeFeed> {
        Some(self.inner.changes.feed())
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    #[tracing::instrument(name = "pg.append", skip_all, fields(events = events.len()))]
    async fn append(&self, events: Vec<NewEvent>) -> Result<Cursor, Error> {
        let (started, count) = (Instant::now(), events.len());
        let result = self.append_partitioned(events, None).await;
        record_append(BACKEND, "append", count, started, &result);
        result
    }

    #[tracing::instrument(name = "pg.append_if", skip_all, fields(events = events.len()))]
    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error> {
        let (started, count) = (Instant::now(), events.len());
        let result = self.append_partitioned(events, Some(&condition)).await;
        record_append(BACKEND, "append_if", count, started, &result);
        result
    }

    #[tracing::instrument(name = "pg.append_batch", skip_all, fields(commands = commands.len()))]
    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error> {
        let started = Instant::now();
        let count = commands.iter().map(|c| c.events.len()).sum();
        let result = self.append_commands_partitioned(commands).await;
        record_append(BACKEND, "append_batch", count, started, &result);
        result
    }

    async fn command_session(&self) -> Result<Box<dyn CommandSession>, Error> {
        let conn = Conn::get(&self.inner.pool, "command").await?;
        Ok(Box::new(PgCommandSession::new(self.clone(), conn)))
    }

    #[tracing::instrument(name = "pg.commands", skip_all)]
    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error> {
        let conn = Conn::get(&self.inner.pool, "commands").await?;
        self.list_commands(&conn, filter, None).await
    }
}
