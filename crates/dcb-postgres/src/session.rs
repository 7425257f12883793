use crate::conn::Conn;
use crate::store::PostgresEventStore;
use async_trait::async_trait;
use dcb_core::{
    AppendCondition, CommandRecord, CommandSession, CommitOutcome, Error, Event, EventReader,
    EventStream, NewCommand, NewEvent, ProjectionPermit, Query, ReadOptions, TransactionWork,
};
use futures_util::StreamExt;
use std::sync::Arc;

/// A command's session: every read and the final commit go through ONE pooled connection, so
/// any number of concurrent commands needs at most one connection each.
pub(crate) struct PgCommandSession {
    store: PostgresEventStore,
    conn: Arc<Conn>,
}

impl PgCommandSession {
    pub(crate) fn new(store: PostgresEventStore, conn: Conn) -> Self {
        Self {
            store,
            conn: Arc::new(conn),
        }
    }
}

#[async_trait]
impl EventReader for PgCommandSession {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        let started = std::time::Instant::now();
        let result = self.store.read_on(&self.conn, query, options, false).await;
        dcb_core::store_metrics::record_query("postgres", started, &result);
        result
    }

    /// Reads through the session's own connection; the events are buffered (a command's
    /// decision model is bounded), then handed out one by one.
    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        let store = self.store.clone();
        let conn = Arc::clone(&self.conn);
        let query = query.clone();
        futures_util::stream::once(
            async move { store.read_on(&conn, &query, options, false).await },
        )
        .flat_map(|batch| {
            let items: Vec<Result<Event, Error>> = match batch {
                Ok(events) => events.into_iter().map(Ok).collect(),
                Err(err) => vec![Err(err)],
            };
            futures_util::stream::iter(items)
        })
        .boxed()
    }

    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        self.store.projection_permit()
    }
}

#[async_trait]
impl CommandSession for PgCommandSession {
    async fn find_command(&self, id: &str) -> Result<Option<CommandRecord>, Error> {
        self.store.find_command_by_id(&self.conn, id).await
    }

    async fn commit(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<CommitOutcome, Error> {
        self.commit_with(command, events, condition, None).await
    }

    /// With `work`, the commit takes three round trips instead of one (command_work.rs).
    async fn commit_with(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
        work: Option<TransactionWork>,
    ) -> Result<CommitOutcome, Error> {
        let condition = condition.as_ref();
        let schema = &self.store.inner.config.schema;
        let committed = match work {
            // On a partitioned store a commit that finds no partition (of the log, or of the
            // commands table, whose transaction ids every transaction of the cluster draws)
            // wrote nothing: the partitions are created and the same commit runs once more
            // (same validation, locks and checks, in a new transaction).
            None if self.store.inner.ahead.is_partitioned() => {
                let events = self.store.validate_commit(command, events, condition)?;
                let spare = events.clone();
                match self
                    .store
                    .commit_on(&self.conn, command, events, condition)
                    .await
                {
                    Err(err) if crate::partition_ahead::is_missing_partition(&err, schema) => {
                        if self
                            .store
                            .recover_missing_partition_on(Some(&self.conn), spare.len().max(1))
                            .await
                        {
                            tracing::debug!("command commit found no partition; running it again");
                            self.store
                                .commit_on(&self.conn, command, spare, condition)
                                .await
                        } else {
                            Err(err)
                        }
                    }
                    other => other,
                }
            }
            None => {
                self.store
                    .commit_on(&self.conn, command, events, condition)
                    .await
            }
            Some(work) => {
                self.store
                    .commit_with_work_on(&self.conn, command, events, condition, work)
                    .await
            }
        };
        if let Err(err) = &committed {
            // Nothing was written; the partition is created now, so executing the command
            // again succeeds.
            if crate::partition_ahead::is_missing_partition(err, schema) {
                self.store
                    .recover_missing_partition_on(Some(&self.conn), 1)
                    .await;
            }
        }
        match committed? {
            Some(record) => {
                self.store.appended_up_to(
                    record.last_event.map(|last| last.position),
                    record.transaction_id,
                );
                Ok(CommitOutcome::Committed(record))
            }
            None => {
                let id = command.id.as_deref().unwrap_or_default();
                match self.find_command(id).await? {
                    Some(original) => Ok(CommitOutcome::Duplicate(original)),
                    None => Err(Error::Storage {
                        operation: "command",
                        message: format!(
                            "command {id:?} was reported as duplicate but is not recorded"
                        ),
                        outcome_unknown: false,
                        source: None,
                    }),
                }
            }
        }
    }
}
