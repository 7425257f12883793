//! The store a scenario's `when` step runs on: the scenario's store, noting what it appends.
use async_trait::async_trait;
use dcb_core::{
    AppendCommand, AppendCondition, ChangeFeed, CommandFilter, CommandRecord, CommandSession,
    CommitOutcome, Cursor, Error, Event, EventReader, EventStore, EventStream, NewCommand,
    NewEvent, ProjectionPermit, Query, ReadOptions, TransactionWork,
};
use std::sync::{Arc, Mutex};

/// One successful write: how many events it appended, ending at `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    pub last: Cursor,
    pub count: usize,
}

/// The writes made through a [`Recording`] store, shared with its command sessions.
pub(crate) type Log = Arc<Mutex<Vec<Written>>>;

fn note(log: &Log, last: Cursor, count: usize) {
    // A poisoned lock only means another task panicked while noting: the list is still whole.
    let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    log.push(Written { last, count });
}

/// `inner`, with every append that succeeds through it noted in `log`.
pub(crate) struct Recording {
    pub inner: Arc<dyn EventStore>,
    pub log: Log,
}

#[async_trait]
impl EventReader for Recording {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        self.inner.query(query, options).await
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        self.inner.query_stream(query, options)
    }

    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        self.inner.projection_permit()
    }

    fn change_feed(&self) -> Option<ChangeFeed> {
        self.inner.change_feed()
    }
}

#[async_trait]
impl EventStore for Recording {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Cursor, Error> {
        let count = events.len();
        let last = self.inner.append(events).await?;
        note(&self.log, last, count);
        Ok(last)
    }

    async fn append_if(
        &self,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<Cursor, Error> {
        let count = events.len();
        let last = self.inner.append_if(events, condition).await?;
        note(&self.log, last, count);
        Ok(last)
    }

    async fn append_batch(&self, commands: Vec<AppendCommand>) -> Result<Vec<Cursor>, Error> {
        let counts: Vec<usize> = commands.iter().map(|c| c.events.len()).collect();
        let lasts = self.inner.append_batch(commands).await?;
        for (last, count) in lasts.iter().zip(counts) {
            note(&self.log, *last, count);
        }
        Ok(lasts)
    }

    async fn command_session(&self) -> Result<Box<dyn CommandSession>, Error> {
        Ok(Box::new(RecordingSession {
            inner: self.inner.command_session().await?,
            log: self.log.clone(),
        }))
    }

    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, Error> {
        self.inner.commands(filter).await
    }
}

struct RecordingSession {
    inner: Box<dyn CommandSession>,
    log: Log,
}

#[async_trait]
impl EventReader for RecordingSession {
    async fn query(&self, query: &Query, options: ReadOptions) -> Result<Vec<Event>, Error> {
        self.inner.query(query, options).await
    }

    fn query_stream(&self, query: &Query, options: ReadOptions) -> EventStream {
        self.inner.query_stream(query, options)
    }

    fn projection_permit(&self) -> Result<ProjectionPermit, Error> {
        self.inner.projection_permit()
    }

    fn change_feed(&self) -> Option<ChangeFeed> {
        self.inner.change_feed()
    }
}

#[async_trait]
impl CommandSession for RecordingSession {
    async fn find_command(&self, id: &str) -> Result<Option<CommandRecord>, Error> {
        self.inner.find_command(id).await
    }

    async fn commit(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<CommitOutcome, Error> {
        self.commit_with(command, events, condition, None).await
    }

    async fn commit_with(
        &mut self,
        command: &NewCommand,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
        work: Option<TransactionWork>,
    ) -> Result<CommitOutcome, Error> {
        let count = events.len();
        let outcome = self
            .inner
            .commit_with(command, events, condition, work)
            .await?;
        if let CommitOutcome::Committed(record) = &outcome {
            if let Some(last) = record.last_event {
                note(&self.log, last, count);
            }
        }
        Ok(outcome)
    }
}

/// The events of `writes` among `events` (read in log order): for each write, the `count`
/// events of its transaction up to its last one. One append's events are consecutive within
/// their transaction, also when group commit shares the transaction with other appends.
pub(crate) fn select(events: Vec<Event>, writes: &[Written]) -> Vec<Event> {
    let mut keep = vec![false; events.len()];
    for write in writes {
        let mine = events.iter().enumerate().rev().filter(|(_, e)| {
            e.cursor.transaction_id == write.last.transaction_id && e.cursor <= write.last
        });
        for (i, _) in mine.take(write.count) {
            keep[i] = true;
        }
    }
    let mut keep = keep.into_iter();
    events
        .into_iter()
        .filter(|_| keep.next().unwrap_or(false))
        .collect()
}
