//! The core traits ([`EventReader`], [`EventStore`]) for [`PostgresEventStore`]: the entry
//! points, each a thin call into the module that does the work (reads in `store.rs`, streams in
//! `stream.rs`, appends in `append.rs`, `group.rs` and `batch.rs`, sessions in `session.rs`).
//! Kept apart from `store.rs` so that those modules depend on the store and not the other way
//! round.
use crate::conn::Conn;
use crate::session::PgCommandSession;
use crate::store::PostgresEventStore;
use async_trait::async_trait;
use dcb_core::{
    validate_query, AppendCommand, AppendCondition, CommandFilter, CommandRecord, CommandSession,
    Cursor, Error, Event, EventReader, EventStore, EventStream, NewEvent, ProjectionPermit, Query,
    ReadOptions,
};

#[async_trait]
impl EventReader for PostgresEventStore {
    #[tracing::instrument(name = "pg.query", skip_all, fields(items = query.items.len()))]
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        validate_query(query)?;
        dcb_core::validate_read_options(&options)?;
        let conn = Conn::get(&self.inner.pool, "query").await?;
        self.read_on(&conn, query, options).await
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        crate::stream::query_stream(self.clone(), query.clone(), options)
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
        self.append_checked(events, None).await
    }

    #[tracing::instrument(name = "pg.append_if", skip_all, fields(events = events.len()))]
    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error> {
        self.append_checked(events, Some(&condition)).await
    }

    #[tracing::instrument(name = "pg.append_batch", skip_all, fields(commands = commands.len()))]
    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error> {
        self.append_commands(commands).await
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
